"""proxy.logs: setup is idempotent, one access line per request in text and JSON, no body text ever."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from proxy.ops import logs
from proxy.ops.logs import ACCESS_LOGGER, log_request, setup_logging
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Outcome, Route, Usage
from tests.support.timing import best_us_per_call

MARKER = "MARKER-7f3a"


@pytest.fixture
def root_restored() -> Iterator[None]:
    """setup_logging changes the process-wide root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger(ACCESS_LOGGER)
    access_level = access.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    access.setLevel(access_level)


def _setup(fmt: str) -> io.StringIO:
    out = io.StringIO()
    setup_logging("INFO", fmt, stream=out)
    return out


def _record(**kw: Any) -> CallRecord:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "started_at": 0.0,
        "route": Route.COMPLEX,
        "chain": ("kimi", "llama"),
        "stream": True,
        "requested_model": "auto",
        "client": "team-a",
        "duration_ms": 812.3456,
        "tier": "kimi",
        "model": "kimi-k2",
        "status": 200,
        "ttft_ms": 123.456,
        "usage": Usage(prompt_tokens=11, completion_tokens=22),
        "attempts": [
            AttemptRecord(1, "kimi", "kimi-k2", 0.0, 5.0, outcome=AttemptOutcome.HTTP_ERROR),
            AttemptRecord(2, "kimi", "kimi-k2", 0.0, 800.0),
        ],
        "request_body": f'{{"messages": [{{"content": "{MARKER} prompt"}}]}}'.encode(),
        "response_body": f"{MARKER} completion".encode(),
    }
    fields.update(kw)
    return CallRecord(**fields)


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


@pytest.mark.usefixtures("root_restored")
def test_text_line_has_the_fields() -> None:
    out = _setup("text")
    log_request(_record())
    (line,) = _lines(out)
    assert " INFO proxy.access: request " in line
    for pair in (
        "request_id=req-1",
        "client=team-a",
        "route=complex",
        "tier=kimi",
        "model=kimi-k2",
        "attempts=2",
        "status=200",
        "outcome=ok",
        "duration_ms=812.3",
        "ttft_ms=123.5",
        "prompt_tokens=11",
        "completion_tokens=22",
        "error=-",
    ):
        assert f" {pair}" in line


@pytest.mark.usefixtures("root_restored")
def test_setup_twice_adds_one_handler() -> None:
    setup_logging("DEBUG", "json", stream=io.StringIO())
    out = _setup("text")
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._ProxyHandler)]
    assert len(ours) == 1
    for _ in range(3):
        log_request(_record())
    assert len(_lines(out)) == 3


@pytest.mark.usefixtures("root_restored")
def test_json_lines() -> None:
    out = _setup("json")
    long_error = "upstream said: " + "x" * 500
    log_request(_record())
    log_request(_record(tier=None, model=None, status=502, outcome=Outcome.ERROR, error=long_error, usage=None))
    first, second = (orjson.loads(line) for line in _lines(out))
    assert first["level"] == "INFO" and first["logger"] == ACCESS_LOGGER and first["msg"] == "request"
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    want: dict[str, Any] = {
        "request_id": "req-1",
        "client": "team-a",
        "route": "complex",
        "tier": "kimi",
        "model": "kimi-k2",
    }
    want |= {"attempts": 2, "status": 200, "outcome": "ok", "duration_ms": 812.3, "ttft_ms": 123.5}
    want |= {"prompt_tokens": 11, "completion_tokens": 22, "error": None}
    assert {k: first[k] for k in want} == want
    assert second["tier"] is None and second["outcome"] == "error" and second["status"] == 502
    assert second["error"] == long_error[:300]
    assert second["prompt_tokens"] is None


@pytest.mark.usefixtures("root_restored")
def test_json_other_loggers_extras_and_exceptions() -> None:
    out = _setup("json")
    log = logging.getLogger("proxy.test")
    log.warning("tier %s is slow", "kimi", extra={"tier": "kimi", "ms": 1.5})
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("failed")
    warn, err = (orjson.loads(line) for line in _lines(out))
    assert warn["msg"] == "tier kimi is slow" and warn["tier"] == "kimi" and warn["ms"] == 1.5
    assert err["level"] == "ERROR" and "ZeroDivisionError: boom" in err["exc"]


@pytest.mark.usefixtures("root_restored")
def test_text_error_with_newline_stays_on_one_line() -> None:
    out = _setup("text")
    log_request(_record(error='bad "gateway"\nforged=line', outcome=Outcome.ERROR))
    (line,) = _lines(out)
    assert r'error="bad \"gateway\"\nforged=line"' in line


@pytest.mark.usefixtures("root_restored")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_body_text_never_logged(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    out = _setup(fmt)
    with caplog.at_level(logging.DEBUG):
        log_request(_record())
        log_request(_record(outcome=Outcome.ERROR, error="failed"))
    assert len(_lines(out)) == 2
    assert MARKER not in out.getvalue()
    assert len(caplog.records) == 2
    for rec in caplog.records:
        assert MARKER not in repr(rec.__dict__)
        assert MARKER not in caplog.text


@pytest.mark.usefixtures("root_restored")
def test_disabled_access_log_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _setup("json")
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)

    def must_not_run(rec: CallRecord) -> dict[str, Any]:
        raise AssertionError("fields built for a disabled logger")

    monkeypatch.setattr(logs, "access_fields", must_not_run)
    log_request(_record())
    assert out.getvalue() == ""


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level"):
        setup_logging("LOUD")
    with pytest.raises(ValueError, match="format"):
        setup_logging("INFO", "xml")


@pytest.mark.usefixtures("root_restored")
def test_log_request_cost(capsys: pytest.CaptureFixture[str]) -> None:
    # Measured on the 2-core dev machine, during a full test run: 10-30 us per line, 0.15-0.2 us
    # with the access log off. The bounds are over 15x that, so load never trips them; a file
    # open or fsync per line, a lock wait, or fields built before the level check would.
    calls, repeats = 2_000, 5
    rec = _record()
    enabled: dict[str, float] = {}
    access = logging.getLogger(ACCESS_LOGGER)
    for fmt in ("text", "json"):
        out = _setup(fmt)
        (ours,) = [h for h in logging.getLogger().handlers if isinstance(h, logs._ProxyHandler)]
        # Only our handler, as in production: pytest's capture handlers on the root would
        # format every record twice more and triple the figure.
        access.addHandler(ours)
        access.propagate = False
        try:
            enabled[fmt] = best_us_per_call(lambda: log_request(rec), calls, repeats)
        finally:
            access.removeHandler(ours)
            access.propagate = True
        assert len(_lines(out)) == calls * repeats
    access.setLevel(logging.WARNING)
    disabled = best_us_per_call(lambda: log_request(rec), calls * 10, repeats)
    with capsys.disabled():
        print(
            f"\nlog_request(): text {enabled['text']:.2f}, json {enabled['json']:.2f}, disabled {disabled:.3f} us/call"
        )
    assert enabled["text"] < 500, f"text access line: {enabled['text']:.1f} us per call"
    assert enabled["json"] < 500, f"JSON access line: {enabled['json']:.1f} us per call"
    assert disabled < 5, f"access log off: {disabled:.2f} us per call"
