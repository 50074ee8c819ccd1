"""The fault matrix (issue 6) through the real `proxy serve` process.

Every case checks what the client received (status, OpenAI error format, X-Proxy-Tier /
X-Proxy-Attempts, the SSE error event after a stream started), how often each simulated
upstream was hit, the ledger rows (`requests` outcome/status, `attempts` outcomes), and that
the proxy then serves a normal request.

Upstream and client faults share one proxy process (module scope) in front of three simulated
tiers that run on their own event loop (tests/support/faults.py) and are reset before each
case; breakers are effectively off (`escalate_after_failures: 1000`) so cases cannot leak into
each other, and each case finds its ledger rows by its own X-Request-Id. Process and disk
faults start their own proxy. A process starts in ~0.3 s; one shared process keeps the ~50
cases to a few seconds plus the timeouts they are about.

Shared settings (tests/support/faults.py `proxy_config`): tier timeout 0.5 s, stream idle
timeout 0.3 s, 2 attempts per tier, 5 per request, backoff 10-50 ms, request deadline 3 s,
max_response_bytes 32 KiB, body_read_timeout 0.3 s, idle_timeout 2 s.

Results go to $RELIABILITY_OBSERVATIONS when set (see `python -m reliability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.sim import Behaviour
from tests.support.faults import (
    KIMI_ENV,
    Answer,
    Observation,
    RawReply,
    SimThread,
    chat,
    chat_body,
    chunked,
    count_rows,
    describe_answer,
    drip_until_closed,
    http_head,
    integrity,
    ledger_rows,
    openai_error,
    port_of,
    proxy_config,
    request_id,
    spill_lines,
    sse_chunk,
    summarize_ledger,
    wait_count,
)
from tests.support.faults import observe as observe  # a fixture, used by name
from tests.support.proc import ProxyProc, closed_port_url, run_cli

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")

TIERS = ("llama", "ollama", "kimi")
TIMEOUT = 0.5  # every tier's timeout_seconds in these tests


# ---------------------------------------------------------------------------- fixtures


def urls(sims: SimThread) -> dict[str, str]:
    return {name: sim.url for name, sim in sims.sims.items()}


@pytest.fixture(scope="module")
def shared_proxy(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    work = tmp_path_factory.mktemp("matrix")
    proc = ProxyProc.start(work, proxy_config(urls(sims), work / "ledger.db"), KIMI_ENV)
    yield proc
    assert proc.terminate() == 0


@pytest.fixture
def proxy(shared_proxy: ProxyProc, sims: SimThread) -> ProxyProc:
    sims.reset()
    assert shared_proxy.alive(), shared_proxy.log_text()[-3000:]
    return shared_proxy


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def still_serves(session: aiohttp.ClientSession, proxy: ProxyProc, sims: SimThread) -> None:
    """After the fault: a plain request is answered by the primary at the first attempt."""
    sims.reset()
    a = await chat(session, proxy, timeout=5)
    assert (a.status, a.tier, a.attempts) == (200, "llama", 1), describe_answer(a)
    assert a.json()["choices"]


def ledger_steps(atts: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(f"{a['tier']}:{a['outcome']}" for a in atts)


# ---------------------------------------------------------------------------- upstream faults: one table

ROLE = sse_chunk(role=True)
SSE_HEAD = http_head(content_type="text/event-stream")
TRUNCATED = b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hel'
HTML_PAGE = http_head(content_type="text/html") + b"<html><body><h1>502 Bad Gateway</h1></body></html>"
BIG_NO_LENGTH = http_head() + b'{"choices": [' + b" " * 100_000 + b"]}"
ENDLESS_EVENT = RawReply(SSE_HEAD + b"data: ", endless=b"x" * 65536)


def http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@dataclass(frozen=True)
class Fault:
    """One row of the upstream fault table: what llama (and maybe the others) does, and what must follow."""

    id: str
    description: str
    llama: tuple[Behaviour | RawReply, ...] = ()  # llama's next answers, in order
    llama_always: Behaviour | None = None  # llama's answer after those
    others_always: Behaviour | None = None  # ollama's and kimi's
    stream: bool = False
    # the client: "completion", "done" (stream ending in [DONE]), "error_event" (stream ending in
    # an OpenAI error event), or "error" (an OpenAI error JSON with `code`)
    expect: str = "completion"
    status: int = 200
    code: str | None = None
    tier: str | None = "ollama"
    hits: tuple[int, int, int] = (2, 1, 0)  # llama, ollama, kimi
    ledger: tuple[str, ...] = ("llama:http_error", "llama:http_error", "ollama:ok")
    outcome: str = "ok"  # requests.outcome
    first_error: str | None = None  # substring of attempt 1's error
    min_s: float = 0.0
    max_s: float = 1.0
    body_has: bytes | None = None
    body_lacks: bytes | None = None
    header: str | None = None  # a header the answer must carry
    log_has: str | None = None
    xfail: str | None = None
    request_headers: tuple[tuple[str, str], ...] = ()


def _timeouts(**kw: Any) -> dict[str, Any]:
    return {"hits": (1, 1, 0), "ledger": ("llama:timeout", "ollama:ok"), "min_s": TIMEOUT - 0.05, "max_s": 1.4, **kw}


def _bad(error: str, **kw: Any) -> dict[str, Any]:
    return {"ledger": ("llama:bad_response", "llama:bad_response", "ollama:ok"), "first_error": error, **kw}


def _both(fault: Fault) -> list[Fault]:
    """The case as a plain call and as a stream (ids suffixed -json / -stream). A stream expects the
    same as the plain call, except that a completion becomes a stream ending in [DONE]."""
    stream_expect = "done" if fault.expect == "completion" else fault.expect
    return [
        dataclasses.replace(fault, id=f"{fault.id}-json", stream=False),
        dataclasses.replace(
            fault,
            id=f"{fault.id}-stream",
            stream=True,
            expect=stream_expect,
            description=fault.description + " (stream)",
        ),
    ]


UPSTREAM_FAULTS: list[Fault] = [
    *(
        f
        for status in (500, 502, 503, 504)
        for f in _both(
            Fault(
                f"http-{status}",
                f"llama answers {status}: retried once on llama, then ollama answers",
                llama_always=Behaviour(status=status),
                first_error=f"HTTP {status}",
            )
        )
    ),
    *_both(
        Fault(
            "http-429-no-retry-after",
            "llama answers 429 without Retry-After: retried after backoff, then ollama",
            llama_always=Behaviour(status=429),
        )
    ),
    Fault(
        "http-429-retry-after-seconds",
        "llama answers 429 with Retry-After: 1 (fits the 3 s deadline): the proxy waits 1 s and llama answers",
        llama=(Behaviour(status=429, retry_after="1"),),
        tier="llama",
        hits=(2, 0, 0),
        ledger=("llama:http_error", "llama:ok"),
        min_s=0.95,
        max_s=2.0,
    ),
    Fault(
        "http-429-retry-after-seconds-too-long",
        "llama answers 429 with Retry-After: 3600 (beyond the deadline): no wait, ollama at once",
        llama_always=Behaviour(status=429, retry_after="3600"),
        hits=(1, 1, 0),
        ledger=("llama:http_error", "ollama:ok"),
        max_s=0.5,
    ),
    Fault(
        "http-429-retry-after-date-future",
        "llama answers 429 with Retry-After as an HTTP-date an hour ahead: no wait, ollama at once",
        llama_always=Behaviour(status=429, retry_after=http_date(3600)),
        hits=(1, 1, 0),
        ledger=("llama:http_error", "ollama:ok"),
        max_s=0.5,
    ),
    Fault(
        "http-429-retry-after-date-past",
        "llama answers 429 with Retry-After as an HTTP-date in the past: retried after backoff, then ollama",
        llama_always=Behaviour(status=429, retry_after=http_date(-3600)),
        max_s=0.5,
    ),
    *_both(
        Fault(
            "http-401",
            "llama answers 401 (the proxy's key is wrong): not retried there, logged, ollama answers",
            llama_always=Behaviour(status=401),
            hits=(1, 1, 0),
            ledger=("llama:http_error", "ollama:ok"),
            log_has="rejected the proxy's API key",
        )
    ),
    *_both(
        Fault(
            "stall-before-headers",
            "llama accepts the request and never answers: timeout after 0.5 s, ollama answers",
            llama_always=Behaviour(stall=True),
            **_timeouts(first_error="no answer within"),
        )
    ),
    *_both(
        Fault(
            "headers-then-stall",
            "llama sends 200 headers and then nothing: timeout after 0.5 s, ollama answers",
            llama_always=Behaviour(stall_after_headers=True),
            **_timeouts(),
        )
    ),
    Fault(
        "stall-before-first-event",
        "llama opens the stream and sends only keep-alive comments: timeout after 0.5 s, ollama streams; "
        "nothing of llama's reaches the client",
        llama_always=Behaviour(first_event_delay=10, keepalive_interval=0.05),
        stream=True,
        expect="done",
        body_lacks=b"keep-alive",
        **_timeouts(),
    ),
    *_both(
        Fault(
            "trickle",
            "llama trickles its answer one byte per 100 ms: bounded by the 0.5 s tier timeout, ollama answers",
            llama_always=Behaviour(trickle=0.1),
            **_timeouts(),
        )
    ),
    Fault(
        "drop-mid-stream",
        "llama drops the connection after 3 content events: the client's stream ends with an error event "
        "(no failover after the first byte)",
        llama_always=Behaviour(drop_after=3),
        stream=True,
        expect="error_event",
        tier="llama",
        hits=(1, 0, 0),
        ledger=("llama:connect_error",),
        outcome="error",
    ),
    Fault(
        "drop-mid-body",
        "llama drops the connection half way through a JSON body: retried, then ollama",
        llama_always=Behaviour(drop_after=50),
        ledger=("llama:connect_error", "llama:connect_error", "ollama:ok"),
    ),
    Fault(
        "malformed-json",
        "llama answers 200 with malformed JSON: retried, then ollama",
        llama_always=Behaviour(malformed=True),
        **_bad("not JSON"),
    ),
    Fault(
        "malformed-json-mid-stream",
        "llama's stream carries a malformed event after the first: relayed unchanged (the proxy does not "
        "re-validate events after the first), stream ends with [DONE]",
        llama_always=Behaviour(malformed=True),
        stream=True,
        expect="done",
        tier="llama",
        hits=(1, 0, 0),
        ledger=("llama:ok",),
        body_has=b'"choices": [{"delta": \n\n',
    ),
    Fault(
        "malformed-first-event",
        "llama's stream starts with an event that is not JSON: retried, then ollama streams",
        llama=(RawReply(SSE_HEAD + b"data: {not json\n\n"),) * 2,
        stream=True,
        expect="done",
        **_bad("not JSON"),
    ),
    Fault(
        "truncated-sse-line",
        "llama's stream ends (EOF) in the middle of an SSE line: the client's stream ends with a parseable error event",
        llama=(RawReply(SSE_HEAD + ROLE + sse_chunk("a") + TRUNCATED),),
        stream=True,
        expect="error_event",
        tier="llama",
        hits=(1, 0, 0),
        ledger=("llama:bad_response",),
        outcome="error",
    ),
    Fault(
        "truncated-sse-line-chunked",
        "llama's chunked stream is cut in the middle of an SSE line: the client's stream ends with an error event",
        llama=(
            RawReply(
                http_head(content_type="text/event-stream", Transfer_Encoding="chunked")
                + chunked(ROLE, sse_chunk("a"), TRUNCATED, terminate=False)
            ),
        ),
        stream=True,
        expect="error_event",
        tier="llama",
        hits=(1, 0, 0),
        ledger=("llama:connect_error",),
        outcome="error",
    ),
    Fault(
        "stream-without-done",
        "llama's stream ends without data: [DONE]: the client's stream ends with an error event, not a "
        "silent clean end",
        llama_always=Behaviour(no_done=True),
        stream=True,
        expect="error_event",
        tier="llama",
        hits=(1, 0, 0),
        ledger=("llama:bad_response",),
        outcome="error",
    ),
    Fault(
        "not-a-completion",
        "llama answers 200 with JSON that is not a chat completion: retried, then ollama",
        llama_always=Behaviour(not_completion=True),
        **_bad("not a completion (no choices)"),
    ),
    Fault(
        "enormous-body",
        "llama answers 100 kB, more than max_response_bytes (32 KiB): refused unread, retried, then ollama",
        llama_always=Behaviour(body_size=100_000),
        **_bad("too large"),
    ),
    Fault(
        "enormous-body-no-length",
        "llama answers 100 kB without Content-Length: reading stops at max_response_bytes, retried, then ollama",
        llama=(RawReply(BIG_NO_LENGTH),) * 2,
        **_bad("too large"),
    ),
    Fault(
        "enormous-sse-event",
        "llama's stream sends one endless event with no line end: the attempt fails once max_response_bytes "
        "is buffered (not at the timeout), retried, then ollama streams",
        llama=(ENDLESS_EVENT, ENDLESS_EVENT),
        stream=True,
        expect="done",
        max_s=TIMEOUT - 0.1,
        **_bad("too large"),
    ),
    Fault(
        "wrong-content-type-stream",
        "llama answers a stream request with 200 text/plain: retried, then ollama streams",
        llama_always=Behaviour(content_type="text/plain"),
        stream=True,
        expect="done",
        **_bad("expected an event stream"),
    ),
    Fault(
        "wrong-content-type-html",
        "llama answers 200 text/html (an error page): retried, then ollama",
        llama=(RawReply(HTML_PAGE),) * 2,
        **_bad("not JSON"),
    ),
    *_both(
        Fault(
            "all-tiers-503",
            "every tier answers 503: 502 upstream_failed listing every attempt (a stream gets the same JSON "
            "error: nothing was sent yet)",
            llama_always=Behaviour(status=503),
            others_always=Behaviour(status=503),
            expect="error",
            status=502,
            code="upstream_failed",
            tier=None,
            hits=(2, 2, 1),
            ledger=("llama:http_error",) * 2 + ("ollama:http_error",) * 2 + ("kimi:http_error",),
            outcome="error",
        )
    ),
    Fault(
        "all-tiers-timeout",
        "every tier stalls: 504 upstream_timeout after one 0.5 s attempt per tier",
        llama_always=Behaviour(stall=True),
        others_always=Behaviour(stall=True),
        tier=None,
        hits=(1, 1, 1),
        ledger=("llama:timeout", "ollama:timeout", "kimi:timeout"),
        outcome="error",
        expect="error",
        status=504,
        code="upstream_timeout",
        min_s=3 * TIMEOUT - 0.05,
        max_s=2.5,
    ),
    Fault(
        "all-tiers-429",
        "every tier answers 429: 429 upstream_rate_limited with Retry-After",
        llama_always=Behaviour(status=429),
        others_always=Behaviour(status=429),
        tier=None,
        hits=(2, 2, 1),
        ledger=("llama:http_error",) * 2 + ("ollama:http_error",) * 2 + ("kimi:http_error",),
        outcome="error",
        expect="error",
        status=429,
        code="upstream_rate_limited",
        header="Retry-After",
    ),
]


# The quality gate (issue 12): a 200 answer that is not what the client asked for.
_PLAN = '{"goal": "ship", "steps": [{"id": 1, "action": "draft", "done": false}]}'
_WANTS_JSON = (("X-Proxy-Check", "json"),)


def _bad_answer(error: str, **kw: Any) -> dict[str, Any]:
    return {
        "others_always": Behaviour(content=_PLAN),
        "ledger": ("llama:invalid_output", "llama:invalid_output", "ollama:ok"),
        "first_error": error,
        "request_headers": _WANTS_JSON,
        "header": "X-Proxy-Check",
        "body_lacks": b"Sure!",
        **kw,
    }


UPSTREAM_FAULTS += [
    *_both(
        Fault(
            "answer-prose-around-json",
            "llama answers 200 with prose around the JSON the client asked for: retried, then ollama",
            llama_always=Behaviour(content=f"Sure! Here is the plan: {_PLAN}"),
            **_bad_answer("content is not JSON (prose around the JSON)"),
        )
    ),
    *_both(
        Fault(
            "answer-cut-at-max-tokens",
            "llama answers 200 with JSON cut at max_tokens (finish_reason length): retried, then ollama",
            llama_always=Behaviour(content="Sure! " + _PLAN[:30], finish_reason="length"),
            **_bad_answer("cut at max_tokens"),
        )
    ),
    *_both(
        Fault(
            "answer-all-tiers-bad",
            "every tier answers 200 with prose instead of JSON: the last answer, marked failed",
            llama_always=Behaviour(content="Sure! no JSON here"),
            **(
                _bad_answer("content is not JSON")
                | {
                    "others_always": Behaviour(content="Sure! no JSON here either"),
                    "tier": "kimi",
                    "hits": (2, 2, 1),
                    "ledger": ("llama:invalid_output",) * 2 + ("ollama:invalid_output",) * 2 + ("kimi:invalid_output",),
                    "body_lacks": None,
                    "body_has": b'"sim_tier":"kimi"',
                }
            ),
        )
    ),
]


def _param(f: Fault) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f.xfail)] if f.xfail else []
    return pytest.param(f, id=f.id, marks=marks)


def check_client(case: Fault, a: Answer) -> None:
    assert a.failure is None, a.failure
    assert a.status == case.status, (a.status, a.body[:500])
    assert a.attempts == len(case.ledger), a.headers
    assert a.tier == case.tier, a.headers
    if case.expect == "completion":
        doc = a.json()
        assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"]
    elif case.expect == "error":
        err = openai_error(a.json())
        assert err["code"] == case.code, err
        for attempt in case.ledger:  # the message lists every attempt
            assert f"{attempt.split(':')[0]} #" in err["message"]
    else:
        assert a.stream, a.headers
        events = a.events()
        if case.expect == "done":
            assert events[-1] == b"[DONE]", a.body[-300:]
            assert not any(isinstance(e, dict) and "error" in e for e in events), a.body[-300:]
            if case.body_has is None:  # (the malformed-event case relays one unparseable event)
                assert all(isinstance(e, dict) and e.get("choices") for e in events[:-1]), a.body[-300:]
        else:  # error_event: every event parses, the last is an OpenAI error, no [DONE]
            assert b"[DONE]" not in events
            assert all(isinstance(e, dict) for e in events), a.body[-400:]
            err = openai_error(events[-1])
            assert err["code"] == "stream_interrupted", err
            assert a.body.endswith(b"\n\n")
    if case.body_has is not None:
        assert case.body_has in a.body
    if case.body_lacks is not None:
        assert case.body_lacks not in a.body
    if case.header is not None:
        assert case.header in a.headers, a.headers


@pytest.mark.parametrize("case", [_param(f) for f in UPSTREAM_FAULTS])
async def test_upstream_fault(
    case: Fault, proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    llama = sims.sims["llama"]
    if case.llama_always is not None:
        llama.always(case.llama_always)
    llama.script(*case.llama)
    if case.others_always is not None:
        for name in ("ollama", "kimi"):
            sims.sims[name].always(case.others_always)
    log_start = proxy.log.stat().st_size
    rid = request_id(case.id)
    a = await chat(session, proxy, stream=case.stream, rid=rid, headers=dict(case.request_headers))
    observe.client = describe_answer(a)
    observe.extra["seconds"] = round(a.elapsed, 3)
    await asyncio.gather(*(sims.sims[n].wait_idle() for n in TIERS))
    hits = tuple(sims.sims[n].hits for n in TIERS)
    observe.hits = dict(zip(TIERS, hits, strict=True))
    req, atts = ledger_rows(proxy.db, rid)
    observe.ledger = summarize_ledger(req, atts)
    if any(isinstance(item, RawReply) and item.endless for item in case.llama):
        observe.extra["llama_raw_bytes_sent"] = llama.raw_bytes_sent
        observe.extra["proxy_rss_kb"] = proxy.rss_kb()

    check_client(case, a)
    assert case.min_s <= a.elapsed <= case.max_s, a.elapsed
    assert hits == case.hits
    assert ledger_steps(atts) == case.ledger, [a["error"] for a in atts]
    assert (req["outcome"], req["status"], req["tier"], req["attempts"]) == (
        case.outcome,
        case.status,
        case.tier,
        len(case.ledger),
    )
    if case.first_error is not None:
        assert case.first_error in (atts[0]["error"] or ""), atts[0]["error"]
    if case.log_has is not None:
        with proxy.log.open("rb") as f:
            f.seek(log_start)
            assert case.log_has.encode() in f.read()
    await still_serves(session, proxy, sims)


# ---------------------------------------------------------------------------- unreachable primary


@pytest.fixture(scope="module")
def unreachable(
    sims: SimThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[ProxyProc, Any]]]:
    """One proxy whose llama URL refuses connections, one whose llama accepts and never reads."""
    procs: dict[str, tuple[ProxyProc, Any]] = {}
    hole = sims.blackhole()
    for kind, url in (("refused", closed_port_url()), ("blackhole", hole.url)):
        work = tmp_path_factory.mktemp(kind)
        config = proxy_config({**urls(sims), "llama": url}, work / "ledger.db")
        procs[kind] = (ProxyProc.start(work, config, KIMI_ENV), hole if kind == "blackhole" else None)
    yield procs
    for proc, _ in procs.values():
        assert proc.terminate() == 0


@dataclass(frozen=True)
class Unreachable:
    kind: str
    stream: bool
    description: str


UNREACHABLE = [
    Unreachable(kind, stream, text + (" (stream)" if stream else ""))
    for kind, text in (
        ("refused", "llama's port refuses connections: retried once, then ollama answers"),
        ("blackhole", "llama accepts the TCP connection and never reads or answers: timeout 0.5 s, then ollama"),
    )
    for stream in (False, True)
]


@pytest.mark.parametrize(
    "case", [pytest.param(u, id=f"{u.kind}-{'stream' if u.stream else 'json'}") for u in UNREACHABLE]
)
async def test_unreachable_primary(
    case: Unreachable,
    unreachable: dict[str, tuple[ProxyProc, Any]],
    sims: SimThread,
    session: aiohttp.ClientSession,
    observe: Observation,
) -> None:
    proc, hole = unreachable[case.kind]
    sims.reset()
    accepted_before = hole.accepted if hole is not None else 0
    rid = request_id(case.kind)
    a = await chat(session, proc, stream=case.stream, rid=rid)
    observe.client = describe_answer(a)
    req, atts = ledger_rows(proc.db, rid)
    observe.ledger = summarize_ledger(req, atts)
    llama_hits = f"llama ({case.kind})"
    observe.hits = {llama_hits: hole.accepted - accepted_before if hole else 0, "ollama": 0, "kimi": 0}
    observe.hits.update({n: sims.sims[n].hits for n in ("ollama", "kimi")})
    observe.extra["seconds"] = round(a.elapsed, 3)

    assert (a.status, a.tier) == (200, "ollama"), describe_answer(a)
    if case.stream:
        assert a.events()[-1] == b"[DONE]"
    else:
        assert a.json()["choices"]
    assert (sims.sims["ollama"].hits, sims.sims["kimi"].hits) == (1, 0)
    if case.kind == "refused":
        assert a.attempts == 3 and a.elapsed < 1.0
        assert ledger_steps(atts) == ("llama:connect_error", "llama:connect_error", "ollama:ok")
        assert "cannot connect" in atts[0]["error"]
    else:
        assert hole is not None and hole.accepted - accepted_before == 1
        assert a.attempts == 2 and TIMEOUT - 0.05 <= a.elapsed < 1.4
        assert ledger_steps(atts) == ("llama:timeout", "ollama:ok")
    assert (req["outcome"], req["status"], req["tier"]) == ("ok", 200, "ollama")
    again = await chat(session, proc)
    assert (again.status, again.tier) == (200, "ollama")


# ---------------------------------------------------------------------------- client faults


async def test_client_disconnects_before_the_answer(
    proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The client gives up (0.2 s) while llama is still thinking: the upstream call is cancelled and the
    request is recorded as client_cancelled/499 with a cancelled attempt."""
    llama = sims.sims["llama"]
    llama.always(Behaviour(headers_delay=5))
    rid = request_id("client-gone")
    a = await chat(session, proxy, rid=rid, timeout=0.2)
    observe.client = "nothing: the client closed the connection after 0.2 s, as intended"
    assert a.failure is not None and "Timeout" in a.failure
    assert await llama.wait_idle(), "the upstream call is cancelled, not left running"
    assert llama.stats.cancelled == 1
    req, atts = ledger_rows(proxy.db, rid)
    observe.ledger = summarize_ledger(req, atts)
    observe.hits = sims.hits()
    assert sims.hits() == {"llama": 1, "ollama": 0, "kimi": 0}
    assert (req["outcome"], req["status"], req["attempts"]) == ("client_cancelled", 499, 1)
    assert ledger_steps(atts) == ("llama:cancelled",)
    await still_serves(session, proxy, sims)


async def test_client_disconnects_mid_stream(
    proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The client reads the first bytes of a slow stream and hangs up: the upstream stream is cancelled
    and the request is recorded as client_cancelled/499 on llama."""
    llama = sims.sims["llama"]
    llama.always(Behaviour(chunk_delay=0.05, chunks=40))
    rid = request_id("client-gone-stream")
    async with session.post(proxy.chat_url, json=chat_body(True), headers={"X-Request-Id": rid}) as resp:
        first = await resp.content.readany()
        observe.client = (
            f"{resp.status} stream from {resp.headers.get('X-Proxy-Tier')}; client left after {len(first)} bytes"
        )
        assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
        assert first.startswith(b"data: ")
        resp.close()
    assert await llama.wait_idle()
    assert llama.stats.cancelled == 1
    req, atts = ledger_rows(proxy.db, rid)
    observe.ledger = summarize_ledger(req, atts)
    observe.hits = sims.hits()
    assert sims.hits() == {"llama": 1, "ollama": 0, "kimi": 0}
    assert (req["outcome"], req["status"], req["tier"]) == ("client_cancelled", 499, "llama")
    assert ledger_steps(atts) == ("llama:cancelled",)
    await still_serves(session, proxy, sims)


async def read_http_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def test_client_sends_the_body_slowly(
    proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The client sends headers and part of the body, then nothing (server.body_read_timeout_seconds 0.3):
    408 in OpenAI's format, no upstream touched, a ledger row, the server keeps serving."""
    rid = request_id("slow-body")
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.monotonic()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-Request-Id: {rid}\r\n".encode()
        + b'Content-Length: 200\r\n\r\n{"model": "auto", '
    )
    await writer.drain()
    status, headers, body = await asyncio.wait_for(read_http_response(reader), 3)
    elapsed = time.monotonic() - t0
    writer.close()
    observe.client = f"{status} OpenAI error `{orjson.loads(body)['error']['code']}` after {elapsed:.2f} s"
    assert status == 408 and 0.25 <= elapsed < 1.5
    assert headers["content-type"].startswith("application/json")
    assert openai_error(orjson.loads(body))["code"] == "body_timeout"
    req, atts = ledger_rows(proxy.db, rid)
    observe.ledger = summarize_ledger(req, atts)
    observe.hits = sims.hits()
    assert sims.hits() == {"llama": 0, "ollama": 0, "kimi": 0}
    assert (req["outcome"], req["status"], req["attempts"]) == ("error", 408, 0) and atts == []
    await still_serves(session, proxy, sims)


async def test_client_drips_its_request_head(
    proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """A slowloris client: a request line, then a header line every 50 ms, never the blank line
    (server.idle_timeout_seconds 2): the connection is closed at the idle timeout, nothing reaches
    an upstream, and other clients are served meanwhile."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    dripping = asyncio.create_task(drip_until_closed(reader, writer, 5))
    await asyncio.sleep(0.2)
    a = await chat(session, proxy, timeout=5)
    took = await dripping
    writer.close()
    observe.client = (
        f"dripped head cut off after {took:.2f} s; meanwhile {describe_answer(a)} in {a.elapsed * 1000:.0f} ms"
    )
    observe.hits = sims.hits()
    assert (a.status, a.tier) == (200, "llama") and a.elapsed < 0.5
    assert 1.5 <= took < 3, took
    assert sims.hits() == {"llama": 1, "ollama": 0, "kimi": 0}
    await still_serves(session, proxy, sims)


async def test_client_opens_many_idle_connections(
    proxy: ProxyProc, sims: SimThread, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """200 idle TCP connections to the proxy: a normal request still answers at once; closing them
    releases their file descriptors."""
    host, port = proxy.url.removeprefix("http://").split(":")
    upstream_ports = [port_of(sim.url) for sim in sims.sims.values()]

    def own_fds() -> int:  # pooled upstream keep-alive connections come and go on their own
        total, pooled = proxy.fds_by_peer(upstream_ports)
        return total - pooled

    fds_before = own_fds()
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(200)]
    try:
        for _ in range(100):
            if own_fds() >= fds_before + 200:
                break
            await asyncio.sleep(0.02)
        fds_open = own_fds()
        assert fds_open >= fds_before + 200, "the proxy accepted every connection"
        a = await chat(session, proxy, timeout=5)
        observe.client = f"with 200 idle connections open: {describe_answer(a)} in {a.elapsed * 1000:.0f} ms"
        assert (a.status, a.tier) == (200, "llama") and a.elapsed < 0.5
    finally:
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    fds_after = fds_open
    for _ in range(150):
        fds_after = own_fds()
        if fds_after <= fds_before + 2:
            break
        await asyncio.sleep(0.02)
    observe.extra = {"fds_before": fds_before, "fds_with_idle": fds_open, "fds_after_close": fds_after}
    observe.hits = sims.hits()
    assert fds_after <= fds_before + 2, (fds_before, fds_open, fds_after)
    await still_serves(session, proxy, sims)


# ---------------------------------------------------------------------------- process and disk faults


@pytest.fixture
def fresh(sims: SimThread) -> SimThread:
    sims.reset()
    return sims


@contextlib.contextmanager
def own_proxy(work: Path, config: dict[str, Any]) -> Iterator[ProxyProc]:
    proc = ProxyProc.start(work, config, KIMI_ENV)
    try:
        yield proc
    finally:
        proc.kill()


def consistent(db: Path) -> None:
    """The ledger is internally consistent: sound file, no orphan rows, rollups match the raw rows."""
    assert integrity(db) == "ok"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM attempts a LEFT JOIN requests r ON r.id = a.request_id WHERE r.id IS NULL"
        ).fetchone()[0]
        n_requests, n_attempts = conn.execute("SELECT count(*), coalesce(sum(attempts), 0) FROM requests").fetchone()
        attempt_rows = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
        calls = conn.execute("SELECT coalesce(sum(calls), 0) FROM daily_usage").fetchone()[0]
    assert orphans == 0
    assert n_attempts == attempt_rows
    assert calls == n_requests


async def test_sigterm_mid_stream(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """SIGTERM while a stream is half sent: the stream completes with [DONE], the process exits 0, the
    row is written; a restarted proxy serves on the same ledger."""
    fresh.sims["llama"].always(Behaviour(chunk_delay=0.03, chunks=20))
    config = proxy_config(urls(fresh), tmp_path / "ledger.db")
    rid = request_id("sigterm")
    with own_proxy(tmp_path, config) as proc:
        async with session.post(proc.chat_url, json=chat_body(True), headers={"X-Request-Id": rid}) as resp:
            first = await resp.content.readany()
            proc.signal(signal.SIGTERM)
            body = first + await resp.read()
        rc = await asyncio.to_thread(proc.popen.wait, 10)
        done = body.endswith(b"data: [DONE]\n\n")
        observe.client = f"{resp.status} stream completed after SIGTERM (ends with [DONE]: {done}); exit code {rc}"
        assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
        assert rc == 0
    req, atts = ledger_rows(tmp_path / "ledger.db", rid)
    observe.ledger = summarize_ledger(req, atts)
    observe.hits = fresh.hits()
    assert (req["outcome"], req["status"]) == ("ok", 200) and ledger_steps(atts) == ("llama:ok",)
    fresh.reset()
    with own_proxy(tmp_path, config) as proc:
        assert (await chat(session, proc)).status == 200
        assert wait_count(proc.db, 2) == 2


async def test_sigkill_and_restart(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """SIGKILL during a burst of 100 requests: the ledger file passes integrity_check, opens, keeps every
    row written before the kill with consistent attempts and rollups; the restart replays the journal
    (every burst call answered before the kill has its row), and the restarted proxy adds rows."""
    db = tmp_path / "ledger.db"
    config = proxy_config(urls(fresh), db)
    with own_proxy(tmp_path, config) as proc:
        before = [request_id(f"before-{i}") for i in range(20)]
        answers = await asyncio.gather(*(chat(session, proc, rid=r, stream=i % 2 == 0) for i, r in enumerate(before)))
        assert all(a.status == 200 for a in answers)
        assert wait_count(db, 20) == 20
        fresh.sims["llama"].always(Behaviour(chunk_delay=0.01, chunks=10))
        burst = [asyncio.create_task(chat(session, proc, stream=i % 2 == 0, timeout=5)) for i in range(100)]
        while sum(t.done() for t in burst) < 30:
            await asyncio.sleep(0.005)
        proc.popen.kill()
        results = await asyncio.gather(*burst)
        assert proc.popen.wait(5) == -signal.SIGKILL
    answered = sum(r.status == 200 for r in results)
    observe.client = (
        f"{answered}/100 burst requests answered before the kill, the rest got connection errors "
        f"(none hung: slowest {max(r.elapsed for r in results):.2f} s)"
    )
    assert max(r.elapsed for r in results) < 5
    rows_after_kill = count_rows(db)
    consistent(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        found = {r[0] for r in conn.execute("SELECT id FROM requests")}
    assert set(before) <= found, "every row written before the kill is still there"
    observe.hits = fresh.hits()
    fresh.reset()
    complete = {
        {k.lower(): v for k, v in r.headers.items()}["x-request-id"]
        for r in results
        if r.status == 200 and (not r.stream or r.body.endswith(b"data: [DONE]\n\n"))
    }
    with own_proxy(tmp_path, config) as proc:
        replayed = count_rows(db) - rows_after_kill  # the journal is replayed before the proxy listens
        with contextlib.closing(sqlite3.connect(db)) as conn:
            found = {r[0] for r in conn.execute("SELECT id FROM requests")}
        assert complete <= found, f"{len(complete - found)} answered calls have no row after the restart"
        after = [request_id(f"after-{i}") for i in range(5)]
        statuses = [(await chat(session, proc, rid=r)).status for r in after]
        assert statuses == [200] * 5
        assert wait_count(db, rows_after_kill + replayed + 5) == rows_after_kill + replayed + 5
    consistent(db)
    observe.ledger = (
        f"integrity ok; {rows_after_kill} rows after the kill (20 written before it, all present); "
        f"+{replayed} replayed from the journal at restart ({len(complete)} answered, all present); "
        f"+5 after restart; attempts and rollups consistent"
    )


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Bind-mount `path` over itself read-only: writes fail even for root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a file read-only for root")
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


async def report_json(session: aiohttp.ClientSession, proc: ProxyProc) -> Any:
    async with session.get(f"{proc.url}/proxy/report") as r:
        return await r.json()


async def test_ledger_read_only(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The ledger file is read-only (bind mount): requests are served, rows go to the spill file, and the
    next start imports them."""
    db = tmp_path / "ledger.db"
    config = proxy_config(urls(fresh), db)
    with own_proxy(tmp_path, config) as proc:
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 1) == 1
        assert proc.terminate() == 0
    with read_only(db):
        with own_proxy(tmp_path, config) as proc:
            answers = [await chat(session, proc, stream=i % 2 == 0) for i in range(10)]
            assert all(a.status == 200 and a.elapsed < 0.5 for a in answers)
            assert proc.terminate() == 0
        spilled, in_db = spill_lines(db), count_rows(db)
    observe.client = "10 x 200 while the file was read-only"
    assert (spilled, in_db) == (10, 1)
    with own_proxy(tmp_path, config) as proc:
        assert wait_count(db, 11) == 11
        report = await report_json(session, proc)
        assert report["ledger"]["imported"] == 10
        assert not Path(f"{db}.spill.jsonl").exists()
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 12) == 12
    consistent(db)
    observe.ledger = f"{spilled} rows spilled while read-only; imported at the next start (12 rows in all)"
    observe.hits = fresh.hits()


async def test_ledger_locked_by_another_writer(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """Another connection holds BEGIN EXCLUSIVE (busy_timeout_ms 20): requests are not slowed, rows spill;
    after the lock is gone new rows are written and `proxy ledger import` brings the spilled ones back
    while the proxy runs."""
    db = tmp_path / "ledger.db"
    config = proxy_config(urls(fresh), db, ledger={"busy_timeout_ms": 20})
    with own_proxy(tmp_path, config) as proc:
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 1) == 1
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            answers = [await chat(session, proc, stream=i % 2 == 0) for i in range(10)]
            assert all(a.status == 200 and a.elapsed < 0.3 for a in answers), [a.elapsed for a in answers]
            for _ in range(250):
                if spill_lines(db) == 10:
                    break
                await asyncio.sleep(0.02)
            spilled = spill_lines(db)
        finally:
            blocker.rollback()
            blocker.close()
        observe.client = f"10 x 200 while locked, slowest {max(a.elapsed for a in answers) * 1000:.0f} ms"
        assert spilled == 10
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 2) == 2, "written directly once the lock is gone"
        rc, _, err = await run_cli("ledger", "import", "--db", str(db), "--config", str(proc.config_path), timeout=30)
        assert rc == 0, err
        assert wait_count(db, 12) == 12
        assert not Path(f"{db}.spill.jsonl").exists()
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 13) == 13
    consistent(db)
    observe.ledger = (
        "10 rows spilled while locked; written directly after; `proxy ledger import` while running: 13 rows"
    )
    observe.hits = fresh.hits()


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a tiny tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


async def test_ledger_disk_full(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The ledger's disk is full (256 KiB tmpfs, filled): requests are served, rows are held in memory
    (the spill file is on the same full disk) and all land once space is freed; nothing lost."""
    with tiny_tmpfs(tmp_path / "fs") as fs:
        db = fs / "ledger.db"
        config = proxy_config(urls(fresh), db)
        with own_proxy(tmp_path, config) as proc:
            assert (await chat(session, proc)).status == 200
            assert wait_count(db, 1) == 1
            filler = fill(fs)
            answers = [await chat(session, proc, stream=i % 2 == 0) for i in range(10)]
            assert all(a.status == 200 and a.elapsed < 0.3 for a in answers)
            for _ in range(100):
                if "holding rows in memory" in proc.log_text():
                    break
                await asyncio.sleep(0.02)
            assert "holding rows in memory" in proc.log_text()
            during = count_rows(db) + spill_lines(db)
            filler.unlink()
            landed = wait_count(db, 11, timeout=5)
            assert proc.terminate() == 0
        observe.client = "10 x 200 while the disk was full"
        assert during < 11, "the disk really was full"
        assert landed == 11
        assert "LOST" not in proc.log_text()
        consistent(db)
    observe.ledger = f"rows held in memory while full ({during} of 11 stored); all 11 in the database after freeing"
    observe.hits = fresh.hits()


async def test_ledger_directory_removed(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The ledger's directory is deleted while the proxy runs: requests are served and the proxy
    recreates the directory and a fresh ledger with every later row."""
    ledger_dir = tmp_path / "ledgerdir"
    db = ledger_dir / "ledger.db"
    config = proxy_config(urls(fresh), db)
    with own_proxy(tmp_path, config) as proc:
        assert (await chat(session, proc)).status == 200
        assert wait_count(db, 1) == 1
        shutil.rmtree(ledger_dir)
        answers = [await chat(session, proc, stream=i % 2 == 0) for i in range(5)]
        observe.client = f"{sum(a.status == 200 for a in answers)} x 200 after the directory was removed"
        assert all(a.status == 200 for a in answers)
        assert wait_count(db, 5) == 5
        assert "moved or deleted" in proc.log_text()
        assert proc.terminate() == 0
    consistent(db)
    assert spill_lines(db) == 0
    observe.ledger = "directory and a fresh ledger recreated; all 5 later rows in it"
    observe.hits = fresh.hits()


PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs allocates whole pages


async def test_ledger_disk_fills_while_spilling(
    fresh: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """The database is locked (rows spill) and the disk fills in the middle of a spill write: once space
    is back and the lock gone, every request is in the ledger after the next start; no line rejected."""
    with tiny_tmpfs(tmp_path / "fs") as fs:
        db = fs / "ledger.db"
        spill = Path(f"{db}.spill.jsonl")
        config = proxy_config(urls(fresh), db, ledger={"busy_timeout_ms": 10})
        with own_proxy(tmp_path, config) as proc:
            assert (await chat(session, proc)).status == 200
            assert wait_count(db, 1) == 1
            sent = 1
            blocker = sqlite3.connect(db, timeout=0)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                # Spill ~800-byte rows until the spill file's last tmpfs page has less room left than
                # the next row (which carries a 128-character request id, ~1 kB); then fill the disk:
                # that row's write fits only partly and tears.
                slack = 0
                while not 0 < slack < 900:
                    assert (await chat(session, proc)).status == 200
                    sent += 1
                    for _ in range(200):
                        if spill_lines(db) == sent - 1:
                            break
                        await asyncio.sleep(0.01)
                    slack = -spill.stat().st_size % PAGE
                filler = fill(fs)
                assert (await chat(session, proc, rid="torn-" + "x" * 123)).status == 200
                sent += 1
                for _ in range(200):
                    if "holding rows in memory" in proc.log_text():
                        break
                    await asyncio.sleep(0.01)
                torn = spill.read_bytes()
                assert torn.endswith(b"\n"), "a write cut short by the full disk is truncated away, not left torn"
                filler.unlink()
                for _ in range(300):  # the held row is spilled again at the next retry (every 1 s)
                    if spill.stat().st_size > len(torn):
                        break
                    await asyncio.sleep(0.01)
            finally:
                blocker.rollback()
                blocker.close()
            assert proc.terminate() == 0
        observe.hits = fresh.hits()
        with own_proxy(tmp_path, config):  # the spill file is imported before the proxy answers /healthz
            rows = count_rows(db)
            rejected = Path(f"{db}.spill.rejected.jsonl")
            observe.client = f"{sent} x 200"
            n_rejected = len(rejected.read_bytes().splitlines()) if rejected.exists() else 0
            observe.ledger = f"{rows} of {sent} rows after the import; {n_rejected} spill line(s) rejected"
            assert rows == sent
            assert not rejected.exists()
