"""A simulated OpenAI-compatible chat-completions upstream: its server and handlers.

Three users share it: `proxy demo` (show the fallback chain with no API key), the test suite
(a fake upstream whose faults are switched on per request) and the benchmark (a built-in
upstream that must not be the bottleneck).  So the happy path is kept cheap: bodies come
from `bodies.py`, every JSON body is produced by orjson, and a stream without pacing is
written in a single write.

Faults are described by a `Behaviour`; `SimSettings.script` queues one per request and
`SimSettings.default` covers the rest.  All state hangs off the app (`SIM_SETTINGS`,
`SIM_STATS`), so several simulated tiers can run side by side in one process.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from proxy.sim import answers, apis, bodies, send
from proxy.sim.settings import SIM_SETTINGS, SIM_STATS, Behaviour, RecordedRequest, SimSettings, SimStats


async def _chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SIM_SETTINGS]
    stats = app[SIM_STATS]
    state = app[send.STATE]
    stats.hits += 1
    number = stats.hits
    stats.active += 1
    record = _record(request, settings, stats)
    try:
        body = await request.read()
        # Every chat request consumes its scripted behaviour, even one rejected below, so a
        # script's positions always match request positions.
        if settings.script:
            behaviour = settings.script.popleft()
        else:
            behaviour = settings.default
            if settings.failure_rate and state.rng.random() < settings.failure_rate:
                behaviour = replace(behaviour, status=503)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if record is not None:
            record.body = body
            record.json = payload
        if not isinstance(payload, dict):
            return web.Response(status=400, body=bodies.BAD_JSON, headers={"Content-Type": bodies.JSON})
        return await _answer(request, settings, state, behaviour, payload, number, len(body))
    except asyncio.CancelledError:
        stats.cancelled += 1
        raise
    except (send.CallerLeft, ConnectionError):
        # Re-raising would make aiohttp log a 500 traceback for an ordinary disconnect;
        # returning lets it notice the dead transport and drop the connection quietly.
        stats.cancelled += 1
        return web.Response()
    except send.ShuttingDown:
        send.cut(request)
        return web.Response()
    finally:
        stats.active -= 1


def _record(request: web.Request, settings: SimSettings, stats: SimStats) -> RecordedRequest | None:
    if not settings.record_requests:
        return None
    # Recorded on arrival (body filled in once read) so a request whose client vanishes
    # mid-upload still shows up.
    record = RecordedRequest(
        method=request.method,
        path=request.path,
        headers={k.lower(): v for k, v in request.headers.items()},
    )
    stats.requests.append(record)
    return record


async def _answer(
    request: web.Request,
    settings: SimSettings,
    state: send.State,
    b: Behaviour,
    payload: dict[str, Any],
    number: int,
    body_len: int,
) -> web.StreamResponse:
    if b.stall:
        await send.pause(request, state, None)
    delay = b.headers_delay
    low, high = settings.latency
    if high > 0:
        delay += state.rng.uniform(low, high)
    await send.pause(request, state, delay)

    stream = payload.get("stream") is True
    headers: dict[str, str] = {}
    if b.retry_after is not None:
        headers["Retry-After"] = b.retry_after
    if settings.simulated_label:
        headers["x-simulated"] = "true"
    if b.location is not None:
        headers["Location"] = b.location
    echo = request.headers.get("Authorization", "") if b.echo_auth else ""
    if echo:
        headers["X-Echo-Authorization"] = echo
    kind = f"; echo={echo}" if echo else ""

    if b.status != 200:
        headers["Content-Type"] = (b.content_type or bodies.JSON) + kind
        data = b.error_body if b.error_body is not None else bodies.error_body(b.status, settings.name)
        if echo:
            data = orjson.dumps({"error": {"message": f"Incorrect API key provided: {echo}", "code": "bad_key"}})
        return await send.whole(request, state, b, b.status, headers, data)

    model = settings.model
    if model is None:
        requested = payload.get("model")
        model = requested if isinstance(requested, str) else settings.name
    model += f" (you sent {echo})" if echo else ""
    label = f"[simulated {settings.name}] " if settings.simulated_label else ""
    label += f"Your key is {echo}. " if echo else ""
    shape = answers.pick(b, settings, state.rng)
    canned = bodies.canned(state.canned, b.chunks, label) if shape is None else answers.fragments(shape, b.chunks)
    finish = bodies.FINISH_FRAGMENT if shape is None else answers.finish_fragment(shape)
    prompt_tokens = max(1, body_len // 4)
    created = int(time.time())
    completion_id = f"chatcmpl-sim-{number}"

    if request.path != "/v1/chat/completions":
        return await _other_api(request, state, b, headers, kind, payload, (shape, canned, number, created, model))
    if stream:
        headers["Content-Type"] = (b.content_type or bodies.SSE) + kind
        headers["Cache-Control"] = "no-cache"
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True and not b.no_usage
        events = bodies.stream_events(
            b, canned, completion_id, created, model, settings.name, include_usage, prompt_tokens, finish
        )
        return await send.stream(request, state, b, headers, events)

    headers["Content-Type"] = (b.content_type or bodies.JSON) + kind
    if b.not_completion:
        data = bodies.NOT_COMPLETION
    elif b.malformed:
        data = b'{"id": "' + completion_id.encode() + b'", "object": "chat.completion", "choices": [{'
    else:
        content = canned.content
        completion_tokens = len(canned.fragments)
        doc = bodies.completion(completion_id, created, model, settings.name, content)
        if shape is not None:
            doc["choices"][0]["message"] = answers.message(shape)
            doc["choices"][0]["finish_reason"] = shape.finish_reason
        if not b.no_usage:
            doc["usage"] = bodies.usage(prompt_tokens, completion_tokens)
        data = orjson.dumps(doc)
        if b.body_size is not None and b.body_size > len(data):
            pad_words = (b.body_size - len(data)) // 4
            doc["choices"][0]["message"]["content"] = content + " pad" * pad_words
            if not b.no_usage:
                doc["usage"] = bodies.usage(prompt_tokens, completion_tokens + pad_words)
            data = orjson.dumps(doc)
    return await send.whole(request, state, b, 200, headers, data)


async def _other_api(
    request: web.Request,
    state: send.State,
    b: Behaviour,
    headers: dict[str, str],
    kind: str,
    payload: dict[str, Any],
    about: tuple[answers.Shape | None, bodies.Canned, int, int, str],
) -> web.StreamResponse:
    """/v1/responses, /v1/completions, /v1/embeddings (sim/apis.py), with the same faults."""
    shape, canned, number, created, model = about
    settings = request.app[SIM_SETTINGS]
    call = apis.Call(
        number,
        created,
        model,
        settings.name,
        shape or answers.Shape(canned.content),
        1 + len(orjson.dumps(payload)) // 4,
    )
    if payload.get("stream") is True and request.path != apis.EMBEDDINGS:
        headers["Content-Type"] = (b.content_type or bodies.SSE) + kind
        headers["Cache-Control"] = "no-cache"
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True and not b.no_usage
        return await send.stream(request, state, b, headers, apis.events(request.path, call, b, include_usage))
    headers["Content-Type"] = (b.content_type or bodies.JSON) + kind
    data = bodies.NOT_COMPLETION if b.not_completion else apis.whole(request.path, call, payload)
    return await send.whole(request, state, b, 200, headers, data)


async def _models(request: web.Request) -> web.Response:
    settings = request.app[SIM_SETTINGS]
    _count(request, settings)
    doc = {
        "object": "list",
        "data": [
            {
                "id": settings.model or settings.name,
                "object": "model",
                "created": 0,
                "owned_by": settings.name,
            }
        ],
    }
    return web.Response(body=orjson.dumps(doc), headers={"Content-Type": bodies.JSON})


async def _health(request: web.Request) -> web.Response:
    _count(request, request.app[SIM_SETTINGS])
    return web.Response(body=bodies.HEALTH, headers={"Content-Type": bodies.JSON})


def _count(request: web.Request, settings: SimSettings) -> None:
    stats = request.app[SIM_STATS]
    stats.hits += 1
    _record(request, settings, stats)


async def _on_shutdown(app: web.Application) -> None:
    # Stalled handlers would otherwise hold runner.cleanup() for its whole shutdown_timeout.
    app[send.STATE].stopping = True


def create_sim_app(settings: SimSettings | None = None) -> web.Application:
    settings = settings if settings is not None else SimSettings()
    app = web.Application()
    app[SIM_SETTINGS] = settings
    app[SIM_STATS] = SimStats()
    app[send.STATE] = send.State(rng=random.Random(settings.seed))
    for path in ("/v1/chat/completions", apis.RESPONSES, apis.COMPLETIONS, apis.EMBEDDINGS):
        app.router.add_post(path, _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.on_shutdown.append(_on_shutdown)
    return app


async def start_sim(
    settings: SimSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve a simulated upstream; returns the runner (call `cleanup()`) and its /v1 base URL."""
    runner = web.AppRunner(create_sim_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        real_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{real_port}/v1"
