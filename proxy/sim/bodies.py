"""The simulated upstream's bodies: completions, stream events and errors, built cheaply.

The per-shape content fragments are built once and cached, and a stream's constant envelope
is spliced around them instead of serialising one dict per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim.settings import Behaviour

WORDS = (
    *("This", "is", "a", "simulated", "answer", "so", "you", "can", "watch", "the", "proxy"),
    *("route", "each", "request", "through", "its", "fallback", "chain", "without", "any"),
    *("API", "key", "or", "model", "download"),
)
FINGERPRINT = "fp_sim"
ROLE_FRAGMENT = orjson.dumps(
    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
)
FINISH_FRAGMENT = orjson.dumps({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
HEALTH = b'{"status":"ok"}'
NOT_COMPLETION = b'{"hello":1}'
JSON = "application/json"
SSE = "text/event-stream"
BAD_JSON = orjson.dumps(
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
_CANNED_CACHE_MAX = 256


@dataclass(frozen=True, slots=True)
class Canned:
    content: str
    fragments: tuple[bytes, ...]  # one `choices[0]` JSON object per content delta


def canned(cache: dict[tuple[int, str], Canned], chunks: int, label: str) -> Canned:
    key = (chunks, label)
    found = cache.get(key)
    if found is not None:
        return found
    pieces = [(" " if i else label) + WORDS[i % len(WORDS)] for i in range(chunks)]
    if not pieces and label:
        pieces = [label.rstrip()]
    made = Canned(
        content="".join(pieces),
        fragments=tuple(
            orjson.dumps({"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}) for p in pieces
        ),
    )
    if len(cache) >= _CANNED_CACHE_MAX:
        # Shapes come from test/benchmark settings, so a handful at most; this only guards
        # against a caller sweeping `chunks` over a huge range.
        cache.clear()
    cache[key] = made
    return made


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def error_body(status: int, name: str) -> bytes:
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


def completion(completion_id: str, created: int, model: str, name: str, content: str) -> dict[str, Any]:
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
        "system_fingerprint": FINGERPRINT,
        # Not in OpenAI's schema: lets tests check that unknown fields pass through.
        "sim_tier": name,
    }


def stream_events(
    b: Behaviour,
    canned: Canned,
    completion_id: str,
    created: int,
    model: str,
    name: str,
    include_usage: bool,
    prompt_tokens: int,
    finish: bytes = FINISH_FRAGMENT,
) -> list[bytes]:
    """The stream's events in order: role, [malformed], content..., finish, [usage], [DONE].

    With drop_after set, only what precedes the cut."""
    if b.not_completion:
        events = [b"data: " + NOT_COMPLETION + b"\n\n"]
        if not b.no_done:
            events.append(DONE)
        return events
    head = orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "sim_tier": name,
        }
    )
    # Splice the constant per-stream envelope around the cached choice fragments instead of
    # serialising one dict per event.
    prefix = b"data: " + head[:-1] + b',"choices":['
    # OpenAI sends "usage": null on every chunk but the last once include_usage is on.
    suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    events = [prefix + ROLE_FRAGMENT + suffix]
    if b.malformed:
        events.append(b'data: {"id": "' + completion_id.encode() + b'", "choices": [{"delta": \n\n')
    fragments = canned.fragments
    if b.drop_after is not None:
        # The cut always comes before the finish chunk, even when drop_after exceeds the
        # content, so a drop is always a truncated stream.
        events.extend(prefix + fragment + suffix for fragment in fragments[: b.drop_after])
        return events
    events.extend(prefix + fragment + suffix for fragment in fragments)
    events.append(prefix + finish + suffix)
    if include_usage:
        usage_json = orjson.dumps(usage(prompt_tokens, len(canned.fragments)))
        events.append(prefix + b'],"usage":' + usage_json + b"}\n\n")
    if not b.no_done:
        events.append(DONE)
    return events
