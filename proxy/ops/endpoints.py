"""The operational endpoints: /healthz, /readyz, /metrics, /proxy/report and /openapi.yaml."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import sqlite3
import time

from aiohttp import web

from proxy import __version__
from proxy.errors import BadRequest, NotFound, Unavailable
from proxy.gateway.state import CLIENT_KEY, STATE
from proxy.ledger.budget import budget_json
from proxy.ledger.report import parse_since
from proxy.ledger.report_read import build_report
from proxy.ops.worker_metrics import WORKER_METRICS

# The document carries the package's version, written once in proxy/__init__.py.
_OPENAPI = importlib.resources.files("proxy") / "openapi.yaml"


async def get_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    """The status code is for probes, which carry no key; with client keys configured, the
    config's path and each tier's state (which tiers exist, which are failing) are only for a
    caller with a valid key (checked by the client_keys middleware)."""
    state = request.app[STATE]
    ready = bool(state.config.usable_tiers) and state.session is not None
    status = 200 if ready else 503
    doc: dict[str, object] = {"status": "ready" if ready else "not_ready"}
    if state.shared is not None:
        # Still ready while Redis is lost (calls are served on this process's own state); said here.
        st = state.shared.status()
        doc["state"] = {
            "backend": st.backend,
            "shared": st.shared,
            "since": st.since,
            "fallbacks": st.fallbacks,
            "processes": st.processes,
        }
        if not st.shared:
            doc["state"]["error"] = st.error  # type: ignore[index]
    if state.config.auth_required and CLIENT_KEY not in request:
        return web.json_response(doc, status=status)
    now = time.monotonic()
    tiers = {
        t.id: {
            "usable": t.usable,
            "reason": t.skip_reason,
            "breaker": state.breakers.get(t.id).state(now).value,
        }
        for t in state.config.tiers
    }
    return web.json_response({**doc, "config": state.config.source, "tiers": tiers}, status=status)


async def get_metrics(request: web.Request) -> web.Response:
    workers = request.app.get(WORKER_METRICS)  # set by `proxy serve --workers N` only
    if workers is None:
        body, content_type = request.app[STATE].metrics.render()
    else:
        body, content_type = await workers.render(request.app)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_openapi(request: web.Request) -> web.Response:
    body = _OPENAPI.read_bytes().replace(b"__VERSION__", __version__.encode(), 1)
    return web.Response(body=body, headers={"Content-Type": "application/yaml"})


async def get_report(request: web.Request) -> web.Response:
    """GET /proxy/report?since=24h: the same JSON as `proxy report --json`, plus budget state."""
    state = request.app[STATE]
    ledger = state.ledger
    if ledger is None:
        raise NotFound("This proxy runs without a ledger, so there is no report.", code="no_ledger")
    since = request.query.get("since", "24h")
    try:
        parse_since(since, time.time())
    except ValueError as e:
        raise BadRequest(str(e), param="since", code="invalid_since") from None
    # Include what was just answered; but a broken disk must not hang the report.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await ledger.flush()
    try:
        doc = (await build_report(ledger.store, since)).to_json()
    except (OSError, sqlite3.Error) as e:
        raise Unavailable(f"The ledger cannot be read: {e}", code="ledger_unavailable") from None
    doc["budget"] = budget_json(state.budget.state(time.time()))
    doc["ledger"] = dataclasses.asdict(ledger.stats)
    return web.json_response(doc)
