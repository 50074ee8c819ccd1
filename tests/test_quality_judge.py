"""The gate's judgement on answers of every shape an upstream may send, including hostile ones:
it never raises, and a stream put back together is judged exactly as the same answer unstreamed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import QualitySpec
from proxy.errors import BadRequest
from proxy.gateway.assembly import StreamAssembly
from proxy.gateway.quality import QualityGate

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = [
    {"type": "function", "function": {"name": "save", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: any JSON object
    {"type": "custom", "custom": {"name": "shell"}},
]


def gate(**spec: Any) -> QualityGate:
    return QualityGate(QualitySpec(**spec))


def answer(content: Any = None, finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": finish}
        ]
    }


def call(name: str, arguments: str, kind: str = "function") -> dict[str, Any]:
    return {"id": "c1", "type": kind, "function": {"name": name, "arguments": arguments}}


def test_nothing_is_checked_unless_asked() -> None:
    g = gate()
    assert g.check_for({"messages": []}, None) is None
    assert g.check_for({"messages": [], "response_format": {"type": "text"}}, None) is None
    assert g.check_for({"response_format": {"type": "json_object"}}, "off") is None
    assert gate(default="json").check_for({}, None) is not None
    assert gate(enabled=False).check_for({"response_format": {"type": "json_object"}}, "json") is None


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (answer('{"n": 1}'), None),
        (answer(' \n{"n": 1}\n'), None),
        (answer('{"n": "1"}'), 'content does not match the schema: "1" is not of type "integer" (at /n)'),
        (answer("{}"), 'content does not match the schema: "n" is a required property'),
        (answer('{"n": 1'), "content is not JSON"),
        (answer('{"n": 1}', finish="length"), "cut at max_tokens"),
        (answer(None), "empty answer: no content and no tool call"),
        (answer(None, refusal="I can't help with that."), "the model refused: I can't help with that."),
        ({"choices": []}, "the answer has no choices"),
        ({"choices": "x"}, "the answer has no choices"),
        ({"choices": [{"message": {"content": '{"n": 1}'}}, {"message": {"content": "no"}}]}, "choice 1: content"),
    ],
)
def test_schema_answers(doc: dict[str, Any], why: str | None) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    check = gate().check_for({"response_format": fmt}, None)
    assert check is not None
    got = check.judge(doc)
    assert (got is None) if why is None else (got is not None and got.startswith(why)), got


@pytest.mark.parametrize(
    ("calls", "choice", "why"),
    [
        ([call("save", '{"n": 2}')], None, None),
        ([call("ping", "")], None, None),  # "" for a function without parameters means {}
        ([call("ping", "[1]")], None, "tool 'ping': arguments are not a JSON object (a list)"),
        ([call("save", '{"n": 2}'), call("save", "{}")], None, "tool 'save': \"n\" is a required property"),
        ([call("shell", "rm -rf /", kind="custom")], None, None),  # custom tools take free text
        ([call("nope", "{}")], None, "tool 'nope': not one of the tools offered (ping, save)"),
        ([call("ping", "{}")], {"type": "function", "function": {"name": "save"}}, "no call to tool 'save'"),
        ([{"type": "function", "function": {"arguments": "{}"}}], None, "a tool call names no function"),
        (["x"], None, "a tool call is not an object"),
    ],
)
def test_tool_calls(calls: list[Any], choice: Any, why: str | None) -> None:
    payload: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        payload["tool_choice"] = choice
    check = gate().check_for(payload, None)
    assert check is not None
    got = check.judge(answer(None, tool_calls=calls))
    assert (got is None) if why is None else (got is not None and got.startswith(why)), got


def test_each_distinct_schema_is_compiled_once() -> None:
    g = gate(max_schemas=2)
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    first = g.check_for({"response_format": fmt}, None)
    again = g.check_for({"response_format": orjson.loads(orjson.dumps(fmt))}, None)
    assert first is not None and again is not None and first.schema is again.schema
    for n in range(3):  # pushes SCHEMA out of a cache of two
        g.check_for({"response_format": {"type": "json_schema", "json_schema": {"schema": {"maxLength": n}}}}, None)
    later = g.check_for({"response_format": fmt}, None)
    assert later is not None and later.schema is not first.schema


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]}, "tools[0]"),
        ({"tools": [{"function": {"name": "f", "parameters": {"$ref": "https://example.com/s.json"}}}]}, "tools[0]"),
    ],
)
def test_a_schema_that_cannot_compile_is_the_clients_error(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        gate().check_for(payload, None)
    assert e.value.param is not None and e.value.param.startswith(param)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "content": json_values,
        "refusal": json_values,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["function", "custom"]) | json_values,
                    "function": st.fixed_dictionaries(
                        {}, optional={"name": st.sampled_from(["save", "ping"]) | json_values, "arguments": json_values}
                    )
                    | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)
answers = st.fixed_dictionaries(
    {
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "message": message_like | json_values,
                    "finish_reason": st.sampled_from(["stop", "length"]) | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values
    }
)


@settings(max_examples=300, deadline=None)
@given(doc=answers)
def test_any_answer_shape_is_judged_without_raising(doc: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    for payload in ({"response_format": fmt, "tools": TOOLS, "tool_choice": "required"}, {"tools": TOOLS}):
        check = gate().check_for(payload, "json")
        assert check is not None
        why = check.judge(doc)
        assert why is None or (isinstance(why, str) and 0 < len(why) <= 300)


def _stream_of(message: dict[str, Any], finish: str, pieces: int) -> bytes:
    """The message as OpenAI would stream it: content in `pieces` deltas, tool calls by index."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    content = message.get("content") or ""
    step = max(1, -(-len(content) // pieces))
    events += [
        {"choices": [{"index": 0, "delta": {"content": content[i : i + step]}}]} for i in range(0, len(content), step)
    ]
    for i, tc in enumerate(message.get("tool_calls") or []):
        fn = tc["function"]
        events.append(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {"index": i, "id": tc["id"], "type": "function", "function": {"name": fn["name"]}}
                            ]
                        },
                    }
                ]
            }
        )
        args = fn["arguments"]
        half = len(args) // 2
        for part in (args[:half], args[half:]):
            events.append(
                {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, "function": {"arguments": part}}]}}]}
            )
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@settings(max_examples=200, deadline=None)
@given(
    content=st.one_of(st.none(), st.text(max_size=40), st.just('{"n": 5}'), st.just('{"n": "5"}')),
    calls=st.lists(
        st.tuples(st.sampled_from(["save", "ping", "other"]), st.sampled_from(['{"n": 1}', "{}", '{"n": ', ""])),
        max_size=2,
    ),
    finish=st.sampled_from(["stop", "length", "tool_calls"]),
    pieces=st.integers(1, 7),
)
def test_a_stream_is_judged_as_the_same_answer_unstreamed(
    content: str | None, calls: list[tuple[str, str]], finish: str, pieces: int
) -> None:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call(n, a) | {"id": f"c{i}"} for i, (n, a) in enumerate(calls)]
    whole = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    assembly = StreamAssembly()
    assembly.feed(_stream_of(message, finish, pieces))
    check = gate().check_for(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "tools": TOOLS}, None
    )
    assert check is not None
    assert check.judge(assembly.doc()) == check.judge(whole)
