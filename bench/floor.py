"""The floor this design can reach: a bare aiohttp forwarder, one server handler relaying each
chat completion to one shared ClientSession (no routing, no ledger, no metrics, no checks).

`python -m bench.floor PORT FAST PACED`: bodies naming the model `paced` go to the paced
upstream, `sse` to the fast upstream's canned stream, anything else to its canned completion
(a byte search, the least a forwarder that serves the bench's three targets can do). Answers
are relayed chunk by chunk as they come.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

_SESSION = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAMS = web.AppKey("upstreams", tuple)


async def _relay(request: web.Request) -> web.StreamResponse:
    fast, paced = request.app[_UPSTREAMS]
    body = await request.read()
    if b'"model":"paced"' in body:
        url = f"{paced}/v1/chat/completions"
    elif b'"model":"sse"' in body:
        url = f"{fast}/stream/v1/chat/completions"
    else:
        url = f"{fast}/v1/chat/completions"
    async with request.app[_SESSION].post(url, data=body, headers={"Content-Type": "application/json"}) as up:
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("fast")
    parser.add_argument("paced")
    args = parser.parse_args()
    app = web.Application()
    app[_UPSTREAMS] = (args.fast, args.paced)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[_SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", _relay)
    app.router.add_get("/health", _health)
    import uvloop

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
