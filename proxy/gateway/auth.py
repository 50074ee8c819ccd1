"""Who is calling: with `auth.keys` configured, /v1 and /proxy need a valid key within its rate
limit, /metrics needs a valid key (unless `server.public_metrics`), and /readyz answers its
per-tier detail only to a valid key.

/healthz and /readyz's status code stay open to everyone: container and Kubernetes probes call
them without a key.
"""

from __future__ import annotations

from aiohttp import web

from proxy.gateway.client_io import Handler
from proxy.gateway.client_keys import authenticate
from proxy.gateway.state import CLIENT_KEY, STATE

_GUARDED = ("/v1/", "/proxy/")
# Tier names, costs, budgets and error counts: what a client key may see, not a passer-by.
_METRICS = "/metrics"
# Its status is public; a key that is presented must be valid, and unlocks the detail.
_READYZ = "/readyz"


@web.middleware
async def client_keys(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith(_GUARDED):
        state = request.app[STATE]
        key = authenticate(state.config, request.headers.get("Authorization"))
        if key is not None:
            await state.admit(key)
            request[CLIENT_KEY] = key
    elif (path == _METRICS and not request.app[STATE].config.server.public_metrics) or (
        path == _READYZ and "Authorization" in request.headers
    ):
        # Not counted against the key's rate: a scraper or a probe every few seconds must not
        # use up what the key's calls may spend.
        key = authenticate(request.app[STATE].config, request.headers.get("Authorization"))
        if key is not None:
            request[CLIENT_KEY] = key
    return await handler(request)
