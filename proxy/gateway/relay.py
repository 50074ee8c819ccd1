"""Relaying a committed stream to the client: bytes as they came, and an error event at the end
when the upstream fails after the status line went out (nothing can be retried then)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.errors import error_json
from proxy.gateway.client_io import ClientGone, write
from proxy.gateway.redact import Redactor
from proxy.gateway.sse import StreamWatch
from proxy.records import AttemptOutcome, AttemptRecord


async def relay_stream(
    resp: aiohttp.ClientResponse,
    client: web.StreamResponse,
    watch: StreamWatch,
    pending: bytes,
    rec: AttemptRecord,
    idle: float,
    redactor: Redactor,
) -> None:
    """After commit nothing may be retried: failures end the client's stream with an error event.

    `watch.feed` releases whole events only, so a secret split across TCP chunks is whole in
    what is cleaned here."""
    loop = asyncio.get_running_loop()
    try:
        await write(client, redactor.clean(pending))
        async with asyncio.timeout(idle) as gap:
            async for chunk in resp.content.iter_any():
                data = watch.feed(chunk)
                if data:
                    gap.reschedule(loop.time() + idle)
                    await write(client, redactor.clean(data))
                elif watch.overflow:
                    break
        await write(client, redactor.clean(watch.finish()))
    except TimeoutError:
        rec.fail(AttemptOutcome.TIMEOUT, f"stream stalled: no event for {idle:.3g}s")
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        rec.fail(AttemptOutcome.CONNECT_ERROR, f"connection lost mid-stream: {type(e).__name__}")
    except ClientGone:
        rec.fail(AttemptOutcome.CANCELLED, "client disconnected mid-stream")
        raise asyncio.CancelledError from None
    else:
        if watch.overflow:
            rec.fail(AttemptOutcome.BAD_RESPONSE, f"stream event too large (over {watch.max_event_bytes} bytes)")
        elif watch.error:
            rec.fail(AttemptOutcome.BAD_RESPONSE, f"upstream error in stream: {watch.error}")
        elif watch.truncated:
            rec.fail(AttemptOutcome.BAD_RESPONSE, "upstream stream ended in the middle of an event")
        elif not watch.done:
            rec.fail(AttemptOutcome.BAD_RESPONSE, "upstream stream ended without [DONE]")
        else:
            rec.outcome = AttemptOutcome.OK
        if rec.outcome is AttemptOutcome.OK or (watch.error and not watch.overflow):
            return  # an upstream error event was already passed on as it came
    await _end_with_error(client, redactor.clean_text(rec.error or "stream interrupted"))


async def _end_with_error(client: web.StreamResponse, message: str) -> None:
    event = (
        b"data: "
        + error_json(f"Upstream failed mid-stream: {message}", "upstream_error", "stream_interrupted")
        + b"\n\n"
    )
    try:
        await write(client, event)
    except ClientGone:
        raise asyncio.CancelledError from None
