"""A counting pass-through in front of a real upstream (the llama.cpp server), so a test can count
the requests one tier got from outside the proxy, as it counts a simulated tier's hits.

Bodies go both ways unchanged (a stream chunk by chunk as it arrives); only the request's
Content-Type and Authorization and the answer's status and Content-Type are carried over. Start
it on a running loop (e.g. `SimThread.run(start_relay(url))`), close it on the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class Relay:
    """Forwards /v1/... to `target` (a base URL ending in /v1); `url` is its own /v1 base URL."""

    target: str
    url: str = ""
    hits: int = 0  # POSTs to /v1/chat/completions
    paths: list[str] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _runner: web.AppRunner | None = None

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


_RELAY = web.AppKey("relay", Relay)


async def start_relay(target: str) -> Relay:
    relay = Relay(target.rstrip("/"))
    # A connection per request: llama.cpp's HTTP server closes kept-alive connections on its own,
    # and a request sent on one it is closing fails (ServerDisconnectedError) in the relay, not in
    # the proxy under test.
    relay._session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=60)
    )
    app = web.Application()
    app[_RELAY] = relay
    app.router.add_route("*", "/v1/{tail:.*}", _forward)
    relay._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await relay._runner.setup()
    site = web.TCPSite(relay._runner, "127.0.0.1", 0)
    await site.start()
    relay.url = f"http://127.0.0.1:{relay._runner.addresses[0][1]}/v1"
    return relay


async def _forward(request: web.Request) -> web.StreamResponse:
    relay = request.app[_RELAY]
    tail = request.match_info["tail"]
    relay.paths.append(tail)
    if request.method == "POST" and tail == "chat/completions":
        relay.hits += 1
    sent = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
    assert relay._session is not None
    async with relay._session.request(
        request.method, f"{relay.target}/{tail}", data=await request.read(), headers=sent
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, headers={"Content-Type": content_type})
        resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
