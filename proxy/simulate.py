"""A simulated OpenAI-compatible chat-completions upstream.

Three users share it: `proxy demo` (show the fallback chain with no API key), the test suite
(a fake upstream whose faults are switched on per request) and the benchmark (a built-in
upstream that must not be the bottleneck).  So the happy path is kept cheap: the per-shape
content fragments are built once and cached, every JSON body is produced by orjson, and a
stream without pacing is written in a single write.

Faults are described by a `Behaviour`; `SimSettings.script` queues one per request and
`SimSettings.default` covers the rest.  All state hangs off the app (`SIM_SETTINGS`,
`SIM_STATS`), so several simulated tiers can run side by side in one process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "SIM_SETTINGS",
    "SIM_STATS",
    "Behaviour",
    "RecordedRequest",
    "SimSettings",
    "SimStats",
    "create_sim_app",
    "start_sim",
]


@dataclass(slots=True)
class Behaviour:
    """What the upstream does for one request; the defaults give a fast, valid answer."""

    status: int = 200
    error_body: bytes | None = None
    retry_after: str | None = None
    headers_delay: float = 0.0
    first_event_delay: float = 0.0
    keepalive_interval: float | None = None
    chunk_delay: float = 0.0
    chunks: int = 8
    # Streams: content events sent before the connection is cut.  Non-stream: body bytes sent
    # (clamped so the body is always incomplete; 0 = headers only).
    drop_after: int | None = None
    malformed: bool = False
    not_completion: bool = False
    no_done: bool = False
    no_usage: bool = False
    stall: bool = False
    stall_after_headers: bool = False
    trickle: float | None = None
    content_type: str | None = None
    body_size: int | None = None

    def __post_init__(self) -> None:
        if self.chunks < 0:
            raise ValueError("chunks must be >= 0")
        if self.drop_after is not None and self.drop_after < 0:
            raise ValueError("drop_after must be >= 0")
        if self.keepalive_interval is not None and self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be > 0")


@dataclass(slots=True)
class SimSettings:
    name: str = "sim"
    model: str | None = None  # None: echo the request's model
    default: Behaviour = field(default_factory=Behaviour)
    script: deque[Behaviour] = field(default_factory=deque)
    failure_rate: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    seed: int | None = None
    simulated_label: bool = False
    # The benchmark sends hundreds of thousands of requests; keeping every body would make
    # the simulator's memory, not the proxy, the thing being measured.
    record_requests: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.script, deque):
            # Accept a plain list for convenience; popleft() needs a deque.
            self.script = deque(self.script)
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        low, high = self.latency
        if low < 0 or high < low:
            raise ValueError("latency must be (low, high) with 0 <= low <= high")


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased: HTTP header names are case-insensitive
    body: bytes = b""
    json: Any = None  # None when the body is empty or not JSON


@dataclass(slots=True)
class SimStats:
    hits: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    active: int = 0
    cancelled: int = 0


@dataclass(frozen=True, slots=True)
class _Canned:
    content: str
    fragments: tuple[bytes, ...]  # one `choices[0]` JSON object per content delta


@dataclass(slots=True)
class _State:
    rng: random.Random
    canned: dict[tuple[int, str], _Canned] = field(default_factory=dict)
    stopping: bool = False


SIM_SETTINGS = web.AppKey("sim_settings", SimSettings)
SIM_STATS = web.AppKey("sim_stats", SimStats)
_STATE = web.AppKey("sim_state", _State)

_WORDS = (
    *("This", "is", "a", "simulated", "answer", "so", "you", "can", "watch", "the", "proxy"),
    *("route", "each", "request", "through", "its", "fallback", "chain", "without", "any"),
    *("API", "key", "or", "model", "download"),
)
_FINGERPRINT = "fp_sim"
_ROLE_FRAGMENT = orjson.dumps(
    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
)
_FINISH_FRAGMENT = orjson.dumps({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_HEALTH = b'{"status":"ok"}'
_NOT_COMPLETION = b'{"hello":1}'
_JSON = "application/json"
_SSE = "text/event-stream"
_BAD_JSON = orjson.dumps(
    {
        "error": {
            "message": "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
)
# How often a long wait looks for a vanished client: aiohttp only cancels handlers when the
# server was built with handler_cancellation=True, which we cannot rely on.
_POLL_SECONDS = 0.02
_CANNED_CACHE_MAX = 256


class _ClientGone(Exception):
    pass


class _ShuttingDown(Exception):
    pass


def _canned(state: _State, chunks: int, label: str) -> _Canned:
    key = (chunks, label)
    found = state.canned.get(key)
    if found is not None:
        return found
    pieces = [(" " if i else label) + _WORDS[i % len(_WORDS)] for i in range(chunks)]
    if not pieces and label:
        pieces = [label.rstrip()]
    made = _Canned(
        content="".join(pieces),
        fragments=tuple(
            orjson.dumps({"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}) for p in pieces
        ),
    )
    if len(state.canned) >= _CANNED_CACHE_MAX:
        # Shapes come from test/benchmark settings, so a handful at most; this only guards
        # against a caller sweeping `chunks` over a huge range.
        state.canned.clear()
    state.canned[key] = made
    return made


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _error_body(status: int, name: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": f"simulated {status} from {name}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )


async def _pause(request: web.Request, state: _State, seconds: float | None) -> None:
    """Sleep `seconds` (None: forever), ending early if the client or the server goes away."""
    if seconds is not None and seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while True:
        if state.stopping:
            raise _ShuttingDown
        transport = request.transport
        if transport is None or transport.is_closing():
            raise _ClientGone
        if deadline is None:
            step = _POLL_SECONDS
        else:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            step = min(remaining, _POLL_SECONDS)
        await asyncio.sleep(step)


async def _send(
    request: web.Request, state: _State, resp: web.StreamResponse, data: bytes, trickle: float | None
) -> None:
    if trickle is None:
        await resp.write(data)
        return
    for i in range(len(data)):
        await resp.write(data[i : i + 1])
        await _pause(request, state, trickle)


def _cut(request: web.Request) -> None:
    # close(), not abort(): the part already written must reach the client before the FIN,
    # otherwise the fault would look like "nothing received" rather than "dropped mid-way".
    transport = request.transport
    if transport is not None:
        transport.close()


async def _chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SIM_SETTINGS]
    stats = app[SIM_STATS]
    state = app[_STATE]
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
            return web.Response(status=400, body=_BAD_JSON, headers={"Content-Type": _JSON})
        return await _answer(request, settings, state, behaviour, payload, number, len(body))
    except asyncio.CancelledError:
        stats.cancelled += 1
        raise
    except (_ClientGone, ConnectionError):
        # Re-raising would make aiohttp log a 500 traceback for an ordinary disconnect;
        # returning lets it notice the dead transport and drop the connection quietly.
        stats.cancelled += 1
        return web.Response()
    except _ShuttingDown:
        _cut(request)
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
    state: _State,
    b: Behaviour,
    payload: dict[str, Any],
    number: int,
    body_len: int,
) -> web.StreamResponse:
    if b.stall:
        await _pause(request, state, None)
    delay = b.headers_delay
    low, high = settings.latency
    if high > 0:
        delay += state.rng.uniform(low, high)
    await _pause(request, state, delay)

    stream = payload.get("stream") is True
    headers: dict[str, str] = {}
    if b.retry_after is not None:
        headers["Retry-After"] = b.retry_after
    if settings.simulated_label:
        headers["x-simulated"] = "true"

    if b.status != 200:
        headers["Content-Type"] = b.content_type or _JSON
        data = b.error_body if b.error_body is not None else _error_body(b.status, settings.name)
        return await _whole(request, state, b, b.status, headers, data)

    model = settings.model
    if model is None:
        requested = payload.get("model")
        model = requested if isinstance(requested, str) else settings.name
    label = f"[simulated {settings.name}] " if settings.simulated_label else ""
    canned = _canned(state, b.chunks, label)
    prompt_tokens = max(1, body_len // 4)
    created = int(time.time())
    completion_id = f"chatcmpl-sim-{number}"

    if stream:
        headers["Content-Type"] = b.content_type or _SSE
        headers["Cache-Control"] = "no-cache"
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True and not b.no_usage
        events = _stream_events(b, canned, completion_id, created, model, settings.name, include_usage, prompt_tokens)
        return await _stream(request, state, b, headers, events)

    headers["Content-Type"] = b.content_type or _JSON
    if b.not_completion:
        data = _NOT_COMPLETION
    elif b.malformed:
        data = b'{"id": "' + completion_id.encode() + b'", "object": "chat.completion", "choices": [{'
    else:
        content = canned.content
        completion_tokens = len(canned.fragments)
        doc = _completion(completion_id, created, model, settings.name, content)
        if not b.no_usage:
            doc["usage"] = _usage(prompt_tokens, completion_tokens)
        data = orjson.dumps(doc)
        if b.body_size is not None and b.body_size > len(data):
            pad_words = (b.body_size - len(data)) // 4
            doc["choices"][0]["message"]["content"] = content + " pad" * pad_words
            if not b.no_usage:
                doc["usage"] = _usage(prompt_tokens, completion_tokens + pad_words)
            data = orjson.dumps(doc)
    return await _whole(request, state, b, 200, headers, data)


def _completion(completion_id: str, created: int, model: str, name: str, content: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "system_fingerprint": _FINGERPRINT,
        # Not in OpenAI's schema: lets tests check that unknown fields pass through.
        "sim_tier": name,
    }


def _stream_events(
    b: Behaviour,
    canned: _Canned,
    completion_id: str,
    created: int,
    model: str,
    name: str,
    include_usage: bool,
    prompt_tokens: int,
) -> list[bytes]:
    """The stream's events in order: role, [malformed], content..., finish, [usage], [DONE].

    With drop_after set, only what precedes the cut."""
    if b.not_completion:
        events = [b"data: " + _NOT_COMPLETION + b"\n\n"]
        if not b.no_done:
            events.append(_DONE)
        return events
    head = orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "sim_tier": name,
        }
    )
    # Splice the constant per-stream envelope around the cached choice fragments instead of
    # serialising one dict per event.
    prefix = b"data: " + head[:-1] + b',"choices":['
    # OpenAI sends "usage": null on every chunk but the last once include_usage is on.
    suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    events = [prefix + _ROLE_FRAGMENT + suffix]
    if b.malformed:
        events.append(b'data: {"id": "' + completion_id.encode() + b'", "choices": [{"delta": \n\n')
    fragments = canned.fragments
    if b.drop_after is not None:
        # The cut always comes before the finish chunk, even when drop_after exceeds the
        # content, so a drop is always a truncated stream.
        events.extend(prefix + fragment + suffix for fragment in fragments[: b.drop_after])
        return events
    events.extend(prefix + fragment + suffix for fragment in fragments)
    events.append(prefix + _FINISH_FRAGMENT + suffix)
    if include_usage:
        usage = orjson.dumps(_usage(prompt_tokens, len(canned.fragments)))
        events.append(prefix + b'],"usage":' + usage + b"}\n\n")
    if not b.no_done:
        events.append(_DONE)
    return events


async def _whole(
    request: web.Request,
    state: _State,
    b: Behaviour,
    status: int,
    headers: dict[str, str],
    data: bytes,
) -> web.StreamResponse:
    """Send a complete (non-SSE) body, applying the faults that apply to one."""
    if not (b.stall_after_headers or b.trickle is not None or b.drop_after is not None):
        return web.Response(status=status, body=data, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = len(data)
    await resp.prepare(request)
    if b.stall_after_headers:
        await _pause(request, state, None)
    if b.drop_after is not None:
        await _send(request, state, resp, data[: min(b.drop_after, max(len(data) - 1, 0))], b.trickle)
        _cut(request)
        return resp
    await _send(request, state, resp, data, b.trickle)
    await resp.write_eof()
    return resp


async def _stream(
    request: web.Request,
    state: _State,
    b: Behaviour,
    headers: dict[str, str],
    events: list[bytes],
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=headers)
    await resp.prepare(request)
    if b.stall_after_headers:
        await _pause(request, state, None)
    await _first_event_wait(request, state, resp, b)
    if b.chunk_delay <= 0 and b.trickle is None:
        await resp.write(b"".join(events))
    else:
        for i, event in enumerate(events):
            if i:
                await _pause(request, state, b.chunk_delay)
            await _send(request, state, resp, event, b.trickle)
    if b.drop_after is not None:
        _cut(request)
        return resp
    await resp.write_eof()
    return resp


async def _first_event_wait(request: web.Request, state: _State, resp: web.StreamResponse, b: Behaviour) -> None:
    if b.keepalive_interval is None:
        await _pause(request, state, b.first_event_delay)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + b.first_event_delay
    while (remaining := deadline - loop.time()) > 0:
        await _pause(request, state, min(b.keepalive_interval, remaining))
        if deadline - loop.time() > 0:
            await _send(request, state, resp, _KEEPALIVE, b.trickle)


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
    return web.Response(body=orjson.dumps(doc), headers={"Content-Type": _JSON})


async def _health(request: web.Request) -> web.Response:
    _count(request, request.app[SIM_SETTINGS])
    return web.Response(body=_HEALTH, headers={"Content-Type": _JSON})


def _count(request: web.Request, settings: SimSettings) -> None:
    stats = request.app[SIM_STATS]
    stats.hits += 1
    _record(request, settings, stats)


async def _on_shutdown(app: web.Application) -> None:
    # Stalled handlers would otherwise hold runner.cleanup() for its whole shutdown_timeout.
    app[_STATE].stopping = True


def create_sim_app(settings: SimSettings | None = None) -> web.Application:
    settings = settings if settings is not None else SimSettings()
    app = web.Application()
    app[SIM_SETTINGS] = settings
    app[SIM_STATS] = SimStats()
    app[_STATE] = _State(rng=random.Random(settings.seed))
    app.router.add_post("/v1/chat/completions", _chat)
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
