"""The proxy's own errors, and the one function that puts any of them on the wire.

ProxyError                      an error the proxy answers with, in OpenAI's format
├── BadRequest          400     the client's request or headers are wrong
├── Unauthorized        401     missing or wrong client key
├── NotFound            404     unknown path, or `model_not_found`
├── MethodNotAllowed    405
├── RequestTimeout      408     the body did not arrive in time
├── PayloadTooLarge     413
├── ExpectationFailed   417     an Expect header other than 100-continue
├── RateLimited         429     client limits and budgets (always with Retry-After)
├── Unavailable         503     no tier can take this request (every breaker open: with Retry-After)
└── ChainFailed         502/504 every attempt failed; the message lists each attempt
                        (429 when every tier was rate limiting: with the upstreams' Retry-After)

Whether a client should retry is said by `x-should-retry` (RETRY_ADVICE, by error code): the
OpenAI SDKs obey it before their own rules, so a chain the proxy already walked is not walked
again by the SDK's default retries.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


class ProxyError(Exception):
    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class ExpectationFailed(ProxyError):
    status = 417
    type = "invalid_request_error"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"


class Unavailable(ProxyError):
    status = 503
    type = "service_unavailable"


class ChainFailed(ProxyError):
    type = "upstream_error"

    def __init__(self, message: str, *, status: int, code: str, headers: Mapping[str, str] | None = None):
        super().__init__(message, code=code, headers=headers)
        self.status = status


# x-should-retry per error code; codes not listed send no advice (the client's own rules apply).
RETRY_ADVICE: Mapping[str, bool] = {
    # The proxy already retried and failed over: a client retry would only walk the chain again.
    "upstream_failed": False,
    "upstream_timeout": False,
    "upstream_rate_limited": False,
    "deadline_exceeded": False,
    # Every breaker is open: nothing will be tried before Retry-After.
    "all_tiers_open": False,
    # Configuration or money: no retry helps before an operator acts or the window resets.
    "no_tier_available": False,
    "tier_unavailable": False,
    "budget_exhausted": False,
    "daily_budget_exhausted": False,
    # A client key's requests_per_minute: after Retry-After (under a minute) the call goes through,
    # and the refused one cost no upstream call.
    "rate_limit_exceeded": True,
}
SHOULD_RETRY = "x-should-retry"


def error_json(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_response(err: ProxyError, extra_headers: Mapping[str, str] | None = None) -> web.Response:
    headers = {**err.headers, **(extra_headers or {})}
    advice = RETRY_ADVICE.get(err.code or "")
    if advice is not None:
        headers.setdefault(SHOULD_RETRY, "true" if advice else "false")
    return web.Response(
        status=err.status,
        body=error_json(err.message, err.type, err.code, err.param),
        content_type="application/json",
        headers=headers,
    )
