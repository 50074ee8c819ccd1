"""The client's body for any of the proxied endpoints: parsed once, checked only as far as
routing needs (the field each endpoint cannot do without, `model`, `stream`).

Everything else in the body is the upstream's business and is forwarded untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequest
from proxy.records import Api

# The field each endpoint needs, as the client must send it; everything else is the upstream's.
_REQUIRED = {
    Api.CHAT: "messages",
    Api.RESPONSES: "input",
    Api.COMPLETIONS: "prompt",
    Api.EMBEDDINGS: "input",
}


@dataclass(slots=True)
class ClientBody:
    api: Api
    payload: dict[str, Any]
    model: str | None
    stream: bool
    client_wants_usage: bool
    size: int
    exact_numbers: bool = False  # parsed by the stdlib: integers beyond 64 bits must survive as sent


# orjson turns integers outside 64 bits into floats; a body with such a long digit run takes the
# slower stdlib parser, which keeps them exact (a long run inside a string costs only speed).
_LONG_DIGITS = re.compile(rb"\d{19,}")


def _loads(raw: bytes) -> tuple[Any, bool]:
    if _LONG_DIGITS.search(raw) is None:
        return orjson.loads(raw), False
    return json.loads(raw, parse_constant=_no_constants), True


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, api: Api = Api.CHAT) -> ClientBody:
    needed = _REQUIRED[api]
    if not raw.strip():
        raise BadRequest(
            f"The request body is empty: send a JSON object with at least '{needed}'.", code="invalid_body"
        )
    try:
        payload, exact = _loads(raw)
    except json.JSONDecodeError as e:  # orjson's error is a subclass
        raise BadRequest(
            f"The request body is not valid JSON ({e.msg} at byte {e.pos}); send a JSON object "
            "with 'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"The request body must be a JSON object, not {_json_type(payload)}.", code="invalid_body")
    if api is Api.CHAT:
        _check_messages(payload.get("messages"))
    else:
        _check_present(payload, needed)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, not {_json_type(model)}.", param="model", code="invalid_type")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(
            f"'stream' must be true or false, not {_json_type(stream)}.", param="stream", code="invalid_type"
        )
    if stream and api is Api.EMBEDDINGS:
        raise BadRequest("Embeddings cannot be streamed: drop 'stream'.", param="stream", code="invalid_value")
    wants_usage = False
    options = payload.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", param="stream_options", code="invalid_type")
        wants_usage = options.get("include_usage") is True
    return ClientBody(api, payload, model, stream, wants_usage, len(raw), exact)


def _check_present(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if value is None:
        raise BadRequest(f"Missing required parameter: '{name}'.", param=name, code="missing_required")
    if not isinstance(value, (str, list)):
        raise BadRequest(
            f"'{name}' must be a string or an array, not {_json_type(value)}.", param=name, code="invalid_type"
        )


def _check_messages(messages: object) -> None:
    if messages is None:
        raise BadRequest("Missing required parameter: 'messages'.", param="messages", code="missing_required")
    if not isinstance(messages, list):
        raise BadRequest(
            f"'messages' must be an array of message objects, not {_json_type(messages)}.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise BadRequest("'messages' must contain at least one message.", param="messages", code="empty_array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(
                f"'messages[{i}]' must be an object with a string 'role'.",
                param=f"messages[{i}]",
                code="invalid_type",
            )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def ask_for_usage(req: ClientBody) -> bool:
    """Make a stream report usage; True when the client did not ask, so the proxy must hide it.
    (A Responses stream always reports it, in `response.completed`.)"""
    if not req.stream or req.client_wants_usage or req.api is Api.RESPONSES:
        return False
    options = req.payload.get("stream_options")
    req.payload["stream_options"] = {**(options or {}), "include_usage": True}
    return True
