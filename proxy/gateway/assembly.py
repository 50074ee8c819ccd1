"""A streamed chat completion put back together, so the quality gate can judge it whole.

Only checked streams pay for this: every `data:` event is decoded, and content, refusal and
tool-call deltas are concatenated the way the OpenAI SDK accumulates them (strings append,
tool calls by their `index`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

_DONE = b"[DONE]"


@dataclass(slots=True)
class _Call:
    id: str | None = None
    type: str = "function"
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Choice:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None


@dataclass(slots=True)
class StreamAssembly:
    choices: dict[int, _Choice] = field(default_factory=dict)

    def feed(self, events: bytes) -> None:
        """Whole events (as StreamWatch releases them); comments and [DONE] are skipped."""
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == _DONE:
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue  # the relay reports a broken stream; here only answers are judged
            if isinstance(chunk, dict) and isinstance(chunk.get("choices"), list):
                for c in chunk["choices"]:
                    if isinstance(c, dict):
                        self._add(c)

    def _add(self, c: dict[str, Any]) -> None:
        index = c.get("index", 0)
        choice = self.choices.get(index if isinstance(index, int) else 0)
        if choice is None:
            choice = self.choices[index if isinstance(index, int) else 0] = _Choice()
        delta = c.get("delta")
        if isinstance(delta, dict):
            _append(choice.content, delta.get("content"))
            _append(choice.refusal, delta.get("refusal"))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for tc in calls:
                    if isinstance(tc, dict):
                        _add_call(choice, tc)
        finish = c.get("finish_reason")
        if isinstance(finish, str):
            choice.finish_reason = finish

    def doc(self) -> dict[str, Any]:
        """The stream as a non-streamed completion body (only what the gate reads)."""
        return {"choices": [_message(i, self.choices[i]) for i in sorted(self.choices)]}


def _append(parts: list[str], piece: object) -> None:
    if isinstance(piece, str) and piece:
        parts.append(piece)


def _add_call(choice: _Choice, tc: dict[str, Any]) -> None:
    index = tc.get("index", len(choice.calls))
    call = choice.calls.setdefault(index if isinstance(index, int) else len(choice.calls), _Call())
    if isinstance(tc.get("id"), str):
        call.id = tc["id"]
    if isinstance(tc.get("type"), str):
        call.type = tc["type"]
    fn = tc.get("function")
    if isinstance(fn, dict):
        _append(call.name, fn.get("name"))
        _append(call.arguments, fn.get("arguments"))


def _message(index: int, choice: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(choice.content) if choice.content else None,
        "refusal": "".join(choice.refusal) if choice.refusal else None,
    }
    if choice.calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {"name": "".join(call.name), "arguments": "".join(call.arguments)},
            }
            for _, call in sorted(choice.calls.items())
        ]
    return {"index": index, "message": message, "finish_reason": choice.finish_reason}
