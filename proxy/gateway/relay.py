"""Relaying a committed stream to the client: bytes as they came, and an error event at the end
when the upstream fails after the status line went out (nothing can be retried then).

Only time spent waiting for the upstream counts against it (its idle timeout, the stream's
duration cap): while a write waits for a slow client, the upstream is not being asked for
anything. The client's own bound is the write timeout in client_io.write.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from proxy.errors import error_json
from proxy.gateway.client_io import ClientGone, write
from proxy.gateway.redact import Redactor
from proxy.gateway.sse import StreamWatch, events_within, next_sequence_number
from proxy.records import Api, AttemptOutcome, AttemptRecord

# Why a relay stopped early: the attempt's outcome and its error, in words.
Cut = tuple[AttemptOutcome, str]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    idle: float  # longest wait for the upstream's next event
    max_bytes: int  # the whole stream as relayed to the client (server.max_response_bytes)
    max_seconds: float | None = None  # the stream after its first event, client reading time excluded


async def relay_stream(
    resp: aiohttp.ClientResponse,
    client: web.StreamResponse,
    watch: StreamWatch,
    pending: bytes,
    rec: AttemptRecord,
    limits: StreamLimits,
    redactor: Redactor,
) -> None:
    """After commit nothing may be retried: failures end the client's stream with an error event.

    `watch.feed` releases whole events only, so a secret split across TCP chunks is whole in
    what is cleaned here."""
    try:
        cut = await _pump(resp, client, watch, redactor.clean(pending), limits, redactor)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        rec.fail(AttemptOutcome.CONNECT_ERROR, f"connection lost mid-stream: {type(e).__name__}")
    except ClientGone as e:
        rec.fail(AttemptOutcome.CANCELLED, str(e))
        raise asyncio.CancelledError from None
    else:
        cut = cut or stream_fault(watch)
        if cut is None:
            rec.outcome = AttemptOutcome.OK
            return
        rec.fail(*cut)
        if watch.error and not watch.overflow and cut[1].startswith(_UPSTREAM_ERROR):
            return  # an upstream error event was already passed on as it came
    await _end_with_error(client, redactor.clean_text(rec.error or "stream interrupted"), watch)


_UPSTREAM_ERROR = "upstream error in stream: "


def stream_fault(watch: StreamWatch) -> Cut | None:
    """What is wrong with a stream that ended (None: it ended well, with [DONE])."""
    if watch.overflow:
        return AttemptOutcome.BAD_RESPONSE, f"stream event too large (over {watch.max_event_bytes} bytes)"
    if watch.error:
        return AttemptOutcome.BAD_RESPONSE, f"{_UPSTREAM_ERROR}{watch.error}"
    if watch.truncated:
        return AttemptOutcome.BAD_RESPONSE, "upstream stream ended in the middle of an event"
    if not watch.done:
        end = "response.completed" if watch.api is Api.RESPONSES else "[DONE]"
        return AttemptOutcome.BAD_RESPONSE, f"upstream stream ended without {end}"
    return None


async def hold_stream(
    resp: aiohttp.ClientResponse, watch: StreamWatch, pending: bytes, limits: StreamLimits, redactor: Redactor
) -> tuple[bytes, Cut | None]:
    """Read a stream to its end without sending anything (the quality gate judges it first):
    its cleaned bytes, and what cut it short (None: it ended well). The same limits as a relay."""
    loop = asyncio.get_running_loop()
    end = math.inf if limits.max_seconds is None else loop.time() + limits.max_seconds
    held = bytearray(redactor.clean(pending))
    try:
        while len(held) <= limits.max_bytes and not watch.overflow:
            async with asyncio.timeout_at(min(loop.time() + limits.idle, end)):
                chunk = await resp.content.readany()
            if not chunk:
                held += redactor.clean(watch.finish())
                break
            held += redactor.clean(watch.feed(chunk))
    except TimeoutError:
        if loop.time() >= end:
            return b"", (
                AttemptOutcome.TIMEOUT,
                f"stream ran past the tier's stream_max_seconds ({limits.max_seconds}s)",
            )
        return b"", (AttemptOutcome.TIMEOUT, f"stream stalled: no event for {limits.idle:.3g}s")
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        return b"", (AttemptOutcome.CONNECT_ERROR, f"connection lost mid-stream: {type(e).__name__}")
    if len(held) > limits.max_bytes:
        return b"", (AttemptOutcome.BAD_RESPONSE, f"the stream grew past {limits.max_bytes} bytes (max_response_bytes)")
    return bytes(held), stream_fault(watch)


async def _pump(
    resp: aiohttp.ClientResponse,
    client: web.StreamResponse,
    watch: StreamWatch,
    data: bytes,
    limits: StreamLimits,
    redactor: Redactor,
) -> Cut | None:
    """Relay until the upstream ends (None) or a limit cuts the stream (why)."""
    loop = asyncio.get_running_loop()
    end = math.inf if limits.max_seconds is None else loop.time() + limits.max_seconds
    idle_at = loop.time() + limits.idle
    sent = 0
    eof = False
    while True:
        if data:
            if sent + len(data) > limits.max_bytes:
                # The events that still fit go out, so the client gets up to the limit, then the error.
                await write(client, events_within(data, limits.max_bytes - sent))
                return AttemptOutcome.BAD_RESPONSE, (
                    f"the stream grew past {limits.max_bytes} bytes (server.max_response_bytes);"
                    " ask for a shorter answer (max_tokens) or raise that limit"
                )
            sent += len(data)
            before = loop.time()
            await write(client, data)
            now = loop.time()
            end += now - before  # the client's reading time is not the upstream's
            idle_at = now + limits.idle
        if eof or watch.overflow:
            return None
        stalled = idle_at <= end
        try:
            async with asyncio.timeout_at(min(idle_at, end)):
                chunk = await resp.content.readany()
        except TimeoutError:
            if stalled:
                return AttemptOutcome.TIMEOUT, f"stream stalled: no event for {limits.idle:.3g}s"
            return AttemptOutcome.TIMEOUT, (
                f"stream ran past the tier's stream_max_seconds ({limits.max_seconds:g}s);"
                " ask for a shorter answer (max_tokens) or raise that limit"
            )
        if chunk:
            data = redactor.clean(watch.feed(chunk))
        else:
            eof, data = True, redactor.clean(watch.finish())


async def _end_with_error(client: web.StreamResponse, message: str, watch: StreamWatch) -> None:
    text = f"Upstream failed mid-stream: {message}"
    if watch.api is Api.RESPONSES:
        # What clients of the Responses API wait for: an `error` event (there is no [DONE]),
        # numbered after the events they already have.
        doc = {
            "type": "error",
            "code": "stream_interrupted",
            "message": text,
            "param": None,
            "sequence_number": next_sequence_number(watch.tail),
        }
        event = b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"
    else:
        event = b"data: " + error_json(text, "upstream_error", "stream_interrupted") + b"\n\n"
    try:
        await write(client, event)
    except ClientGone:
        raise asyncio.CancelledError from None
