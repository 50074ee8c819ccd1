"""create_app(config): routes, middlewares and the lifetimes of shared resources."""

from __future__ import annotations

import functools
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import aiohttp
from aiohttp import web

from proxy import handlers
from proxy.clients import authenticate
from proxy.config import Config
from proxy.errors import MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError, error_response
from proxy.ledger import Ledger
from proxy.metrics import Metrics, Snapshot
from proxy.records import CallRecord, RecordSink
from proxy.reload import sighup_reloads
from proxy.state import CLIENT_KEY, STATE, ProxyState

log = logging.getLogger("proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_GUARDED = ("/v1/", "/proxy/")


@web.middleware
async def client_keys(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With auth.keys configured, /v1 and /proxy need a valid key, within its rate limit."""
    if request.path.startswith(_GUARDED):
        state = request.app[STATE]
        key = authenticate(state.config, request.headers.get("Authorization"))
        if key is not None:
            state.limits.admit(key, time.monotonic())
            request[CLIENT_KEY] = key
    return await handler(request)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's format, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ProxyError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(_as_proxy_error(request, e))


def _as_proxy_error(request: web.Request, e: web.HTTPException) -> ProxyError:
    if e.status == 404:
        return NotFound(f"Unknown endpoint {request.method} {request.path}.", code="unknown_url")
    if e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        return MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allowed or 'another method'}.",
            code="method_not_allowed",
            headers={"Allow": allowed} if allowed else None,
        )
    if e.status == 413:
        return PayloadTooLarge(f"The request body is too large ({e.reason}).", code="request_too_large")
    err = ProxyError(e.reason or "HTTP error", code=None)
    err.status = e.status
    return err


def create_app(
    config: Config,
    *,
    db_path: str | None = None,
    config_path: str | None = None,
    sink: RecordSink | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """The proxy app. Records go to the SQLite ledger at `db_path` (default: the config's), or,
    when `sink` is given, to that sink instead (tests, embedding). With `config_path`, SIGHUP
    reloads that file."""
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[openai_errors, client_keys])
    state = ProxyState.build(config, rng)
    state.metrics = Metrics(functools.partial(_snapshot, state))
    app[STATE] = state
    if sink is not None:
        state.sink = sink
    else:
        state.ledger_path = db_path or config.ledger.path
        # Registered first so it is torn down last: the queue drains after the last request.
        app.cleanup_ctx.append(_ledger)
    app.cleanup_ctx.append(_upstream_session)
    if config_path is not None:
        state.config_path = config_path
        app.cleanup_ctx.append(sighup_reloads)
    expect = handlers.expect  # other Expect values than 100-continue get a 417 in OpenAI's format
    app.router.add_post("/v1/chat/completions", handlers.chat_completions, expect_handler=expect)
    app.router.add_get("/v1/models", handlers.list_models, expect_handler=expect)
    app.router.add_get("/healthz", handlers.healthz, expect_handler=expect)
    app.router.add_get("/readyz", handlers.readyz, expect_handler=expect)
    app.router.add_get("/proxy/report", handlers.report, expect_handler=expect)
    app.router.add_get("/metrics", handlers.metrics, expect_handler=expect)
    app.router.add_get("/openapi.yaml", handlers.openapi, expect_handler=expect)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.unknown_v1, expect_handler=expect)
    return app


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.ledger_path is not None
    ledger = Ledger(
        state.config,
        state.ledger_path,
        budget=state.budget,
        busy_timeout_ms=state.config.ledger.busy_timeout_ms,
        on_cost=[functools.partial(_count_cost, state)],
    )
    await ledger.start()
    try:
        await state.limits.load(ledger, time.time())
    except sqlite3.Error as e:
        log.error("cannot load today's spend per client key from %s: %s; counting from 0", state.ledger_path, e)
    state.sink = ledger
    try:
        yield
    finally:
        await ledger.close()
        stats = ledger.stats
        log.info(
            "ledger %s closed: %d requests written, %d spilled, %d lost",
            state.ledger_path,
            stats.written,
            stats.spilled,
            stats.failed,
        )


def _count_cost(state: ProxyState, cost: Decimal, rec: CallRecord) -> None:
    """What the ledger priced: toward the client's daily cap and the cost metric."""
    state.limits.record(rec.client, cost, rec.started_at)
    if state.metrics is not None:
        state.metrics.add_cost(rec.tier or (rec.attempts[-1].tier if rec.attempts else "none"), cost)


def _snapshot(state: ProxyState) -> Snapshot:
    sink = state.sink
    return Snapshot(
        breakers=state.breakers.snapshot(time.monotonic()),
        budget_remaining_usd=state.budget.remaining(time.time()),
        ledger=sink.stats if isinstance(sink, Ledger) else None,
        tiers=[t.id for t in state.config.tiers],
    )


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    # No pool-wide cap: each tier's Target gate caps its connections, and a reload may change them.
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    # Accept-Encoding is not sent: the body is relayed as is, and identity costs no CPU to decode.
    # No cookie jar: upstream cookies must not leak between clients, and it costs per request.
    session = aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("Accept-Encoding",), cookie_jar=aiohttp.DummyCookieJar()
    )
    state.session = session
    state.build_targets()
    try:
        yield
    finally:
        state.session = None
        await session.close()
