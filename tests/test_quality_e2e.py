"""The quality gate end to end: the real `proxy serve` process, the openai SDK's structured-output
and tool helpers as the client, simulated tiers that answer badly or well on demand, and the real
llama.cpp server on a tiny random model, whose text is a real bad answer for a JSON check.

tests/test_quality.py covers every rule in process; here each rule is seen as a user sees it:
the SDK's parsed object, the response headers, the bytes of a held stream, the tiers' hits and
the ledger's rows. tests/test_quality_smollm2.py does the same with a real instruction model.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.support.faults import SimThread, request_id
from tests.support.llamacpp import LlamaCppServer
from tests.support.proc import ProxyProc
from tests.support.quality_e2e import (
    CUT,
    GOOD,
    PLAN,
    PROSE,
    SAVE_MISSING_TEXT,
    SAVED,
    Plan,
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

MESSAGES: list[Any] = [{"role": "user", "content": "Plan the launch. Answer with a JSON plan."}]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, sims: SimThread) -> Iterator[Proxies]:
    """The module's `proxy serve` processes: their breakers never open (escalate_after_failures is
    1000), so the tests can share them; each test reads its own ledger rows by request id."""
    with proxies(tmp_path_factory.mktemp("proxies"), sims) as made:
        yield made


@pytest.fixture(scope="module")
def proxy(started: Proxies) -> ProxyProc:
    """In front of the simulated llama, ollama and kimi: two attempts per tier, five per request."""
    return started.start()


@pytest.fixture(autouse=True)
def fresh(sims: SimThread) -> None:
    sims.reset()


def hits(sims: SimThread) -> dict[str, int]:
    return sims.hits()


# ---------------------------------------------------------------------------- the openai SDK as the client


def test_sdk_parse_gets_the_plan_of_the_next_tier(proxy: ProxyProc, sims: SimThread) -> None:
    """`chat.completions.parse(response_format=Plan)`: the free tier's plan has prose around it
    (twice: retried at once on the same tier), the next tier's is good, and the SDK gets that one
    as a Plan object; the ledger has both bad attempts with the reason and the request as passed."""
    sims.sims["llama"].always(PROSE)
    sims.sims["ollama"].always(GOOD)
    rid = request_id("sdk-parse")
    raw = sdk(proxy, Seen()).chat.completions.with_raw_response.parse(
        model="auto", messages=MESSAGES, response_format=Plan, extra_headers={"X-Request-Id": rid}
    )
    completion = raw.parse()
    assert completion.choices[0].message.parsed == Plan.model_validate_json(PLAN)
    assert (raw.headers["x-proxy-tier"], raw.headers["x-proxy-check"], raw.headers["x-proxy-attempts"]) == (
        "ollama",
        "passed",
        "3",
    )
    assert orjson.loads(raw.content)["sim_tier"] == "ollama"  # the bytes are the good tier's answer
    assert hits(sims) == {"llama": 2, "ollama": 1, "kimi": 0}
    sent = sims.sims["llama"].stats.requests[-1].json["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Plan"  # the SDK's schema, forwarded

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    assert all("content is not JSON (prose around the JSON)" in a["error"] for a in atts[:2]), atts
    assert all(a["http_status"] == 200 and a["completion_tokens"] for a in atts), "bad answers are paid for"
    assert (req["tier"], req["status"], req["outcome"], req["attempts"], req["error"]) == ("ollama", 200, "ok", 3, None)
    assert_check_recorded(req, atts, "passed")


def test_sdk_stream_helper_gets_the_plan_of_the_next_tier_and_nothing_of_the_first(
    proxy: ProxyProc, sims: SimThread
) -> None:
    """`chat.completions.stream(response_format=Plan)`: the free tier's stream is JSON cut at
    max_tokens; it is held, judged, and dropped, so every chunk the SDK sees is the next tier's and
    its final completion is a parsed Plan."""
    sims.sims["llama"].always(CUT)
    sims.sims["ollama"].always(GOOD)
    rid, seen = request_id("sdk-stream"), Seen()
    with sdk(proxy, seen).chat.completions.stream(
        model="auto", messages=MESSAGES, response_format=Plan, extra_headers={"X-Request-Id": rid}
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Plan.model_validate_json(PLAN)
    assert final.choices[0].finish_reason == "stop"
    chunks = [e.chunk for e in events if e.type == "chunk"]
    assert chunks and {(c.model, (c.model_extra or {}).get("sim_tier")) for c in chunks} == {("qwen2.5:7b", "ollama")}
    done = [e for e in events if e.type == "content.done"]
    assert len(done) == 1 and done[0].parsed == Plan.model_validate_json(PLAN)
    headers = seen.last
    assert headers["content-type"].startswith("text/event-stream")
    assert (headers["x-proxy-tier"], headers["x-proxy-check"]) == ("ollama", "passed")
    assert hits(sims) == {"llama": 2, "ollama": 1, "kimi": 0}

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    assert all(a["error"].startswith("cut at max_tokens (finish_reason: length)") for a in atts[:2]), atts
    assert (req["stream"], req["tier"], req["status"], req["outcome"]) == (1, "ollama", 200, "ok")
    assert_check_recorded(req, atts, "passed")


@pytest.mark.parametrize("stream", [False, True], ids=["parse", "stream"])
def test_sdk_tool_helpers_get_the_valid_call_of_the_next_tier(proxy: ProxyProc, sims: SimThread, stream: bool) -> None:
    """`openai.pydantic_function_tool(Save)`, with `parse` and with `stream`: the free tier's call
    leaves out a required argument, the next tier's is whole, and the SDK gets its arguments as a
    Save object."""
    sims.sims["llama"].always(SAVE_MISSING_TEXT)
    sims.sims["ollama"].always(SAVED)
    rid, seen = request_id(f"sdk-tools-{stream}"), Seen()
    client = sdk(proxy, seen)
    tools = [openai.pydantic_function_tool(Save)]
    ask: dict[str, Any] = {"model": "auto", "messages": MESSAGES, "tools": tools}
    ask["extra_headers"] = {"X-Request-Id": rid}
    if stream:
        with client.chat.completions.stream(**ask) as live:
            kinds = [e.type for e in live]
            final = live.get_final_completion()
        assert "tool_calls.function.arguments.done" in kinds
    else:
        final = client.chat.completions.parse(**ask)
    call = final.choices[0].message.tool_calls
    assert call is not None and len(call) == 1 and call[0].function.name == "Save"
    assert call[0].function.parsed_arguments == Save(path="notes.txt", text="ship it")
    assert (seen.last["x-proxy-tier"], seen.last["x-proxy-check"]) == ("ollama", "passed")
    assert hits(sims) == {"llama": 2, "ollama": 1, "kimi": 0}
    offered = sims.sims["llama"].stats.requests[-1].json["tools"][0]["function"]
    assert offered["name"] == "Save" and offered["strict"] is True

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    assert atts[0]["error"] == "tool 'Save': \"text\" is a required property", atts[0]
    assert_check_recorded(req, atts, "passed")


def test_sdk_gets_the_last_bad_answer_unchanged_when_every_tier_is_bad(proxy: ProxyProc, sims: SimThread) -> None:
    """Every tier, the paid one too, cuts its plan at max_tokens: the client gets the last answer
    as it came (the SDK's own parse then raises LengthFinishReasonError, as it would without the
    proxy), the header says why it failed, and the paid bad answer is in the ledger at its cost."""
    for name in ("llama", "ollama", "kimi"):
        sims.sims[name].always(CUT)
    rid = request_id("sdk-all-bad")
    raw = sdk(proxy, Seen()).chat.completions.with_raw_response.parse(
        model="auto", messages=MESSAGES, response_format=Plan, extra_headers={"X-Request-Id": rid}
    )
    assert raw.status_code == 200 and raw.headers["x-proxy-tier"] == "kimi"
    assert raw.headers["x-proxy-check"].startswith('failed; reason="cut at max_tokens (finish_reason: length)')
    doc = orjson.loads(raw.content)
    assert doc["sim_tier"] == "kimi" and doc["choices"][0]["message"]["content"] == CUT.content
    with pytest.raises(openai.LengthFinishReasonError):
        raw.parse()
    assert hits(sims) == {"llama": 2, "ollama": 2, "kimi": 1}

    req, atts = ledger(proxy, rid)
    assert [a["outcome"] for a in atts] == ["invalid_output"] * 5
    assert [a["tier"] for a in atts] == ["llama", "llama", "ollama", "ollama", "kimi"]
    assert atts[-1]["cost_nano_usd"] > 0 and req["cost_nano_usd"] == atts[-1]["cost_nano_usd"]
    assert (req["tier"], req["status"], req["outcome"]) == ("kimi", 200, "ok")
    assert req["error"].startswith("cut at max_tokens"), req
    assert_check_recorded(req, atts, "failed")


# ---------------------------------------------------------------------------- the real llama.cpp server


@pytest.fixture(scope="module")
def tiny_relay(sims: SimThread, llamacpp: LlamaCppServer) -> Iterator[Relay]:
    """The session's llama.cpp server (tiny random model), its requests counted on the way."""
    relay = sims.run(start_relay(llamacpp.base_url))
    try:
        yield relay
    finally:
        sims.run(relay.close())


# The tiny model's answer always runs to max_tokens; with cut_or_empty off, the only thing the gate
# can hold against it is what it says: words, not JSON.
TINY_ASK = {"max_tokens": 8, "temperature": 0, "seed": 7}


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


@pytest.fixture(scope="module")
def tiny_proxy(started: Proxies, tiny_relay: Relay) -> ProxyProc:
    """llama is the real llama.cpp server (tiny model); ollama and kimi are simulated."""
    llama = {"base_url": tiny_relay.url, "timeout_seconds": 4.0, "stream_idle_timeout_seconds": 4.0}
    return started.start(tiers={"llama": llama}, quality={"cut_or_empty": False})


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_llamacpp_text_fails_the_json_check_and_the_next_tier_answers(
    tiny_proxy: ProxyProc, sims: SimThread, tiny_relay: Relay, stream: bool
) -> None:
    """The real llama.cpp server as the free tier, asked (X-Proxy-Check: json) for JSON by a plain
    prompt: its text is not JSON, it is asked again, then the simulated next tier answers, and the
    client gets only that answer. Without the header the same answer passes unchecked.

    (The header, not response_format: llama.cpp enforces json_object and json_schema with a grammar;
    on the tiny model's vocabulary the grammar cannot even be built, and llama.cpp answers 400.)"""
    sims.sims["ollama"].always(GOOD)
    proxy = tiny_proxy
    rid = request_id(f"tiny-{stream}")
    body = {"model": "auto", "messages": MESSAGES, "stream": stream, **TINY_ASK}
    before = tiny_relay.hits
    status, headers, raw = post(proxy.chat_url, body, {"X-Request-Id": rid, "X-Proxy-Check": "json"})
    assert status == 200 and (headers["x-proxy-tier"], headers["x-proxy-check"]) == ("ollama", "passed")
    if stream:
        events = data_events(raw)
        assert events[-1] == b"[DONE]"
        assert {(e["model"], e["sim_tier"]) for e in events[:-1]} == {("qwen2.5:7b", "ollama")}
        assert orjson.loads(streamed_text(events)) == orjson.loads(PLAN)
    else:
        doc = orjson.loads(raw)
        assert doc["sim_tier"] == "ollama" and doc["choices"][0]["message"]["content"] == PLAN
    assert b"tiny-llama" not in raw and b"timings" not in raw  # nothing of llama.cpp's answer
    assert (tiny_relay.hits - before, sims.hits()) == (2, {"llama": 0, "ollama": 1, "kimi": 0})

    req, atts = ledger(proxy, rid)
    assert outcomes(atts) == [("llama", "invalid_output"), ("llama", "invalid_output"), ("ollama", "ok")]
    for a in atts[:2]:
        assert a["error"].startswith("content is not JSON: "), a
        assert (a["http_status"], a["completion_tokens"]) == (200, 8), "llama.cpp's own usage, recorded"
    assert_check_recorded(req, atts, "passed")

    # The control: the same request without the header is not checked, and llama.cpp's words pass.
    status, headers, raw = post(proxy.chat_url, body, {})
    assert status == 200 and headers["x-proxy-tier"] == "llama" and "x-proxy-check" not in headers
    text = streamed_text(data_events(raw)) if stream else orjson.loads(raw)["choices"][0]["message"]["content"]
    assert text.strip()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
    assert tiny_relay.hits - before == 3
