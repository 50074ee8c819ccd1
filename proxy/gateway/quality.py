"""The quality gate: is a 200 answer what the client asked for?

The tiers' success rates that the routing rules are built on (a small model gives a usable plan
85-90% of the time) are about answers, not transport. So an answer that is not the JSON, the
schema or the tool call the request asked for, that was cut at max_tokens or is empty, is a
failed attempt (`invalid_output`): retried, failed over, counted by the tier's breaker.

`QualityGate.check_for` reads the request once (response_format, tools, tool_choice and the
X-Proxy-Check hint) into a `Check`, or None when nothing is to be checked: a request that asks
for no structure costs two dict lookups. Schemas are compiled once per distinct schema
(jsonschema-rs: a compiled Rust validator, every draft OpenAI accepts, no network access), so a
checked answer costs a parse of its content and one validation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson

from proxy.config import QualitySpec
from proxy.errors import BadRequest

CHECK_VALUES = ("auto", "json", "off")
_REASON_CHARS = 300


@dataclass(frozen=True, slots=True)
class Check:
    """What one request's answer must be. `judge` returns why it is bad, or None."""

    json: bool  # the content must be a JSON object (json_object, or X-Proxy-Check: json)
    schema: jsonschema_rs.Validator | None  # ... or valid against response_format's schema
    tools: Mapping[str, jsonschema_rs.Validator | None] | None  # offered function -> its parameters
    required_tool: str | bool = False  # True: tool_choice "required"; a name: that function
    cut_or_empty: bool = True
    hold: bool = True  # streams wait until complete and checked

    def judge(self, doc: Mapping[str, Any]) -> str | None:
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices:
            return "the answer has no choices"
        for i, choice in enumerate(choices):
            why = self._judge_choice(choice if isinstance(choice, dict) else {})
            if why is not None:
                return _short(why if len(choices) == 1 else f"choice {i}: {why}")
        return None

    def _judge_choice(self, choice: Mapping[str, Any]) -> str | None:
        msg = choice.get("message")
        if not isinstance(msg, dict):
            msg = {}
        if self.cut_or_empty and choice.get("finish_reason") == "length":
            return "cut at max_tokens (finish_reason: length): raise max_tokens or ask for a shorter answer"
        refusal = msg.get("refusal")
        if isinstance(refusal, str) and refusal.strip():
            return f"the model refused: {refusal.strip()}"
        calls = msg.get("tool_calls")
        if isinstance(calls, list) and calls:
            return self._judge_calls(calls)
        if self.required_tool is not False:
            wanted = "a tool call" if self.required_tool is True else f"a call to tool {self.required_tool!r}"
            return f"no tool call, but tool_choice requires {wanted}"
        content = msg.get("content")
        text = content if isinstance(content, str) else ""
        if not text.strip():
            return "empty answer: no content and no tool call" if self.cut_or_empty or self.json else None
        if self.schema is not None or self.json:
            return self._judge_json(text)
        return None

    def _judge_json(self, text: str) -> str | None:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            return f"content is not JSON{_what_wraps(text)}: {e}"
        if self.schema is not None:
            why = schema_error(self.schema, value)
            return None if why is None else f"content does not match the schema: {why}"
        if not isinstance(value, dict):
            return f"content is JSON but not an object (a {_json_type(value)})"
        return None

    def _judge_calls(self, calls: list[Any]) -> str | None:
        names: list[str] = []
        for call in calls:
            if not isinstance(call, dict):
                return "a tool call is not an object"
            if call.get("type", "function") != "function":
                continue  # custom tools take free text
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                return "a tool call names no function"
            names.append(name)
            why = self._judge_call(name, fn.get("arguments"))
            if why is not None:
                return f"tool {name!r}: {why}"
        if isinstance(self.required_tool, str) and self.required_tool not in names:
            return f"no call to tool {self.required_tool!r}, which tool_choice requires"
        return None

    def _judge_call(self, name: str, arguments: object) -> str | None:
        if self.tools is None:
            return None
        if name not in self.tools:
            return f"not one of the tools offered ({', '.join(sorted(self.tools)) or 'none'})"
        if not isinstance(arguments, str):
            return "arguments are not a JSON string"
        try:
            # Some servers send "" for a function without parameters; "{}" is meant.
            value = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError as e:
            return f"arguments are not JSON{_what_wraps(arguments)}: {e}"
        validator = self.tools[name]
        if validator is not None:
            return schema_error(validator, value)
        return None if isinstance(value, dict) else f"arguments are not a JSON object (a {_json_type(value)})"


class QualityGate:
    """The process's gate: its settings and the compiled schemas (kept across reloads)."""

    def __init__(self, spec: QualitySpec) -> None:
        self.spec = spec
        self._validators: OrderedDict[bytes, jsonschema_rs.Validator] = OrderedDict()

    def reconfigure(self, spec: QualitySpec) -> None:
        self.spec = spec
        while len(self._validators) > spec.max_schemas:
            self._validators.popitem(last=False)

    def check_for(self, payload: Mapping[str, Any], hint: str | None) -> Check | None:
        """The request's check, or None. `hint` is X-Proxy-Check (already one of CHECK_VALUES).
        Raises BadRequest for a schema that cannot be compiled."""
        spec = self.spec
        mode = hint or spec.default
        if not spec.enabled or mode == "off":
            return None
        wants_json = mode == "json"
        schema = None
        fmt = payload.get("response_format")
        if isinstance(fmt, dict):
            kind = fmt.get("type")
            if kind == "json_object" and spec.json_object:
                wants_json = True
            elif kind == "json_schema" and spec.json_schema:
                body = fmt.get("json_schema")
                raw = body.get("schema") if isinstance(body, dict) else None
                if isinstance(raw, (dict, bool)):
                    schema = self._compile(raw, "response_format.json_schema.schema")
                else:
                    wants_json = True  # no schema to hold it to: it must still be JSON
        tools: dict[str, jsonschema_rs.Validator | None] | None = None
        required: str | bool = False
        offered = payload.get("tools")
        if spec.tool_calls and isinstance(offered, list) and offered:
            tools = self._tools(offered)
            required = _required_tool(payload.get("tool_choice"))
        if not wants_json and schema is None and tools is None:
            return None
        return Check(wants_json, schema, tools, required, spec.cut_or_empty, spec.hold_streams)

    def _tools(self, offered: list[Any]) -> dict[str, jsonschema_rs.Validator | None]:
        tools: dict[str, jsonschema_rs.Validator | None] = {}
        for i, tool in enumerate(offered):
            fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            params = fn.get("parameters")
            where = f"tools[{i}].function.parameters"
            tools[fn["name"]] = self._compile(params, where) if isinstance(params, (dict, bool)) else None
        return tools

    def _compile(self, schema: dict[str, Any] | bool, where: str) -> jsonschema_rs.Validator:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        validator = self._validators.get(key)
        if validator is not None:
            self._validators.move_to_end(key)
            return validator
        try:
            validator = jsonschema_rs.validator_for(schema, offline=True)
        except (ValueError, jsonschema_rs.ReferencingError) as e:
            first = str(e).split("\n", 1)[0]
            raise BadRequest(
                f"{where} is not a JSON Schema the proxy can check answers against: {first}. "
                "Fix the schema, or send X-Proxy-Check: off to pass the request through unchecked.",
                param=where,
                code="invalid_schema",
            ) from None
        self._validators[key] = validator
        if len(self._validators) > self.spec.max_schemas:
            self._validators.popitem(last=False)
        return validator


def schema_error(validator: jsonschema_rs.Validator, value: object) -> str | None:
    """The first violation, with where it is; None when `value` is valid."""
    if validator.is_valid(value):
        return None
    for error in validator.iter_errors(value):
        path = "/".join(str(p) for p in error.instance_path)
        return f"{error.message} (at /{path})" if path else error.message
    return "not valid against the schema"


def _required_tool(choice: object) -> str | bool:
    if choice == "required":
        return True
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str):
            return name
    return False


def _what_wraps(text: str) -> str:
    """Why JSON failed to parse, in the two ways small models usually get it wrong."""
    head = text.lstrip()
    if head.startswith("```"):
        return " (it is wrapped in a ``` code fence)"
    if head and head[0] not in '{["-0123456789tfn' and ("{" in head or "[" in head):
        return " (prose around the JSON)"
    return ""


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _short(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"
