"""How a simulated answer goes out, with its faults: pauses that notice a caller who left,
trickled bytes, a connection cut mid-body, keep-alives before the first event."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from aiohttp import web

from proxy.sim import bodies
from proxy.sim.settings import Behaviour


@dataclass(slots=True)
class State:
    rng: random.Random
    canned: dict[tuple[int, str], bodies.Canned] = field(default_factory=dict)
    stopping: bool = False


STATE = web.AppKey("sim_state", State)
# How often a long wait looks for a vanished client: aiohttp only cancels handlers when the
# server was built with handler_cancellation=True, which we cannot rely on.
_POLL_SECONDS = 0.02


class CallerLeft(Exception):
    pass


class ShuttingDown(Exception):
    pass


async def pause(request: web.Request, state: State, seconds: float | None) -> None:
    """Sleep `seconds` (None: forever), ending early if the client or the server goes away."""
    if seconds is not None and seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while True:
        if state.stopping:
            raise ShuttingDown
        transport = request.transport
        if transport is None or transport.is_closing():
            raise CallerLeft
        if deadline is None:
            step = _POLL_SECONDS
        else:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            step = min(remaining, _POLL_SECONDS)
        await asyncio.sleep(step)


async def send(
    request: web.Request, state: State, resp: web.StreamResponse, data: bytes, trickle: float | None
) -> None:
    if trickle is None:
        await resp.write(data)
        return
    for i in range(len(data)):
        await resp.write(data[i : i + 1])
        await pause(request, state, trickle)


def cut(request: web.Request) -> None:
    # close(), not abort(): the part already written must reach the client before the FIN,
    # otherwise the fault would look like "nothing received" rather than "dropped mid-way".
    transport = request.transport
    if transport is not None:
        transport.close()


async def whole(
    request: web.Request,
    state: State,
    b: Behaviour,
    status: int,
    headers: dict[str, str],
    data: bytes,
) -> web.StreamResponse:
    """Send a complete (non-SSE) body, applying the faults that apply to one."""
    if not (b.stall_after_headers or b.trickle is not None or b.drop_after is not None):
        return web.Response(status=status, body=data, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = len(data)
    await resp.prepare(request)
    if b.stall_after_headers:
        await pause(request, state, None)
    if b.drop_after is not None:
        await send(request, state, resp, data[: min(b.drop_after, max(len(data) - 1, 0))], b.trickle)
        cut(request)
        return resp
    await send(request, state, resp, data, b.trickle)
    await resp.write_eof()
    return resp


async def stream(
    request: web.Request,
    state: State,
    b: Behaviour,
    headers: dict[str, str],
    events: list[bytes],
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=headers)
    await resp.prepare(request)
    if b.stall_after_headers:
        await pause(request, state, None)
    await first_event_wait(request, state, resp, b)
    if b.chunk_delay <= 0 and b.trickle is None:
        await resp.write(b"".join(events))
    else:
        for i, event in enumerate(events):
            if i:
                await pause(request, state, b.chunk_delay)
            await send(request, state, resp, event, b.trickle)
    if b.drop_after is not None:
        cut(request)
        return resp
    await resp.write_eof()
    return resp


async def first_event_wait(request: web.Request, state: State, resp: web.StreamResponse, b: Behaviour) -> None:
    if b.keepalive_interval is None:
        await pause(request, state, b.first_event_delay)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + b.first_event_delay
    while (remaining := deadline - loop.time()) > 0:
        await pause(request, state, min(b.keepalive_interval, remaining))
        if deadline - loop.time() > 0:
            await send(request, state, resp, bodies.KEEPALIVE, b.trickle)
