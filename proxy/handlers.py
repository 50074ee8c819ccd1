"""HTTP handlers: the chat-completions request path, models, health."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import re
import sqlite3
import time

from aiohttp import ClientConnectionResetError, HttpVersion11, web
from aiohttp.web_protocol import RequestPayloadError

from proxy.budget import budget_json
from proxy.chat import ChatRequest, ask_for_usage, parse_chat_body
from proxy.config import Tier
from proxy.errors import (
    BadRequest,
    ExpectationFailed,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    Unavailable,
    error_response,
)
from proxy.failover import ChainResult
from proxy.ledger import Ledger
from proxy.logs import log_request
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Outcome, Route
from proxy.reports import build_report, parse_since
from proxy.routing import make_plan, parse_hints
from proxy.state import CLIENT_KEY, STATE, ProxyState
from proxy.upstream import Outbound, Reply, attempt, forwardable_headers

_OPENAPI = importlib.resources.files("proxy") / "openapi.yaml"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: web.Request, state: ProxyState) -> str:
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.match(given):
        return given
    return state.new_request_id()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rec = CallRecord(
        request_id=_request_id(request, state),
        started_at=time.time(),
        route=Route.DEFAULT,
        chain=(),
        stream=False,
        requested_model=None,
    )
    close = _RecordCloser(rec, state, time.monotonic())
    try:
        return await _serve(request, state, rec, close)
    except ProxyError as e:
        rec.status, rec.outcome, rec.error = e.status, Outcome.ERROR, e.message
        close()
        return error_response(e, _headers(rec, state))
    except asyncio.CancelledError:
        rec.outcome, rec.status = Outcome.CLIENT_CANCELLED, 499
        rec.error = "client disconnected"
        if rec.attempts:  # what the abandoned attempt had used is still owed
            last = rec.attempts[-1]
            rec.usage = rec.usage or last.usage
        raise
    finally:
        close()


class _RecordCloser:
    """Hands the record to the sink exactly once: before the response is built when possible,
    so the cost it adds shows in X-Proxy-Budget-Remaining; else when the handler ends."""

    __slots__ = ("done", "rec", "state", "t0")

    def __init__(self, rec: CallRecord, state: ProxyState, t0: float) -> None:
        self.rec, self.state, self.t0, self.done = rec, state, t0, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.rec.duration_ms = (time.monotonic() - self.t0) * 1000.0
            self.state.sink.submit(self.rec)
            if self.state.metrics is not None:
                self.state.metrics.observe(self.rec)
            log_request(self.rec)


async def _serve(request: web.Request, state: ProxyState, rec: CallRecord, close: _RecordCloser) -> web.StreamResponse:
    key = request.get(CLIENT_KEY)
    if key is not None:
        rec.client = key.name
        state.limits.check_spend(key, time.time())
    raw = await _read_body(request, state)
    chat = parse_chat_body(raw)
    rec.stream, rec.requested_model = chat.stream, chat.model
    if state.config.ledger.store_text:
        rec.request_body = raw
    plan = make_plan(
        state.config,
        parse_hints(request.headers, chat.model),
        state.breakers.blocked(time.monotonic()),
        paid_blocked_for=state.budget.reopens_in(time.time()),
    )
    rec.route, rec.chain = plan.route, plan.tier_ids
    outbound = _outbound(request, chat)
    try:
        outbound.body_for(plan.chain[0])
    except (TypeError, ValueError, RecursionError) as e:  # orjson.JSONEncodeError is a TypeError
        raise BadRequest(
            f"The request body cannot be forwarded: {e} (JSON nested deeper than about 250 levels?).",
            code="invalid_body",
        ) from None
    targets = state.targets  # a reload mid-request must not change where its attempts go
    committed: list[web.StreamResponse] = []

    async def commit(tier: Tier, arec: AttemptRecord) -> web.StreamResponse:
        rec.tier, rec.model, rec.ttft_ms = tier.id, arec.model, arec.ttft_ms
        headers = _headers(rec, state, arec)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        committed.append(resp)
        try:
            await resp.prepare(request)
        except (ConnectionResetError, ClientConnectionResetError):
            # Our client left before the first event reached it: that is not the tier's failure.
            raise asyncio.CancelledError from None
        return resp

    async def send(tier: Tier, arec: AttemptRecord, timeout: float) -> Reply:
        return await attempt(targets[tier.id], outbound, arec, timeout, commit if chat.stream else None)

    result = await state.failover.run(plan, send, rec.attempts)
    _finish_record(rec, result)
    if committed:
        try:
            await committed[0].write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            # The client left right after the last event: it got the answer, but not cleanly.
            rec.outcome, rec.error = Outcome.CLIENT_CANCELLED, "client disconnected at the end of the stream"
        return committed[0]
    close()
    return _respond(rec, result, state)


async def _read_body(request: web.Request, state: ProxyState) -> bytes:
    server = state.config.server
    try:
        async with asyncio.timeout(server.body_read_timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than {server.max_body_bytes} bytes (server.max_body_bytes).",
            code="request_too_large",
        ) from None
    except RequestPayloadError as e:
        raise BadRequest(
            f"The request body cannot be read: {e}. Check its Content-Encoding.", code="invalid_body"
        ) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {server.body_read_timeout_seconds:g} s.",
            code="body_timeout",
        ) from None


def _outbound(request: web.Request, chat: ChatRequest) -> Outbound:
    strip = ask_for_usage(chat)
    return Outbound(
        payload=chat.payload,
        headers=forwardable_headers(request.headers),
        stream=chat.stream,
        strip_usage=strip,
        request_bytes=chat.size,
        exact_numbers=chat.exact_numbers,
    )


def _finish_record(rec: CallRecord, result: ChainResult) -> None:
    last = result.attempts[-1] if result.attempts else None
    if result.error is not None:
        rec.status, rec.outcome, rec.error = result.error.status, Outcome.ERROR, result.error.message
        return
    if last is None or result.tier is None:
        return
    rec.tier, rec.model, rec.usage = result.tier.id, last.model, last.usage
    rec.ttft_ms = last.ttft_ms
    if result.refused:
        rec.status, rec.outcome, rec.error = last.http_status or 502, Outcome.ERROR, last.error
    elif last.outcome is AttemptOutcome.OK:
        rec.status, rec.outcome = 200, Outcome.OK
    else:  # a committed stream that broke after its status line went out
        rec.status, rec.outcome, rec.error = 200, Outcome.ERROR, last.error


def _respond(rec: CallRecord, result: ChainResult, state: ProxyState) -> web.StreamResponse:
    if result.error is not None:
        return error_response(result.error, _headers(rec, state))
    reply = result.reply
    assert reply is not None and reply.body is not None
    headers = _headers(rec, state)
    headers["Content-Type"] = reply.content_type or "application/json"
    return web.Response(status=rec.status, body=reply.body, headers=headers)


def _headers(rec: CallRecord, state: ProxyState, arec: AttemptRecord | None = None) -> dict[str, str]:
    headers = {
        "X-Request-Id": rec.request_id,
        "X-Proxy-Route": rec.route.value,
        "X-Proxy-Attempts": str(arec.n if arec is not None else len(rec.attempts)),
    }
    tier = arec.tier if arec is not None else rec.tier
    model = arec.model if arec is not None else rec.model
    if tier is not None:
        headers["X-Proxy-Tier"] = tier
    if model is not None:
        headers["X-Proxy-Model"] = model
    remaining = state.budget.remaining(time.time())
    if remaining is not None:
        headers["X-Proxy-Budget-Remaining"] = f"{remaining:.6f}"
    return headers


async def list_models(request: web.Request) -> web.Response:
    config = request.app[STATE].config
    data = [{"id": "auto", "object": "model", "created": 0, "owned_by": "proxy"}]
    for t in config.usable_tiers:
        data.append(
            {
                "id": t.id,
                "object": "model",
                "created": 0,
                "owned_by": "proxy",
                "upstream_model": t.model,
                "paid": t.paid,
            }
        )
        data.extend(
            {"id": a, "object": "model", "created": 0, "owned_by": "proxy", "alias_of": t.id} for a in t.aliases
        )
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    assert state.metrics is not None
    body, content_type = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_OPENAPI.read_bytes(), headers={"Content-Type": "application/yaml"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = time.monotonic()
    tiers = {
        t.id: {
            "usable": t.usable,
            "reason": t.skip_reason,
            "breaker": state.breakers.get(t.id).state(now).value,
        }
        for t in state.config.tiers
    }
    ready = bool(state.config.usable_tiers) and state.session is not None
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "config": state.config.source, "tiers": tiers},
        status=200 if ready else 503,
    )


_KNOWN = {"/v1/chat/completions": "POST", "/v1/models": "GET"}


async def report(request: web.Request) -> web.Response:
    """GET /proxy/report?since=24h: the same JSON as `proxy report --json`, plus budget state."""
    state = request.app[STATE]
    if state.ledger_path is None:
        raise NotFound("This proxy runs without a ledger, so there is no report.", code="no_ledger")
    since = request.query.get("since", "24h")
    try:
        parse_since(since, time.time())
    except ValueError as e:
        raise BadRequest(str(e), param="since", code="invalid_since") from None
    sink = state.sink
    if isinstance(sink, Ledger):
        # Include what was just answered; but a broken disk must not hang the report.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await sink.flush()
    try:
        doc = (await build_report(state.ledger_path, since)).to_json()
    except (OSError, sqlite3.Error) as e:
        raise Unavailable(f"The ledger cannot be read: {e}", code="ledger_unavailable") from None
    doc["budget"] = budget_json(state.budget.state(time.time()))
    if isinstance(sink, Ledger):
        doc["ledger"] = dataclasses.asdict(sink.stats)
    return web.json_response(doc)


async def unknown_v1(request: web.Request) -> web.Response:
    allowed = _KNOWN.get(request.path)
    if allowed is not None and allowed != request.method:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    raise NotFound(
        f"Unknown endpoint {request.method} {request.path}: this proxy serves POST /v1/chat/completions "
        "and GET /v1/models.",
        code="unknown_url",
    )


async def expect(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue` is answered as aiohttp does; any other expectation gets a 417 in
    OpenAI's format (aiohttp's own answer is text/plain and skips the middlewares)."""
    value = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if value.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not the start of the real one
        return None
    return error_response(
        ExpectationFailed(
            f"Unsupported Expect header {value!r}: only 100-continue is supported; remove the header.",
            code="expectation_failed",
        )
    )
