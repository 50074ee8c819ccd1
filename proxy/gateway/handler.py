"""POST /v1/chat/completions, /v1/responses, /v1/completions and /v1/embeddings: the request
path, from the body to the answer and its record; one path for all four, which differ only in
the body's required field, the shape of an answer and its stream (body.py, upstream.py, sse.py).

client key -> body -> plan (routing, breakers, budget, the tiers serving the endpoint) -> the
failover loop over one attempt per tier (upstream.py) -> the answer, or a stream relayed as it
comes (relay.py) -> the record, handed to the ledger without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

from aiohttp import web

from proxy.config import Tier
from proxy.errors import BadRequest, NotFound, ProxyError, error_response
from proxy.gateway.body import ClientBody, ask_for_usage, parse_body
from proxy.gateway.client_io import HeldEndStream, end_stream, read_body, start_stream
from proxy.gateway.failover import ChainResult
from proxy.gateway.outbound import Outbound, forwardable_headers
from proxy.gateway.quality import Check
from proxy.gateway.routing import Plan, make_plan, parse_hints
from proxy.gateway.spend import SpendGate, output_ceiling
from proxy.gateway.state import CLIENT_KEY, STATE, ProxyState
from proxy.gateway.upstream import SSE_CONTENT_TYPE, Reply, attempt
from proxy.ops.logs import log_request
from proxy.records import Api, AttemptOutcome, AttemptRecord, CallRecord, CheckResult, Outcome, Route

CHECK_HEADER = "X-Proxy-Check"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: web.Request, state: ProxyState) -> str:
    given = request.headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.match(given):
        return given
    return state.new_request_id()


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, Api.CHAT)


async def post_responses(request: web.Request) -> web.StreamResponse:
    return await _serve(request, Api.RESPONSES)


async def post_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, Api.COMPLETIONS)


async def post_embeddings(request: web.Request) -> web.StreamResponse:
    return await _serve(request, Api.EMBEDDINGS)


async def _serve(request: web.Request, api: Api) -> web.StreamResponse:
    state = request.app[STATE]
    rec = CallRecord(
        request_id=_request_id(request, state),
        started_at=time.time(),
        route=Route.DEFAULT,
        chain=(),
        stream=False,
        requested_model=None,
        api=api,
    )
    close = _RecordCloser(rec, state, time.monotonic())
    try:
        return await _handle(request, state, rec, close)
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
            if last.outcome is AttemptOutcome.CANCELLED and last.error:
                rec.error = last.error  # e.g. the client stopped reading, rather than left
        raise
    finally:
        close()


class _RecordCloser:
    """Hands the record to the ledger and metrics exactly once: before the response is built when possible,
    so the cost it adds shows in X-Proxy-Budget-Remaining; else when the handler ends."""

    __slots__ = ("done", "rec", "spend", "state", "t0")

    def __init__(self, rec: CallRecord, state: ProxyState, t0: float) -> None:
        self.rec, self.state, self.t0, self.done = rec, state, t0, False
        self.spend: SpendGate | None = None

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.rec.duration_ms = (time.monotonic() - self.t0) * 1000.0
            self.state.submit(self.rec)  # the ledger adds its real cost to the budgets here...
            if self.spend is not None:
                self.spend.release()  # ... so its reservations can go
            log_request(self.rec)


async def _handle(request: web.Request, state: ProxyState, rec: CallRecord, close: _RecordCloser) -> web.StreamResponse:
    key = request.get(CLIENT_KEY)
    if key is not None:
        rec.client = key.name
        state.limits.check_spend(key, time.time())
    raw = await read_body(request, state.config.server)
    chat = parse_body(raw, rec.api)
    rec.stream, rec.requested_model = chat.stream, chat.model
    if state.config.ledger.store_text:
        rec.request_body = raw
    hints = parse_hints(request.headers, chat.model)
    plan = serving(
        make_plan(
            state.config,
            hints,
            state.breakers.blocked(time.monotonic()),
            paid_blocked_for=state.budget.reopens_in(time.time()),
        ),
        rec.api,
    )
    rec.route, rec.chain = plan.route, plan.tier_ids
    if plan.route is Route.ESCALATED:
        rec.escalated_for = state.breakers.get(state.config.routing.primary).opened_for
    check = state.quality.check_for(chat.payload, hints.check) if rec.api is Api.CHAT else None
    outbound = _outbound(request, chat, check)
    try:
        outbound.body_for(plan.chain[0])
    except (TypeError, ValueError, RecursionError) as e:  # orjson.JSONEncodeError is a TypeError
        raise BadRequest(
            f"The request body cannot be forwarded: {e} (JSON nested deeper than about 250 levels?).",
            code="invalid_body",
        ) from None
    targets = state.targets  # a reload mid-request must not change where its attempts go
    committed: list[web.StreamResponse] = []
    ceiling = output_ceiling(chat.payload, state.config.budgets.reserve_output_tokens)
    spend = close.spend = state.spend_gate(key, chat.size, ceiling)

    async def commit(tier: Tier, arec: AttemptRecord) -> web.StreamResponse:
        rec.tier, rec.model, rec.ttft_ms = tier.id, arec.model, arec.ttft_ms
        if spend.refused_by is not None:
            rec.route = Route.BUDGET
        headers = _headers(rec, state, arec)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = HeldEndStream.for_api(rec.api, status=200, headers=headers)
        committed.append(resp)
        # A client that left before the first event reached it cancels the request: that is not the tier's failure.
        await start_stream(resp, request, state.config.server)
        return resp

    async def send(tier: Tier, arec: AttemptRecord, timeout: float) -> Reply:
        return await attempt(targets[tier.id], outbound, arec, timeout, commit if chat.stream else None)

    result = await state.failover.run(plan, send, rec.attempts, spend)
    if result.over_budget:
        rec.route = Route.BUDGET
    _finish_record(rec, result)
    if committed:
        if request.transport is None or request.transport.is_closing():
            rec.outcome, rec.error = Outcome.CLIENT_CANCELLED, "client disconnected at the end of the stream"
        close()  # journaled before write_eof releases the end of [DONE]
        await end_stream(committed[0])
        return committed[0]
    close()
    return _respond(rec, result, state)


def _outbound(request: web.Request, chat: ClientBody, check: Check | None) -> Outbound:
    strip = ask_for_usage(chat)
    return Outbound(
        check=check,
        api=chat.api,
        payload=chat.payload,
        headers=forwardable_headers(request.headers),
        stream=chat.stream,
        strip_usage=strip,
        request_bytes=chat.size,
        exact_numbers=chat.exact_numbers,
    )


def serving(plan: Plan, api: Api) -> Plan:
    """The plan without the tiers that do not serve this endpoint (`tiers.<id>.endpoints`)."""
    if all(api in t.endpoints for t in plan.chain):
        return plan
    chain = tuple(t for t in plan.chain if api in t.endpoints)
    if not chain:
        raise NotFound(
            f"No tier of this request's chain ({', '.join(plan.tier_ids)}) serves {api.path}: list it in a "
            "tier's `endpoints` in proxy.yaml if its server has that endpoint.",
            code="endpoint_not_served",
        )
    return dataclasses.replace(plan, chain=chain)


def _finish_record(rec: CallRecord, result: ChainResult) -> None:
    if result.error is not None:
        rec.status, rec.outcome, rec.error = result.error.status, Outcome.ERROR, result.error.message
        return
    last = result.answered or (result.attempts[-1] if result.attempts else None)
    if last is None or result.tier is None:
        return
    rec.tier, rec.model, rec.usage = result.tier.id, last.model, last.usage
    rec.ttft_ms = last.ttft_ms
    if last.checked:
        rec.check = CheckResult.FAILED if last.outcome is AttemptOutcome.INVALID_OUTPUT else CheckResult.PASSED
    if result.refused:
        rec.status, rec.outcome, rec.error = last.http_status or 502, Outcome.ERROR, last.error
    elif last.outcome is AttemptOutcome.OK:
        rec.status, rec.outcome = 200, Outcome.OK
    elif last.outcome is AttemptOutcome.INVALID_OUTPUT:  # every tier answered badly: the last answer
        rec.status, rec.outcome, rec.error = 200, Outcome.OK, last.error
    else:  # a committed stream that broke after its status line went out
        rec.status, rec.outcome, rec.error = 200, Outcome.ERROR, last.error


def _respond(rec: CallRecord, result: ChainResult, state: ProxyState) -> web.StreamResponse:
    if result.error is not None:
        return error_response(result.error, _headers(rec, state))
    reply = result.reply
    assert reply is not None and reply.body is not None
    headers = _headers(rec, state)
    headers["Content-Type"] = reply.content_type or "application/json"
    if reply.content_type == SSE_CONTENT_TYPE:  # a held stream, released whole once checked
        headers["Cache-Control"] = "no-cache"
    if rec.check is CheckResult.PASSED:
        headers[CHECK_HEADER] = "passed"
    elif rec.check is CheckResult.FAILED:
        headers[CHECK_HEADER] = f'failed; reason="{_header_text(rec.error or "")}"'
    return web.Response(status=rec.status, body=reply.body, headers=headers)


def _header_text(text: str) -> str:
    """A reason fit for a quoted header value: printable ASCII, no quotes, bounded."""
    clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return clean[:200]


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
