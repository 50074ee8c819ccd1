"""Browsers on other origins (`server.cors`): preflights answered, CORS headers on every answer.

Off by default: without `server.cors` nothing here changes an answer. With it:

- a preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed origin gets 204
  with the methods and headers a page may send (the routing headers, `Authorization`, and what
  the openai SDK adds in a browser). It carries no credentials, so it is answered without a
  client key; the request that follows still needs one.
- every answer to an allowed origin, errors and streams included, carries
  `Access-Control-Allow-Origin` and exposes the `X-Proxy-*`, `X-Request-Id` and retry headers
  (added as the headers are sent, so a stream has them as well as a 401 does).
- a request from any other origin gets 403 in OpenAI's format and no CORS headers: its page could
  not read the answer, so no tier is called (and paid) for it. A same-origin request
  (`Sec-Fetch-Site: same-origin`) is not a cross-origin one and passes.
- every answer carries `Vary: Origin`, so a cache never hands one origin's answer to another.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config import Cors
from proxy.errors import ProxyError, error_response
from proxy.gateway.client_io import Handler
from proxy.gateway.state import STATE

ALLOW_METHODS = "GET, POST, OPTIONS"
# What a page may send: the proxy's routing headers, and what the openai SDK (openai-node with
# dangerouslyAllowBrowser) adds to each call. Any other x-stainless-* header a preflight asks
# for is allowed too (the SDK adds new ones now and then); nothing else is.
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Accept",
    "User-Agent",
    "X-Request-Id",
    "X-Replan",
    "X-Complexity",
    "X-Tier",
    "X-Fallback",
    "X-Proxy-Check",
    "OpenAI-Organization",
    "OpenAI-Project",
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Retry-Count",
    "X-Stainless-Timeout",
    "X-Stainless-Helper-Method",
)
_ALLOWED_LOWER = frozenset(h.lower() for h in ALLOW_HEADERS)
# What a page's script may read besides the CORS-safelisted headers; the SDK reads the last three
# to decide whether and when to retry.
EXPOSE_HEADERS = (
    "X-Request-Id",
    "X-Proxy-Tier",
    "X-Proxy-Route",
    "X-Proxy-Attempts",
    "X-Proxy-Model",
    "X-Proxy-Check",
    "X-Proxy-Budget-Remaining",
    "Retry-After",
    "retry-after-ms",
    "x-should-retry",
)
_EXPOSED_LOWER = frozenset(h.lower() for h in EXPOSE_HEADERS)
_EXPOSE = ", ".join(EXPOSE_HEADERS)
# Seconds a browser may reuse a preflight's answer (Chromium caps it at 7200). An origin taken
# out of server.cors by a reload is refused at once anyway: its requests get 403.
MAX_AGE = "7200"

# The Access-Control-Allow-Origin value for this request ("" when it sent no Origin); absent
# while CORS is off.
_ALLOW_ORIGIN = web.RequestKey("proxy_cors_allow_origin", str)


class OriginNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    policy = request.app[STATE].config.cors
    if not policy.enabled:
        return await handler(request)
    origin = request.headers.get("Origin")
    if origin is None:
        request[_ALLOW_ORIGIN] = ""
        return await handler(request)
    allowed = policy.allows(origin)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return _preflight(request, origin, policy) if allowed else _refused(origin, preflight=True)
    if allowed:
        request[_ALLOW_ORIGIN] = "*" if policy.any_origin else origin
    elif request.headers.get("Sec-Fetch-Site") == "same-origin":
        request[_ALLOW_ORIGIN] = ""  # a page of the proxy's own origin (behind a reverse proxy)
    else:
        return _refused(origin, preflight=False)
    return await handler(request)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """The CORS headers of an answer, added as it is sent: after the handler and the error
    middleware made it, before a stream's first byte."""
    allow = request.get(_ALLOW_ORIGIN)
    if allow is None:
        return
    _vary(response)
    if not allow:
        return
    headers = response.headers
    headers["Access-Control-Allow-Origin"] = allow
    extra = [h for h in headers if h.lower().startswith("x-proxy-") and h.lower() not in _EXPOSED_LOWER]
    headers["Access-Control-Expose-Headers"] = ", ".join((_EXPOSE, *extra)) if extra else _EXPOSE


def _preflight(request: web.Request, origin: str, policy: Cors) -> web.Response:
    asked = request.headers.get("Access-Control-Request-Headers", "")
    stainless = [h for h in (n.strip() for n in asked.split(",")) if h.lower().startswith("x-stainless-")]
    allow_headers = list(ALLOW_HEADERS) + [h for h in stainless if h.lower() not in _ALLOWED_LOWER]
    resp = web.Response(status=204)
    resp.headers["Access-Control-Allow-Origin"] = "*" if policy.any_origin else origin
    resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    resp.headers["Access-Control-Allow-Headers"] = ", ".join(allow_headers)
    resp.headers["Access-Control-Max-Age"] = MAX_AGE
    # Chromium asks before a public page may call a proxy on the user's own machine or network.
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        resp.headers["Access-Control-Allow-Private-Network"] = "true"
    resp.headers["Vary"] = "Origin, Access-Control-Request-Headers"
    return resp


def _refused(origin: str, *, preflight: bool) -> web.Response:
    what = "a cross-origin request (preflight)" if preflight else "cross-origin requests"
    resp = error_response(
        OriginNotAllowed(
            f"The origin {origin!r} may not make {what} to this proxy: add it to server.cors in "
            "proxy.yaml (as scheme://host[:port]) to let pages served from it call.",
            code="origin_not_allowed",
        )
    )
    resp.headers["Vary"] = "Origin"
    return resp


def _vary(response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in {v.strip().lower() for v in vary.split(",")} and vary.strip() != "*":
        response.headers["Vary"] = f"{vary}, Origin"
