"""Who is calling: with `auth.keys` configured, /v1 and /proxy need a valid key within its rate limit."""

from __future__ import annotations

import time

from aiohttp import web

from proxy.gateway.client_io import Handler
from proxy.gateway.client_keys import authenticate
from proxy.gateway.state import CLIENT_KEY, STATE

_GUARDED = ("/v1/", "/proxy/")


@web.middleware
async def client_keys(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(_GUARDED):
        state = request.app[STATE]
        key = authenticate(state.config, request.headers.get("Authorization"))
        if key is not None:
            state.limits.admit(key, time.monotonic())
            request[CLIENT_KEY] = key
    return await handler(request)
