"""Watch an upstream SSE stream as it is relayed, reading only what the proxy needs.

Chunks are cut at event boundaries (a client cannot use half an event anyway), and the
bytes go out unchanged, except the usage event the proxy asked for on the client's behalf,
which is removed when the client did not ask for usage itself. Events are parsed only when a
cheap byte search says they may carry usage or an error, so the common content delta costs
a few `in` tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from proxy.gateway.assembly import StreamAssembly
from proxy.gateway.usage import parse_usage
from proxy.records import Api, Usage, UsageSource

_DATA = b"data:"
_DONE = b"[DONE]"
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_ERROR_MARKER = b'"error"'
# The Responses API: its stream opens with bookkeeping events (the response, then empty output
# items and parts being `.added`: committing on those would leave nothing to fail over to), ends
# with a terminal one, and says failure in its own event types.
_BOOKKEEPING = frozenset({"response.created", "response.in_progress", "response.queued"})
_TERMINAL = (b'"response.completed"', b'"response.incomplete"')
_FAILED = frozenset({"error", "response.failed"})


@dataclass(slots=True)
class StreamWatch:
    strip_usage: bool  # the client did not ask for usage: hide the usage-only event
    max_event_bytes: int = 16 * 1024 * 1024  # an unterminated event past this is a broken upstream
    buffer: bytes = b""
    overflow: bool = False  # an event grew past max_event_bytes: stop reading
    truncated: bool = False  # the stream ended in the middle of an event
    data_events: int = 0
    done: bool = False
    usage: Usage | None = None
    model: str | None = None
    error: str | None = None  # an error event the upstream sent in the stream
    first: dict[str, object] | None = None  # the first data event, decoded
    api: Api = Api.CHAT
    answering: bool = False  # a Responses stream is past its bookkeeping events
    tail: bytes = b""  # a Responses stream's last events released, to number an error event after them
    assembly: StreamAssembly | None = None  # set when the answer will be judged: every event is decoded

    def feed(self, chunk: bytes) -> bytes:
        """Take raw bytes from upstream; return the complete events to forward (maybe b"")."""
        buf = self.buffer + chunk if self.buffer else chunk
        cut = _last_boundary(buf)
        if cut == 0:
            self.buffer = buf
            if len(buf) > self.max_event_bytes:
                self.overflow, self.buffer = True, b""
            return b""
        out, self.buffer = buf[:cut], buf[cut:]
        if self.strip_usage:
            # Asking for usage makes OpenAI add "usage":null to every chunk; the client did not ask.
            out = out.replace(b',"usage":null', b"")
        return self._inspect(out)

    def finish(self) -> bytes:
        """The upstream closed. A last event whose lines are complete (only the blank line is
        missing) still counts; half a line is not an event and is not passed on."""
        rest, self.buffer = self.buffer, b""
        if not rest.strip():
            return b""
        if rest.endswith((b"\n", b"\r")) or rest.rstrip().endswith(_DONE):
            return self._inspect(rest.rstrip(b"\r\n") + b"\n\n")
        self.truncated = True
        return b""

    def _inspect(self, out: bytes) -> bytes:
        # `out` starts at an event boundary; a `data:` elsewhere than at a line's start (in a
        # comment) is not a field. CRLF lines count by their LF; CR-only lines by their CR.
        n = out.count(b"\ndata:") + out.count(b"\rdata:") + out.startswith(_DATA)
        if not n:
            return out
        if self.first is None:
            self._read_first(out)
        self.data_events += n
        if self.assembly is not None:
            self.assembly.feed(out)
        if self.api is Api.RESPONSES:
            self.tail = out
            self._responses_progress(out)
        elif _DONE in out:
            self.done = True
        if _USAGE_MARKERS[0] in out or _USAGE_MARKERS[1] in out or _ERROR_MARKER in out:
            out = self._read_special(out)
        return out

    def _read_first(self, out: bytes) -> None:
        i = _first_data_line(out)
        if i < 0:
            return
        start, end = _event_around(out, i)
        payload = _data_of(out[start:end]) or b""
        try:
            decoded = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = "the first stream event is not JSON"
            self.first = {}
            return
        if not isinstance(decoded, dict):
            self.error = "the first stream event is not a JSON object"
            self.first = {}
            return
        self.first = decoded
        model = decoded.get("model")
        response = decoded.get("response")
        if model is None and isinstance(response, dict):  # a Responses event carries its response
            model = response.get("model")
        self.model = model if isinstance(model, str) else None

    def _read_special(self, out: bytes) -> bytes:
        """Parse only the events that carry a usage object or an error; drop the usage-only
        event when the client did not ask for it. Content deltas are never decoded."""
        drop: list[tuple[int, int]] = []
        pos = 0
        while (hit := _next_marker(out, pos)) >= 0:
            start, end = _event_around(out, hit)
            pos = end
            payload = _data_of(out[start:end])
            decoded = _loads_or_none(payload) if payload is not None and payload != _DONE else None
            if not isinstance(decoded, dict):
                continue
            if "error" in decoded and "choices" not in decoded and "type" not in decoded:
                self.error = _error_text(decoded["error"])
            kind = decoded.get("type")
            if kind in _FAILED:
                self.error = _responses_error(decoded)
            raw_usage = decoded.get("usage")
            if isinstance(kind, str) and isinstance(decoded.get("response"), dict):
                raw_usage = decoded["response"].get("usage")  # response.completed carries the response
            usage = parse_usage(raw_usage, UsageSource.UPSTREAM)
            if usage is not None:
                self.usage = usage
                if self.strip_usage and not decoded.get("choices"):
                    drop.append((start, end))
        if not drop:
            return out
        parts, last = [], 0
        for start, end in drop:
            parts.append(out[last:start])
            last = end
        parts.append(out[last:])
        return b"".join(parts)

    def _responses_progress(self, out: bytes) -> None:
        if any(m in out for m in _TERMINAL) or _DONE in out:
            self.done = True
        if self.answering:
            return
        # Until the answer starts, each event is decoded for its type (a handful per stream).
        for line in out.splitlines():
            if line.startswith(_DATA):
                kind = _loads_or_none(line[5:].strip())
                kind = kind.get("type") if isinstance(kind, dict) else None
                if isinstance(kind, str) and kind not in _BOOKKEEPING and not kind.endswith(".added"):
                    self.answering = True
                    return

    @property
    def ready(self) -> bool:
        """The stream may be committed to the client: its answer has begun."""
        if self.api is Api.RESPONSES:
            return self.answering or self.done or self.error is not None
        return self.data_events > 0

    @property
    def first_is_completion_chunk(self) -> bool:
        """The first event is what this endpoint streams (else the upstream is not speaking its API)."""
        if not isinstance(self.first, dict):
            return False
        if self.api is Api.RESPONSES:
            kind = self.first.get("type")
            return isinstance(kind, str) and (kind.startswith("response.") or kind == "error")
        return isinstance(self.first.get("choices"), list)


def events_within(out: bytes, size: int) -> bytes:
    """The complete events among the first `size` bytes of `out` (which starts at a boundary)."""
    return out[: _last_boundary(out[:size])]


def _last_boundary(buf: bytes) -> int:
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _first_data_line(out: bytes) -> int:
    """Where the first `data:` field starts a line (not inside a comment), or -1."""
    i = out.find(_DATA)
    while i > 0 and out[i - 1] not in b"\r\n":
        i = out.find(_DATA, i + 1)
    return i


def _next_marker(out: bytes, pos: int) -> int:
    found = [i for m in (*_USAGE_MARKERS, _ERROR_MARKER) if (i := out.find(m, pos)) >= 0]
    return min(found) if found else -1


def _event_around(out: bytes, i: int) -> tuple[int, int]:
    """The [start, end) of the event containing byte i, terminator included. Every search is
    bounded by the nearest LF LF, so scanning a chunk of many events stays linear."""
    lf = out.rfind(b"\n\n", 0, i)
    crlf = out.rfind(b"\r\n\r\n", max(lf, 0), i)
    start = crlf + 4 if crlf >= 0 else (lf + 2 if lf >= 0 else 0)
    lf = out.find(b"\n\n", i)
    stop = lf + 2 if lf >= 0 else len(out)
    crlf = out.find(b"\r\n\r\n", i, stop)
    return start, crlf + 4 if crlf >= 0 else stop


def _data_of(event: bytes) -> bytes | None:
    """The data of one event (multi-line data joined with newlines), or None for a comment."""
    lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(_DATA)]
    if not lines:
        return None
    return b"\n".join(lines).strip()


def _loads_or_none(payload: bytes) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def next_sequence_number(tail: bytes) -> int:
    """One past the last `sequence_number` in a Responses stream's last events (0 when none)."""
    at = tail.rfind(b'"sequence_number":')
    if at < 0:
        return 0
    digits = re.match(rb"\s*(\d+)", tail[at + len(b'"sequence_number":') :])
    return int(digits.group(1)) + 1 if digits else 0


def _responses_error(event: dict[str, object]) -> str:
    if event.get("type") == "error":
        return _error_text(event)
    response = event.get("response")
    err = response.get("error") if isinstance(response, dict) else None
    return _error_text(err) if err else "the upstream reported response.failed"


def _error_text(err: object) -> str:
    if isinstance(err, dict):
        msg = err.get("message")
        if isinstance(msg, str):
            return msg[:500]
    return str(err)[:500]
