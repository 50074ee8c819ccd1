"""What a simulated tier answers when the content matters: a scripted content or tool call, or
a JSON plan that is sometimes bad the way small models' plans are (prose around the JSON, or
JSON cut short at max_tokens), for the quality gate's tests and its economics run."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim.bodies import Canned
from proxy.sim.settings import Behaviour, SimSettings

# The schema every good simulated plan satisfies (for json_schema requests and the checks).
PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "goal": {"type": "string"},
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "action": {"type": "string"}, "done": {"type": "boolean"}},
                "required": ["id", "action", "done"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["goal", "steps"],
    "additionalProperties": False,
}
_ACTIONS = ("gather the facts", "draft the brief", "review the budget", "schedule the launch", "write the summary")


@dataclass(frozen=True, slots=True)
class Shape:
    content: str | None
    tool_calls: tuple[tuple[str, str], ...] = ()  # (function name, arguments JSON text)
    finish_reason: str = "stop"


def plan_json(rng: random.Random) -> str:
    steps = [{"id": i + 1, "action": rng.choice(_ACTIONS), "done": False} for i in range(rng.randint(3, 6))]
    return orjson.dumps({"goal": "ship the quarterly plan", "steps": steps}).decode()


def pick(b: Behaviour, settings: SimSettings, rng: random.Random) -> Shape | None:
    """The answer's shape, or None for the canned prose (the cheap default)."""
    if b.content is not None or b.tool_calls:
        finish = b.finish_reason or ("tool_calls" if b.tool_calls else "stop")
        return Shape(b.content, tuple(b.tool_calls or ()), finish)
    if not (settings.json_plans or settings.bad_answer_rate):
        return None
    good = plan_json(rng)
    if settings.bad_answer_rate and rng.random() < settings.bad_answer_rate:
        if rng.random() < 0.5:
            return Shape(f"Sure! Here is the plan you asked for:\n{good}\nLet me know if it needs changes.")
        return Shape(good[: len(good) // 2], finish_reason="length")
    return Shape(good, finish_reason=b.finish_reason or "stop")


def message(shape: Shape) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": shape.content, "refusal": None}
    if shape.tool_calls:
        msg["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(shape.tool_calls)
        ]
    return msg


def fragments(shape: Shape, chunks: int) -> Canned:
    """The shape as content deltas (`chunks` pieces of the content), then tool-call deltas (each
    call's name first, then its arguments in two pieces), as OpenAI streams them."""
    content = shape.content or ""
    parts: list[dict[str, Any]] = []
    if content:
        size = max(1, -(-len(content) // max(chunks, 1)))
        parts += [{"content": content[i : i + size]} for i in range(0, len(content), size)]
    for i, (name, args) in enumerate(shape.tool_calls):
        head = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}
        half = len(args) // 2
        parts.append({"tool_calls": [head]})
        parts += [{"tool_calls": [{"index": i, "function": {"arguments": p}}]} for p in (args[:half], args[half:]) if p]
    frags = tuple(orjson.dumps({"index": 0, "delta": d, "logprobs": None, "finish_reason": None}) for d in parts)
    return Canned(content=content, fragments=frags)


def finish_fragment(shape: Shape) -> bytes:
    return orjson.dumps({"index": 0, "delta": {}, "logprobs": None, "finish_reason": shape.finish_reason})
