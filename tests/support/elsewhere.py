"""Another host for redirect tests: a loopback server on 127.0.0.2 that counts every request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer


async def elsewhere(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[str, list[str]]:
    """Its chat URL and the requests it got ("METHOD /path"), whatever their method or path;
    it answers each with a valid completion, so a followed redirect would look like success."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.path}")
        return web.json_response({"choices": [{"message": {"content": "from elsewhere"}}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app, host="127.0.0.2")
    return str(server.make_url("/v1/chat/completions")), hits
