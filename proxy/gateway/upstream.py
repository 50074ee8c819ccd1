"""ONE attempt against ONE tier, and the single place where aiohttp's errors become ours.

The attempt fills in its `AttemptRecord` (status, outcome, error, timings, usage) and returns a
`Reply` saying what the failover loop needs: the body to pass on, Retry-After, and whether a
stream was already committed to the client (after which nothing can be retried).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.config import Tier
from proxy.gateway.assembly import StreamAssembly
from proxy.gateway.outbound import Outbound
from proxy.gateway.quality import Check
from proxy.gateway.redact import Redactor
from proxy.gateway.relay import StreamLimits, hold_stream, relay_stream
from proxy.gateway.sse import StreamWatch
from proxy.gateway.target import Target
from proxy.gateway.usage import estimate_tokens, estimate_usage, parse_usage
from proxy.records import Api, AttemptOutcome, AttemptRecord, Usage, UsageSource


@dataclass(slots=True)
class Reply:
    body: bytes | bytearray | None = None  # a bytearray when read from upstream: held once, not copied
    content_type: str | None = None
    retry_after: float | None = None
    committed: bool = False


SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"

# Starts the client's stream (status line and headers) once the first event is in hand.
Committer = Callable[[Tier, AttemptRecord], Awaitable[web.StreamResponse]]


async def attempt(target: Target, out: Outbound, rec: AttemptRecord, timeout: float, commit: Committer | None) -> Reply:
    """Send once. Never raises except CancelledError (the client left)."""
    t0 = time.monotonic()
    try:
        if out.stream and commit is not None:
            return await _stream(target, out, rec, timeout, commit, t0)
        return await _unary(target, out, rec, timeout)
    except TimeoutError:
        rec.fail(AttemptOutcome.TIMEOUT, f"no answer within {timeout:.3g}s")
    except aiohttp.ClientConnectorError as e:
        rec.fail(AttemptOutcome.CONNECT_ERROR, f"cannot connect: {e.os_error.strerror or e.os_error}")
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
        rec.fail(AttemptOutcome.CONNECT_ERROR, f"connection lost: {type(e).__name__}: {e}")
    except aiohttp.ClientError as e:
        rec.fail(AttemptOutcome.CONNECT_ERROR, f"{type(e).__name__}: {e}")
    except asyncio.CancelledError:
        if rec.outcome is not AttemptOutcome.CANCELLED:  # else the relay said why (e.g. it stopped reading)
            rec.outcome, rec.error = AttemptOutcome.CANCELLED, "client disconnected"
        raise
    finally:
        rec.duration_ms = (time.monotonic() - t0) * 1000.0
        # Upstream text reaches the error through many paths (bodies, aiohttp's messages):
        # clean it once here, before the ledger, the logs or the 502 message see it.
        rec.error = target.redactor.clean_optional(rec.error)
    return Reply()


async def _unary(target: Target, out: Outbound, rec: AttemptRecord, timeout: float) -> Reply:
    async with asyncio.timeout(timeout), target.gate, target.post(out) as resp:
        rec.http_status = resp.status
        body = await _read_limited(resp, target.max_response_bytes)
        if resp.status >= 300:
            return _http_error(rec, resp, _frozen(body), target.redactor)
        content_type = target.redactor.clean_text(resp.headers.get("Content-Type", "application/json"))
    return _check_completion(rec, body, content_type, out, target.redactor)


def _check_completion(
    rec: AttemptRecord, body: bytearray | None, content_type: str, out: Outbound, redactor: Redactor
) -> Reply:
    if body is None:
        rec.fail(AttemptOutcome.BAD_RESPONSE, "response body too large")
        return Reply()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        rec.fail(AttemptOutcome.BAD_RESPONSE, "response is not JSON")
        return Reply()
    why = _not_an_answer(doc, out.api)
    if why is not None:
        rec.fail(AttemptOutcome.BAD_RESPONSE, why)
        return Reply()
    rec.outcome = AttemptOutcome.OK
    model = doc.get("model")
    if isinstance(model, str):
        rec.model = redactor.clean_text(model)
    rec.usage = parse_usage(doc.get("usage"), UsageSource.UPSTREAM) or estimate_usage(
        out.request_bytes, estimate_tokens(len(body))
    )
    if out.check is not None:
        _judge(rec, out.check, doc)
    return Reply(body=redactor.clean_buffer(body), content_type=content_type)


def _not_an_answer(doc: object, api: Api) -> str | None:
    """Why a 200 body is not an answer of this endpoint's kind (None: it is one)."""
    if not isinstance(doc, dict):
        return "response is not a JSON object"
    if api is Api.RESPONSES:
        if not isinstance(doc.get("output"), list):
            return "response is not a Responses API response (no output)"
        if doc.get("status") == "failed":
            err = doc.get("error")
            msg = err.get("message") if isinstance(err, dict) else None
            return f"the upstream's response failed: {msg if isinstance(msg, str) else 'no reason given'}"[:300]
        return None
    if api is Api.EMBEDDINGS:
        return None if isinstance(doc.get("data"), list) else "response is not an embeddings list (no data)"
    return None if isinstance(doc.get("choices"), list) else "response is not a completion (no choices)"


def _judge(rec: AttemptRecord, check: Check, doc: dict[str, Any]) -> None:
    """A well-formed answer: the quality gate's verdict on it (a bad one is a failed attempt)."""
    rec.checked = True
    why = check.judge(doc)
    if why is not None:
        rec.fail(AttemptOutcome.INVALID_OUTPUT, why)


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytearray | None:
    """The body, or None once it passes `limit` bytes (nothing past that is read). One buffer
    grows in place, so a large answer is held once, not as chunks plus their join; it is passed
    on as it is (orjson and the response writer take a bytearray without copying it). The
    decoded size counts: Content-Length is the wire size, which a compressed body passes by far."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    body = bytearray()
    while chunk := await resp.content.readany():
        if len(body) + len(chunk) > limit:
            return None
        body += chunk
    return body


def _frozen(body: bytearray | None) -> bytes | None:
    # Error bodies are few and usually small; a copy keeps _http_error's bytes contract.
    return bytes(body) if body is not None else None


def _http_error(rec: AttemptRecord, resp: aiohttp.ClientResponse, body: bytes | None, redactor: Redactor) -> Reply:
    rec.outcome = AttemptOutcome.HTTP_ERROR
    if resp.status < 400:  # a 3xx is a failed attempt; its body never reaches the client
        rec.error = f"HTTP {resp.status} redirect to {_redirect_host(resp)}: not followed"
        return Reply()
    rec.error = f"HTTP {resp.status}{_upstream_message(body)}"
    return Reply(
        body=None if body is None else redactor.clean(body),
        content_type=redactor.clean_text(resp.headers.get("Content-Type", "application/json")),
        retry_after=retry_after_seconds(resp.headers),
    )


def _redirect_host(resp: aiohttp.ClientResponse) -> str:
    location = resp.headers.get("Location")
    if not location:
        return "nowhere (no Location header)"
    try:
        host = resp.url.join(URL(location)).host
    except ValueError:
        host = None
    return host or "an unreadable Location"


def _upstream_message(body: bytes | None) -> str:
    if not body:
        return ""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    return f": {msg[:200]}" if isinstance(msg, str) else ""


def retry_after_seconds(headers: Any) -> float | None:
    """Retry-After as seconds or an HTTP date, or retry-after-ms; None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


async def _stream(
    target: Target, out: Outbound, rec: AttemptRecord, timeout: float, commit: Committer, t0: float
) -> Reply:
    tier = target.tier
    watch = StreamWatch(strip_usage=out.strip_usage, max_event_bytes=target.max_response_bytes, api=out.api)
    if out.check is not None:
        watch.assembly = StreamAssembly()
    async with asyncio.timeout(timeout) as deadline, target.gate, target.post(out) as resp:
        rec.http_status = resp.status
        if resp.status >= 300:
            body = _frozen(await _read_limited(resp, target.max_response_bytes))
            return _http_error(rec, resp, body, target.redactor)
        content_type = resp.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            rec.fail(AttemptOutcome.BAD_RESPONSE, f"expected an event stream, got {content_type or 'none'}")
            return Reply()
        pending = b""
        async for chunk in resp.content.iter_any():
            pending += watch.feed(chunk)
            if watch.ready or watch.overflow or (watch.first is not None and not watch.first_is_completion_chunk):
                break
        if watch.overflow:
            rec.fail(AttemptOutcome.BAD_RESPONSE, f"stream event too large (over {target.max_response_bytes} bytes)")
            return Reply()
        if not watch.data_events:
            rec.fail(AttemptOutcome.BAD_RESPONSE, "stream ended before its first event")
            return Reply()
        if watch.error or not watch.first_is_completion_chunk:
            expected = "a Responses API event" if out.api is Api.RESPONSES else "a completion chunk"
            rec.fail(AttemptOutcome.BAD_RESPONSE, watch.error or f"first stream event is not {expected}")
            return Reply()
        if not watch.ready:
            rec.fail(AttemptOutcome.BAD_RESPONSE, "stream ended before its answer began")
            return Reply()
        rec.ttft_ms = (time.monotonic() - t0) * 1000.0
        if watch.model:
            rec.model = target.redactor.clean_text(watch.model)
        deadline.reschedule(None)
        limits = StreamLimits(tier.stream_idle_timeout, target.max_response_bytes, tier.stream_max)
        if out.check is not None and out.check.hold:
            return await _held(resp, watch, pending, rec, limits, target, out, t0)
        client = await commit(tier, rec)
        try:
            await relay_stream(resp, client, watch, pending, rec, limits, target.redactor)
        finally:
            rec.usage = _stream_usage(watch, out)
        if out.check is not None and watch.assembly is not None and rec.outcome is AttemptOutcome.OK:
            _judge(rec, out.check, watch.assembly.doc())  # after the fact: recorded, nothing to fail over
    return Reply(committed=True)


async def _held(
    resp: aiohttp.ClientResponse,
    watch: StreamWatch,
    pending: bytes,
    rec: AttemptRecord,
    limits: StreamLimits,
    target: Target,
    out: Outbound,
    t0: float,
) -> Reply:
    """A checked stream, read whole before anything goes out: a bad one fails over unseen, a good
    one (or the last bad one) is sent as it came, byte for byte."""
    try:
        body, cut = await hold_stream(resp, watch, pending, limits, target.redactor)
    finally:
        rec.usage = _stream_usage(watch, out)
    if cut is not None:
        rec.fail(*cut)
        return Reply()
    rec.ttft_ms = (time.monotonic() - t0) * 1000.0  # the client's first byte leaves now
    rec.outcome = AttemptOutcome.OK
    assert out.check is not None and watch.assembly is not None  # held only when checked
    _judge(rec, out.check, watch.assembly.doc())
    return Reply(body=body, content_type=SSE_CONTENT_TYPE)


def _stream_usage(watch: StreamWatch, out: Outbound) -> Usage:
    # Some servers send no usage in streams, and a cut stream still cost something: count the
    # events rather than charge nothing.
    return watch.usage or estimate_usage(out.request_bytes, max(watch.data_events - 2 - watch.done, 0))
