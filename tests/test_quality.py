"""The quality gate through the real app and real simulated upstreams: a 200 answer that is not
what the request asked for is a failed attempt, retried, failed over, counted by the breaker,
and never shown to the client while another tier can do better."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.sim import Behaviour
from proxy.sim.answers import PLAN_SCHEMA, plan_json
from tests.conftest import ProxyFactory, Upstream, tier_config

MSG = [{"role": "user", "content": "Answer with a JSON plan."}]
PLAN = plan_json(__import__("random").Random(7))
PROSE = Behaviour(content=f"Sure! Here is the plan:\n{PLAN}\nAnything else?")
CUT = Behaviour(content=PLAN[:20], finish_reason="length")
GOOD = Behaviour(content=PLAN)
JSON_OBJECT = {"type": "json_object"}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA, "strict": True}}
SAVE_TOOL = {
    "type": "function",
    "function": {
        "name": "save",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
            "required": ["path", "text"],
        },
    },
}


def body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": "auto", "messages": MSG, **extra}
    if stream:
        doc["stream"] = True
    return doc


def hits(ups: dict[str, Upstream]) -> dict[str, int]:
    return {name: u.hits for name, u in ups.items()}


async def attempts_of(db: Path, rid: str) -> list[dict[str, Any]]:
    """The attempt rows of one request, waiting (without blocking the loop) for the writer."""
    for _ in range(200):
        with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            if conn.execute("SELECT 1 FROM requests WHERE id = ?", (rid,)).fetchone():
                rows = conn.execute("SELECT * FROM attempts WHERE request_id = ? ORDER BY n", (rid,)).fetchall()
                return [dict(r) for r in rows]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no ledger row for {rid}")


def content_of(doc: dict[str, Any]) -> Any:
    return doc["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("fmt", "bad", "reason"),
    [
        (JSON_OBJECT, PROSE, "content is not JSON (prose around the JSON)"),
        (JSON_OBJECT, Behaviour(content="```json\n" + PLAN + "\n```"), "wrapped in a ``` code fence"),
        (JSON_OBJECT, CUT, "cut at max_tokens"),
        (JSON_OBJECT, Behaviour(content="[1, 2]"), "content is JSON but not an object (a list)"),
        (JSON_OBJECT, Behaviour(content="  "), "empty answer"),
        (SCHEMA_FORMAT, Behaviour(content='{"goal": "x"}'), '"steps" is a required property'),
        (
            SCHEMA_FORMAT,
            Behaviour(content='{"goal": "x", "steps": [{"id": "one", "action": "a", "done": false}]}'),
            "(at /steps/0/id)",
        ),
    ],
)
async def test_a_bad_answer_is_retried_then_fails_over(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path, fmt: Any, bad: Behaviour, reason: str
) -> None:
    upstreams["llama"].always(bad)
    upstreams["ollama"].always(GOOD)
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(response_format=fmt), headers={"X-Request-Id": "q-1"})
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert resp.headers["X-Proxy-Check"] == "passed"
    assert orjson.loads(content_of(await resp.json())) == orjson.loads(PLAN)
    assert hits(upstreams) == {"llama": 2, "ollama": 1, "kimi": 0}  # retried once on the same tier
    rows = await attempts_of(tmp_path / "ledger.db", "q-1")
    assert [r["outcome"] for r in rows] == ["invalid_output", "invalid_output", "ok"]
    assert reason in rows[0]["error"], rows[0]["error"]


async def test_good_answers_pass_with_no_extra_attempt(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(GOOD)
    client = await make_proxy()
    for fmt in (JSON_OBJECT, SCHEMA_FORMAT):
        resp = await client.post("/v1/chat/completions", json=body(response_format=fmt))
        assert (resp.status, resp.headers["X-Proxy-Check"], resp.headers["X-Proxy-Attempts"]) == (200, "passed", "1")
    resp = await client.post("/v1/chat/completions", json=body())  # asked for no structure: not checked
    assert "X-Proxy-Check" not in resp.headers
    assert hits(upstreams)["llama"] == 3


@pytest.mark.parametrize(
    ("answer", "choice", "reason"),
    [
        (Behaviour(tool_calls=[("save", '{"path": "a.txt"}')]), None, "tool 'save': \"text\" is a required property"),
        (Behaviour(tool_calls=[("save", '{"path": "a.txt", "text": ')]), None, "tool 'save': arguments are not JSON"),
        (Behaviour(tool_calls=[("delete", "{}")]), None, "tool 'delete': not one of the tools offered (save)"),
        (Behaviour(content="I would save it."), "required", "no tool call, but tool_choice requires a tool call"),
        (Behaviour(content="ok"), {"type": "function", "function": {"name": "save"}}, "a call to tool 'save'"),
    ],
)
async def test_bad_tool_calls_fail_over(
    make_proxy: ProxyFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    answer: Behaviour,
    choice: Any,
    reason: str,
) -> None:
    upstreams["llama"].always(answer)
    upstreams["ollama"].always(Behaviour(tool_calls=[("save", '{"path": "a.txt", "text": "hi"}')]))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    extra: dict[str, Any] = {"tools": [SAVE_TOOL]}
    if choice is not None:
        extra["tool_choice"] = choice
    resp = await client.post("/v1/chat/completions", json=body(**extra), headers={"X-Request-Id": "t-1"})
    doc = await resp.json()
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "ollama"
    call = doc["choices"][0]["message"]["tool_calls"][0]["function"]
    assert orjson.loads(call["arguments"]) == {"path": "a.txt", "text": "hi"}
    rows = await attempts_of(tmp_path / "ledger.db", "t-1")
    assert [r["outcome"] for r in rows] == ["invalid_output", "ok"]
    assert reason in rows[0]["error"], rows[0]["error"]


async def test_a_plain_answer_with_tools_offered_is_fine(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(content="No tool is needed for this."))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(tools=[SAVE_TOOL]))
    assert (resp.status, resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Check"]) == (200, "llama", "passed")


async def test_the_json_header_checks_a_prompt_that_asked_for_json(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(PROSE)
    upstreams["ollama"].always(GOOD)
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Proxy-Check": "json"})
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Check"]) == ("ollama", "passed")
    upstreams["llama"].settings.script.clear()
    resp = await client.post(
        "/v1/chat/completions", json=body(response_format=JSON_OBJECT), headers={"X-Proxy-Check": "off"}
    )
    assert resp.headers["X-Proxy-Tier"] == "llama" and "X-Proxy-Check" not in resp.headers
    assert content_of(await resp.json()) == PROSE.content  # unchecked: passed through as it came
    forwarded = upstreams["llama"].stats.requests[-1].headers
    assert "x-proxy-check" not in forwarded


@pytest.mark.parametrize("value", ["strict", "json, off"])
async def test_a_bad_check_header_is_a_400_naming_the_values(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], value: str
) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Proxy-Check": value})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "X-Proxy-Check" and "auto, json, off" in err["message"]
    assert hits(upstreams)["llama"] == 0


async def test_a_schema_that_cannot_compile_is_a_400(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    resp = await client.post("/v1/chat/completions", json=body(response_format=fmt))
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "invalid_schema" and err["param"] == "response_format.json_schema.schema"
    assert "X-Proxy-Check: off" in err["message"]
    assert hits(upstreams)["llama"] == 0


async def test_every_tier_bad_gives_the_last_answer_marked_failed(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    for name in ("llama", "ollama"):
        upstreams[name].always(PROSE)
    kimi_answer = Behaviour(content='Here it is: {"goal": 1')
    upstreams["kimi"].always(kimi_answer)
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    client = await make_proxy(tiers=tier_config(upstreams, kimi={"price": price}), retries={"max_fallback_retries": 1})
    resp = await client.post(
        "/v1/chat/completions", json=body(response_format=JSON_OBJECT), headers={"X-Request-Id": "all-bad"}
    )
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "kimi"
    assert resp.headers["X-Proxy-Check"].startswith('failed; reason="content is not JSON')
    doc = await resp.json()
    assert content_of(doc) == kimi_answer.content and doc["sim_tier"] == "kimi"  # unchanged
    rows = await attempts_of(tmp_path / "ledger.db", "all-bad")
    assert [r["outcome"] for r in rows] == ["invalid_output"] * 3
    assert rows[2]["cost_nano_usd"] > 0, "a bad paid answer was paid for"


async def test_a_minor_replan_never_pays_even_when_every_free_answer_is_bad(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    for name in ("llama", "ollama"):
        upstreams[name].always(CUT)
    client = await make_proxy()
    for _ in range(5):
        resp = await client.post(
            "/v1/chat/completions", json=body(response_format=JSON_OBJECT), headers={"X-Replan": "minor"}
        )
        assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "ollama"
        assert resp.headers["X-Proxy-Check"].startswith('failed; reason="cut at max_tokens')
    assert hits(upstreams)["kimi"] == 0


async def test_consecutive_bad_answers_escalate_to_kimi(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["llama"].always(PROSE)
    upstreams["ollama"].always(GOOD)
    upstreams["kimi"].always(GOOD)
    client = await make_proxy(
        routing={"escalate_after_failures": 3, "breaker_cooldown_seconds": 60},
        retries={"max_fallback_retries": 1},
    )
    routes = []
    last = ""
    for i in range(5):
        last = f"esc-{i}"
        resp = await client.post(
            "/v1/chat/completions", json=body(response_format=JSON_OBJECT), headers={"X-Request-Id": last}
        )
        assert resp.status == 200 and resp.headers["X-Proxy-Check"] == "passed"
        routes.append((resp.headers["X-Proxy-Route"], resp.headers["X-Proxy-Tier"]))
    # Three bad answers from the primary (one per request) open its breaker: then Kimi first.
    assert routes == [("default", "ollama")] * 3 + [("escalated", "kimi")] * 2
    assert hits(upstreams) == {"llama": 3, "ollama": 3, "kimi": 2}
    await attempts_of(tmp_path / "ledger.db", last)
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as conn:
        causes = conn.execute("SELECT route, escalated_for FROM requests ORDER BY started_at").fetchall()
    assert causes == [("default", None)] * 3 + [("escalated", "bad_answers")] * 2


async def test_a_held_stream_fails_over_with_no_trace_of_the_bad_one(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(PROSE)
    upstreams["ollama"].always(GOOD)
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body(stream=True, response_format=SCHEMA_FORMAT))
    raw = await resp.read()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Proxy-Tier"] == "ollama" and resp.headers["X-Proxy-Check"] == "passed"
    events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert {e["sim_tier"] for e in events} == {"ollama"}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert orjson.loads(text) == orjson.loads(PLAN)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}


async def test_a_held_stream_is_passed_on_byte_for_byte(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], aiohttp_client: Any
) -> None:
    upstreams["llama"].always(GOOD)
    client = await make_proxy()
    sent = body(stream=True, response_format=JSON_OBJECT, stream_options={"include_usage": True})
    via_proxy = await (await client.post("/v1/chat/completions", json=sent)).read()

    upstream_url = f"{upstreams['llama'].url}/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(upstream_url, json={**sent, "model": "llama3.1:8b"}) as r:
        direct = await r.read()

    def strip_ids(b: bytes) -> bytes:  # the sim numbers its answers, stamps the time, counts the body it got
        return b"\n\n".join(
            orjson.dumps({k: v for k, v in orjson.loads(e[6:]).items() if k not in ("id", "created", "usage")})
            if e.startswith(b"data: {")
            else e
            for e in b.split(b"\n\n")
        )

    assert strip_ids(via_proxy) == strip_ids(direct)


async def test_streamed_tool_call_arguments_are_assembled_and_checked(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(tool_calls=[("save", '{"path": "a.txt"}')]))
    upstreams["ollama"].always(Behaviour(tool_calls=[("save", '{"path": "a.txt", "text": "hi"}')]))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body(stream=True, tools=[SAVE_TOOL]))
    raw = await resp.read()
    assert resp.headers["X-Proxy-Tier"] == "ollama" and resp.headers["X-Proxy-Check"] == "passed"
    args = "".join(
        tc["function"].get("arguments", "")
        for e in raw.split(b"\n\n")
        if e.startswith(b"data: {")
        for c in orjson.loads(e[6:])["choices"]
        for tc in c["delta"].get("tool_calls") or []
    )
    assert orjson.loads(args) == {"path": "a.txt", "text": "hi"}


async def test_unheld_streams_are_checked_after_the_fact_and_never_failed_over(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["llama"].always(PROSE)
    client = await make_proxy(quality={"hold_streams": False})
    resp = await client.post(
        "/v1/chat/completions",
        json=body(stream=True, response_format=JSON_OBJECT),
        headers={"X-Request-Id": "live-1"},
    )
    raw = await resp.read()
    assert resp.headers["X-Proxy-Tier"] == "llama" and b"Here is the plan" in raw.replace(b"\\n", b" ")
    assert hits(upstreams) == {"llama": 1, "ollama": 0, "kimi": 0}
    rows = await attempts_of(tmp_path / "ledger.db", "live-1")
    assert [r["outcome"] for r in rows] == ["invalid_output"]


async def test_the_gate_can_be_turned_off(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(PROSE)
    client = await make_proxy(quality={"enabled": False})
    resp = await client.post("/v1/chat/completions", json=body(response_format=JSON_OBJECT))
    assert resp.headers["X-Proxy-Tier"] == "llama" and "X-Proxy-Check" not in resp.headers
    client = await make_proxy(quality={"json_object": False})
    resp = await client.post("/v1/chat/completions", json=body(response_format=JSON_OBJECT))
    assert resp.headers["X-Proxy-Tier"] == "llama" and "X-Proxy-Check" not in resp.headers


async def test_the_last_bad_answer_is_billed_once_when_later_tiers_failed(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    """Kimi first (complex) answers badly, the free tiers then fail with 503s: the client gets
    Kimi's answer, and the request costs what Kimi's one attempt cost, not twice that."""
    upstreams["kimi"].always(PROSE)
    for name in ("llama", "ollama"):
        upstreams[name].always(Behaviour(status=503))
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    client = await make_proxy(tiers=tier_config(upstreams, kimi={"price": price}), retries={"max_fallback_retries": 1})
    resp = await client.post(
        "/v1/chat/completions",
        json=body(response_format=JSON_OBJECT),
        headers={"X-Complexity": "complex", "X-Request-Id": "kimi-bad"},
    )
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "kimi"
    assert resp.headers["X-Proxy-Check"].startswith("failed")
    rows = await attempts_of(tmp_path / "ledger.db", "kimi-bad")
    assert [(r["tier"], r["outcome"]) for r in rows] == [
        ("kimi", "invalid_output"),
        ("llama", "http_error"),
        ("ollama", "http_error"),
    ]
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as conn:
        cost, check = conn.execute("SELECT cost_nano_usd, check_result FROM requests WHERE id = 'kimi-bad'").fetchone()
    assert rows[0]["cost_nano_usd"] > 0 and cost == rows[0]["cost_nano_usd"]
    assert check == "failed"


async def test_a_request_keeps_its_retry_when_its_bad_answer_opened_the_breaker(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    """The third bad answer in a row opens llama's breaker in the middle of request 2: that
    request still gets its second llama attempt (the tier is up), then the next calls escalate."""
    upstreams["llama"].script(PROSE, PROSE, PROSE, GOOD)
    upstreams["ollama"].always(GOOD)
    upstreams["kimi"].always(GOOD)
    client = await make_proxy(routing={"escalate_after_failures": 3, "breaker_cooldown_seconds": 60})
    tiers = []
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=body(response_format=JSON_OBJECT))
        tiers.append((resp.headers["X-Proxy-Route"], resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Attempts"]))
    assert tiers == [("default", "ollama", "3"), ("default", "llama", "2"), ("escalated", "kimi", "1")]
    assert hits(upstreams) == {"llama": 4, "ollama": 1, "kimi": 1}
