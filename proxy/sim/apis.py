"""The simulated tier's answers on the endpoints besides chat completions: the Responses API,
legacy completions and embeddings, plain and streamed, in the shapes OpenAI sends them.

The same knobs apply as for chat (sim/settings.Behaviour): the content or tool calls come from
sim/answers.py when set, `chunks` pieces per stream, `drop_after` cuts a stream before its end,
`no_done` leaves out its last event ([DONE], or a Responses stream's `response.completed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim.answers import Shape
from proxy.sim.settings import Behaviour

RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
_DIMENSIONS = 8


@dataclass(frozen=True, slots=True)
class Call:
    """What one answer is about: ids, the model, the answer's shape, token counts."""

    number: int
    created: int
    model: str
    name: str
    shape: Shape
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return max(1, len(self.shape.content or "") // 4 + sum(len(a) // 4 for _, a in self.shape.tool_calls))


def whole(path: str, call: Call, payload: dict[str, Any]) -> bytes:
    if path == EMBEDDINGS:
        return orjson.dumps(_embeddings(call, payload))
    if path == COMPLETIONS:
        doc = _completion(call, call.shape.content or "", call.shape.finish_reason)
        doc["usage"] = _chat_usage(call)
        return orjson.dumps(doc)
    return orjson.dumps(_response(call, "completed"))


def events(path: str, call: Call, b: Behaviour, include_usage: bool) -> list[bytes]:
    pieces = _pieces(call.shape.content or "", b.chunks)
    if b.drop_after is not None:
        pieces = pieces[: b.drop_after]
    if path == COMPLETIONS:
        out = [_data(_completion(call, p, None)) for p in pieces]
        if b.drop_after is not None:
            return out
        out.append(_data(_completion(call, "", call.shape.finish_reason)))
        if include_usage:
            out.append(_data({**_completion(call, "", None), "choices": [], "usage": _chat_usage(call)}))
        return out if b.no_done else [*out, b"data: [DONE]\n\n"]
    return _response_events(call, pieces, b)


def _response_events(call: Call, pieces: list[str], b: Behaviour) -> list[bytes]:
    item = f"msg_sim_{call.number}"
    seq = iter(range(10_000))
    out = [
        _event({"type": "response.created", "response": _response(call, "in_progress", empty=True)}, seq),
        _event({"type": "response.in_progress", "response": _response(call, "in_progress", empty=True)}, seq),
        _event(
            {"type": "response.output_item.added", "output_index": 0, "item": _message(item, "", "in_progress")}, seq
        ),
        _event({"type": "response.content_part.added", **_part(item, "")}, seq),
    ]
    out += [
        _event(
            {"type": "response.output_text.delta", "item_id": item, "output_index": 0, "content_index": 0, "delta": p},
            seq,
        )
        for p in pieces
    ]
    if b.drop_after is not None:
        return out
    text = call.shape.content or ""
    out.append(
        _event(
            {"type": "response.output_text.done", "item_id": item, "output_index": 0, "content_index": 0, "text": text},
            seq,
        )
    )
    out.append(_event({"type": "response.content_part.done", **_part(item, text)}, seq))
    out.append(
        _event({"type": "response.output_item.done", "output_index": 0, "item": _message(item, text, "completed")}, seq)
    )
    if not b.no_done:
        out.append(_event({"type": "response.completed", "response": _response(call, "completed")}, seq))
    return out


def _response(call: Call, status: str, *, empty: bool = False) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if not empty:
        if call.shape.content is not None:
            output.append(_message(f"msg_sim_{call.number}", call.shape.content, "completed"))
        output += [
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": f"call_{i}",
                "name": n,
                "arguments": a,
                "status": "completed",
            }
            for i, (n, a) in enumerate(call.shape.tool_calls)
        ]
    usage = None
    if status == "completed":
        usage = {
            "input_tokens": call.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": call.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": call.prompt_tokens + call.completion_tokens,
        }
    return {
        "id": f"resp_sim_{call.number}",
        "object": "response",
        "created_at": call.created,
        "status": status,
        "error": None,
        "model": call.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
        "sim_tier": call.name,
    }


def _part(item: str, text: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"item_id": item, "output_index": 0, "content_index": 0, "part": part}


def _message(item: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text or status == "completed" else []
    return {"type": "message", "id": item, "status": status, "role": "assistant", "content": content}


def _completion(call: Call, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": f"cmpl-sim-{call.number}",
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "sim_tier": call.name,
    }


def _embeddings(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    given = payload.get("input")
    inputs = given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [round((i + 1) * 0.125 * (d + 1), 3) for d in range(_DIMENSIONS)],
        }
        for i in range(len(inputs))
    ]
    usage = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
    return {"object": "list", "data": data, "model": call.model, "usage": usage, "sim_tier": call.name}


def _chat_usage(call: Call) -> dict[str, Any]:
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
    }


def _pieces(text: str, chunks: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(chunks, 1)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _data(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _event(doc: dict[str, Any], seq: Any) -> bytes:
    doc["sequence_number"] = next(seq)
    return b"event: " + str(doc["type"]).encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"
