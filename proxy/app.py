"""create_app(config): the proxy assembled: the gateway's routes and middlewares, the
operational endpoints, and the lifetimes of what they share (the ledger, the upstream session,
SIGHUP reloads)."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.gateway import catalog, cors, handler
from proxy.gateway.auth import client_keys
from proxy.gateway.client_io import expect, openai_errors
from proxy.gateway.state import STATE, ProxyState
from proxy.ledger import Ledger, StoreError
from proxy.ledger.store import StoreUnusable
from proxy.ops import endpoints
from proxy.ops.reload import sighup_reloads

log = logging.getLogger("proxy")


def create_app(
    config: Config,
    *,
    db_path: str | None = None,
    config_path: str | None = None,
    with_ledger: bool = True,
    require_ledger: bool = False,
    rng: random.Random | None = None,
) -> web.Application:
    """The proxy app. Records go to the SQLite ledger at `db_path` (default: the config's), or
    nowhere with `with_ledger=False` (tests, embedding). With `config_path`, SIGHUP reloads
    that file. With `require_ledger` (`proxy serve`), a ledger that cannot be opened or whose
    spend cannot be read makes the app's startup raise LedgerUnavailable; without it the app
    serves anyway, spilling rows and counting spend from 0."""
    # cors first: its preflights need no client key, and its 403s bypass the rest.
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[cors.cors, openai_errors, client_keys]
    )
    app.on_response_prepare.append(cors.on_prepare)  # CORS headers on every answer, streams included
    ledger_path = (db_path or config.ledger.path) if with_ledger else None
    state = app[STATE] = ProxyState.build(config, ledger_path=ledger_path, rng=rng)
    if state.ledger is not None:
        # Registered first so it is torn down last: the queue drains after the last request.
        app.cleanup_ctx.append(functools.partial(_ledger, required=require_ledger))
    if config.state.url is not None:
        # After the ledger (it seeds the shared spend), so torn down before it: its queue is sent first.
        app.cleanup_ctx.append(_shared_state)
    app.cleanup_ctx.append(_upstream_session)
    if config_path is not None:
        state.config_path = config_path
        app.cleanup_ctx.append(sighup_reloads)
    r = app.router
    # expect: other Expect values than 100-continue get a 417 in OpenAI's format
    r.add_post("/v1/chat/completions", handler.post_chat_completions, expect_handler=expect)
    r.add_post("/v1/responses", handler.post_responses, expect_handler=expect)
    r.add_post("/v1/completions", handler.post_completions, expect_handler=expect)
    r.add_post("/v1/embeddings", handler.post_embeddings, expect_handler=expect)
    r.add_get("/v1/models", catalog.get_models, expect_handler=expect)
    r.add_get("/v1/models/{model_id}", catalog.get_model, expect_handler=expect)
    r.add_get("/healthz", endpoints.get_healthz, expect_handler=expect)
    r.add_get("/readyz", endpoints.get_readyz, expect_handler=expect)
    r.add_get("/proxy/report", endpoints.get_report, expect_handler=expect)
    r.add_get("/metrics", endpoints.get_metrics, expect_handler=expect)
    r.add_get("/openapi.yaml", endpoints.get_openapi, expect_handler=expect)
    r.add_route("*", "/v1/{tail:.*}", catalog.unknown_v1, expect_handler=expect)
    return app


class LedgerUnavailable(Exception):
    """The ledger cannot be opened or read at start: serving would count budgets from $0.
    `lasting`: no retry fixes it (not a database, corrupt, no permission), a person must act."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


async def _ledger(app: web.Application, *, required: bool) -> AsyncIterator[None]:
    state = app[STATE]
    ledger = state.ledger
    assert ledger is not None
    try:
        await ledger.start(required=required)
    except StoreError as e:
        raise LedgerUnavailable(
            _unavailable(ledger, "cannot be opened", e), lasting=isinstance(e, StoreUnusable)
        ) from e
    try:
        await _load_spend(state, ledger, required=required)
    except StoreError as e:
        await ledger.close()
        raise LedgerUnavailable(_unavailable(ledger, "cannot be read", e), lasting=isinstance(e, StoreUnusable)) from e
    try:
        yield
    finally:
        await ledger.close()
        stats = ledger.stats
        log.info(
            "ledger %s closed: %d requests written, %d spilled, %d lost",
            ledger.store.location,
            stats.written,
            stats.spilled,
            stats.failed,
        )


def _unavailable(ledger: Ledger, what: str, e: StoreError) -> str:
    where = ledger.store.location
    return (
        f"the ledger {where} {what}: {e}. Not starting: the budgets and client spend caps would count "
        f"from $0. If the file is damaged or not a ledger, move it aside (mv {where} {where}.broken) "
        "to start a new one or restore it from a backup; if it is unreadable, fix its permissions; "
        "or point ledger.path / --db at the right file"
    )


async def _load_spend(state: ProxyState, ledger: Ledger, *, required: bool) -> None:
    """Spend so far, for the budgets and the client caps: before the first request is served,
    so that nothing counts twice. With `required`, a failure is raised, not counted as $0."""
    loads = (("budget spend", state.budget.load), ("today's spend per client key", state.limits.load))
    for what, load in loads:
        try:
            await load(ledger, time.time())
        except StoreError as e:
            if required:
                raise
            log.error("ledger: cannot load %s from %s: %s; counting from 0", what, ledger.store.location, e)


async def _shared_state(app: web.Application) -> AsyncIterator[None]:
    from proxy.state.shared import SharedState  # only with state.url: redis is not imported otherwise

    state = app[STATE]
    shared = SharedState(state.config, state.budget, state.limits, state.breakers)
    await shared.start(state.ledger)
    state.shared = shared
    state.failover.shared = shared.breakers
    try:
        yield
    finally:
        state.failover.shared = None
        await shared.close()
        state.shared = None


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
