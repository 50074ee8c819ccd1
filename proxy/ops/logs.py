"""Logging setup (text or JSON lines on stderr) and the one access-log line per request.

Structured data travels on the LogRecord: `extra={"fields": {...}}` (or any other `extra` key)
becomes top-level JSON keys, or ` key=value` pairs after the message in text. The access line
is built only from a `CallRecord`'s metadata: its request and response bodies hold prompt and
completion text and are never read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any

import orjson

from proxy.records import CallRecord

ACCESS_LOGGER = "proxy.access"
ERROR_MAX_CHARS = 300
FORMATS = ("text", "json")

_access = logging.getLogger(ACCESS_LOGGER)
_INFO = logging.INFO
# What every LogRecord carries; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


class _ProxyHandler(logging.StreamHandler[IO[str]]):
    """The handler setup_logging installs (a second call replaces it instead of adding one).

    Buffered, it leaves lines in the stream's buffer instead of a write() per line, which costs
    more than formatting the line; `flush_logs` (every second from the server) and any warning
    or error push them out.
    """

    def __init__(self, stream: IO[str], buffered: bool = False) -> None:
        super().__init__(stream)
        self.buffered = buffered

    def flush(self) -> None:
        if not self.buffered:
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.buffered and record.levelno >= logging.WARNING:
            super().flush()

    def flush_now(self) -> None:
        super().flush()

    def close(self) -> None:
        # logging.shutdown (at exit) calls flush(), a no-op when buffered, then close(): the
        # lines of the last second (the shutdown's own among them) must still get out.
        self.flush_now()
        super().close()


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ProxyHandler):
            handler.flush_now()


async def flush_logs_periodically(app: object) -> AsyncIterator[None]:
    """cleanup_ctx for a server with buffered logs: lines reach stderr within a second."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(1.0)
            flush_logs()

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        flush_logs()


def setup_logging(
    level: str = "INFO", fmt: str = "text", *, stream: IO[str] | None = None, buffered: bool = False
) -> None:
    """Send the root logger to stderr (or `stream`) as text or JSON lines. Safe to call again.
    `buffered`: see _ProxyHandler (the server uses it; stderr itself writes every line)."""
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProxyHandler)]:
        root.removeHandler(old)
        old.close()
    if stream is None and buffered:
        stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False)  # noqa: SIM115
    handler = _ProxyHandler(stream if stream is not None else sys.stderr, buffered)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(levelno)


def log_request(rec: CallRecord) -> None:
    """One INFO line on `proxy.access` for a finished request. Nearly free when that level is off."""
    if not _access.isEnabledFor(_INFO):
        return
    # makeRecord + handle is what .info() does, minus findCaller's stack walk (a third of the
    # cost): the caller's file and line say nothing about a request.
    fields = access_fields(rec)
    _access.handle(_access.makeRecord(ACCESS_LOGGER, _INFO, "", 0, "request", (), None, extra={"fields": fields}))


def access_fields(rec: CallRecord) -> dict[str, Any]:
    """The access line's fields. Metadata only: never rec.request_body or rec.response_body."""
    usage = rec.usage
    error = rec.error
    return {
        "request_id": rec.request_id,
        "client": rec.client,
        "route": rec.route.value,
        "tier": rec.tier,
        "model": rec.model,
        "stream": rec.stream,
        "attempts": len(rec.attempts),
        "status": rec.status,
        "outcome": rec.outcome.value,
        "duration_ms": round(rec.duration_ms, 1),
        "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 1),
        "prompt_tokens": None if usage is None else usage.prompt_tokens,
        "completion_tokens": None if usage is None else usage.completion_tokens,
        "error": None if error is None else error[:ERROR_MAX_CHARS],
    }


def _extras(record: logging.LogRecord) -> Mapping[str, Any]:
    """The record's `extra=` data, with a `fields` mapping flattened into it."""
    extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
    fields = extras.get("fields")
    if not isinstance(fields, Mapping):
        return extras
    del extras["fields"]
    return {**fields, **extras} if extras else fields


class _UtcClock:
    """ISO-8601 UTC timestamps; the seconds part is formatted once per second, not once per line."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = (-1, "")  # one tuple, swapped whole, so a racing thread never sees half an update

    def __call__(self, created: float) -> str:
        whole = int(created)
        second, prefix = self._last
        if whole != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._last = (whole, prefix)
        return f"{prefix}.{int((created - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, then exc/stack if any."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _UtcClock()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._clock(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra the caller passed that JSON cannot hold still logs, as its str().
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger: msg key=value ...`; values with spaces or quotes are quoted, one line each."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._clock = _UtcClock()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = _extras(record)
        if not extras:
            return line
        return line + " " + " ".join([f"{k}={_text_value(v)}" for k, v in extras.items()])


def _text_value(value: object) -> str:
    kind = type(value)
    if kind is int or kind is float:  # the common case first; bool is its own type, handled below
        return str(value)
    if value is None:
        return "-"
    if kind is bool:
        return "true" if value else "false"
    text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    # Quoted and escaped so an upstream error message can never forge a second log line.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'
