"""Every endpoint through the real `proxy serve` to the real llama.cpp server (the xllamacpp
wheel, a tiny random model) gives the client the bytes a direct call to the same server with the
same body gives, apart from what the proxy must change; and /v1/embeddings against llama.cpp
started with embeddings on, through the proxy and directly, with the openai SDK.

What is normalised before comparing, and why (nothing else is):
- `id`, `item_id` (Responses output items), `created`, `created_at`, `completed_at`: llama.cpp
  makes a new random id and reads the clock on every call, proxied or not.
- `timings`: llama.cpp's own measurement of each call (milliseconds, tokens per second).
Every body is sent with temperature 0, a seed and `cache_prompt: false` (else llama.cpp reports
the tokens it reused from the previous identical call as `cached_tokens`), and with the model
name the proxy sends (the tier's `model`), so any other difference is the proxy's doing.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agents
import openai
import orjson
import pytest
from llama_index.llms.openai_like import OpenAILike

from tests.support.faults import ledger_rows, request_id
from tests.support.llamacpp import LlamaCppServer
from tests.support.proc import ProxyProc, closed_port_url
from tests.support.secret_scan import KIMI_KEY

LLAMA_MODEL = "llama3.1:8b"  # what the proxy sends to the llama tier (llama.cpp answers for any name)
EMBED_MODEL = "nomic-embed-text"  # ... and to the embeddings tier
PROMPT = "the plan"
# cache_prompt is llama.cpp's: off, so a repeated prompt reports no cached tokens.
SAME = {"temperature": 0, "seed": 7, "cache_prompt": False}
BODIES: dict[str, dict[str, Any]] = {
    "chat/completions": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, **SAME},
    "responses": {"input": PROMPT, "max_output_tokens": 6, **SAME},
    "completions": {"prompt": PROMPT, "max_tokens": 6, **SAME},
    "embeddings": {"input": [PROMPT, "a quiet river"]},
}


@pytest.fixture(scope="module")
def llamacpp_embeddings(llama_model: Path) -> Iterator[LlamaCppServer]:
    """A second llama.cpp server on the tiny model, started with embeddings on (mean pooling)."""
    server = LlamaCppServer(alias="tiny-embed", n_parallel=1, embeddings=True, pooling="mean")
    server.start(llama_model)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(
    llamacpp: LlamaCppServer, llamacpp_embeddings: LlamaCppServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProc]:
    """proxy serve: llama = the llama.cpp server for text, ollama = the one with embeddings on
    (and only those), kimi = a closed port that none of these tests should reach."""
    work = tmp_path_factory.mktemp("endpoints-llamacpp")
    tiers = {
        "llama": {
            "base_url": llamacpp.base_url,
            "model": LLAMA_MODEL,
            "timeout_seconds": 5,
            "endpoints": ["chat/completions", "responses", "completions"],
        },
        "ollama": {
            "base_url": llamacpp_embeddings.base_url,
            "model": EMBED_MODEL,
            "timeout_seconds": 5,
            "endpoints": ["embeddings"],
        },
        "kimi": {"base_url": closed_port_url(), "model": "kimi-k2.5", "paid": True, "api_key_env": "TEST_KIMI_KEY"},
    }
    config = {"tiers": tiers, "ledger": {"path": str(work / "ledger.db")}}
    proc = ProxyProc.start(work, config, {"TEST_KIMI_KEY": KIMI_KEY})
    yield proc
    assert proc.terminate() == 0


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


_VOLATILE = re.compile(rb'"(id|item_id|created|created_at|completed_at|timings)":("[^"]*"|\d+|\{[^{}]*\})')


def blank(raw: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":_', raw)


def events(raw: bytes) -> list[bytes]:
    """A stream's events (each with its `event:` line, if any), volatile fields blanked."""
    return [blank(e) for e in raw.split(b"\n\n") if e.strip()]


def _usage_in(doc: Any) -> dict[str, Any] | None:
    if isinstance(doc, dict):
        if isinstance(doc.get("usage"), dict):
            return doc["usage"]
        for value in doc.values():
            if (found := _usage_in(value)) is not None:
                return found
    return None


def reported(raw: bytes) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens as llama.cpp reported them in a body or a stream,
    in chat/completions' names or the Responses API's."""
    for payload in reversed([raw, *(e.partition(b"data: ")[2] for e in raw.split(b"\n\n"))]):
        try:
            usage = _usage_in(orjson.loads(payload))
        except orjson.JSONDecodeError:
            continue
        if usage is not None:
            details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
            prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
            return (
                prompt,
                usage.get("completion_tokens", usage.get("output_tokens", 0)),
                details.get("cached_tokens", 0),
            )
    raise AssertionError(f"no usage in {raw[:200]!r}")


def recorded(served: ProxyProc, headers: dict[str, str]) -> tuple[int, int, int]:
    req, _ = ledger_rows(served.db, headers["X-Request-Id"])
    assert req["usage_source"] == "upstream"
    return req["prompt_tokens"], req["completion_tokens"], req["cached_tokens"]


def both(
    served: ProxyProc, upstream: LlamaCppServer, api: str, model: str, **extra: Any
) -> tuple[tuple[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]:
    """The same body to llama.cpp directly (with the tier's model name) and through the proxy
    (with model "auto"): (direct, proxied)."""
    body = {**BODIES[api], **extra}
    direct = post(f"{upstream.base_url}/{api}", {**body, "model": model})
    proxied = post(f"{served.url}/v1/{api}", {**body, "model": "auto"})
    return direct, proxied


@pytest.mark.parametrize("api", ["chat/completions", "responses", "completions"])
def test_plain_answers_are_the_same_bytes_as_direct(served: ProxyProc, llamacpp: LlamaCppServer, api: str) -> None:
    (d_status, d_headers, direct), (p_status, p_headers, proxied) = both(served, llamacpp, api, LLAMA_MODEL)
    assert d_status == p_status == 200, proxied
    assert p_headers["X-Proxy-Tier"] == "llama"
    assert blank(proxied) == blank(direct)
    assert p_headers["Content-Type"] == d_headers["Content-Type"]
    assert b'"usage":{' in direct  # the comparison covers the usage, not only the text
    assert recorded(served, p_headers) == reported(direct)


@pytest.mark.parametrize(
    ("api", "usage"),
    [
        pytest.param("chat/completions", True, id="chat-client-asks-usage"),
        pytest.param("chat/completions", False, id="chat"),
        # The Responses API has no stream_options: its usage is always in response.completed.
        pytest.param("responses", False, id="responses"),
        pytest.param("completions", True, id="completions-client-asks-usage"),
        pytest.param("completions", False, id="completions"),
    ],
)
def test_streams_are_the_same_events_as_direct(
    served: ProxyProc, llamacpp: LlamaCppServer, api: str, usage: bool
) -> None:
    """Streamed, event by event. With `stream_options.include_usage` the client gets exactly
    llama.cpp's stream. Without it the proxy still asks (for the ledger) and hides what that
    adds; for chat llama.cpp then moves its non-standard `timings` from the finish chunk to the
    hidden usage chunk (README: "What is passed through"), which is the one allowed difference.
    (llama.cpp's /v1/completions puts usage on its finish chunk whatever stream_options says.)"""
    extra: dict[str, Any] = {"stream": True}
    if usage:
        extra["stream_options"] = {"include_usage": True}
    (d_status, d_headers, direct), (p_status, p_headers, proxied) = both(served, llamacpp, api, LLAMA_MODEL, **extra)
    assert d_status == p_status == 200, proxied
    assert p_headers["X-Proxy-Tier"] == "llama"
    want = events(direct)
    if api == "chat/completions" and not usage:
        want = [e.replace(b',"timings":_', b"") for e in want]
    assert events(proxied) == want
    assert p_headers["Content-Type"].split(";")[0] == d_headers["Content-Type"] == "text/event-stream"
    if api == "responses":
        assert want[-1].startswith(b"event: response.completed\n") and b'"usage":{' in want[-1]
    else:
        assert want[-1] == b"data: [DONE]"
        # usage where llama.cpp put it when asked directly (chat), or always (completions)
        assert (b'"usage":{' in want[-2]) is (usage or api == "completions")
    assert len(want) >= 6 + 2  # an event per token (max 6), and the end: the comparison is not vacuous
    # The ledger has llama.cpp's own count, also when the client did not ask to see it.
    assert recorded(served, p_headers) == (reported(direct) if b'"usage":{' in direct else (28, 6, 0))


@pytest.mark.parametrize("encoding", [None, "float", "base64"])
def test_embeddings_are_the_same_bytes_as_direct(
    served: ProxyProc, llamacpp_embeddings: LlamaCppServer, encoding: str | None
) -> None:
    extra = {} if encoding is None else {"encoding_format": encoding}
    (d_status, _, direct), (p_status, p_headers, proxied) = both(
        served, llamacpp_embeddings, "embeddings", EMBED_MODEL, **extra
    )
    assert d_status == p_status == 200, proxied
    assert p_headers["X-Proxy-Tier"] == "ollama"  # llama does not list embeddings: left out of the chain
    assert proxied == direct  # no id, no clock, no timings: nothing to normalise
    doc = orjson.loads(direct)
    assert len(doc["data"]) == 2 and doc["usage"]["prompt_tokens"] > 0
    assert recorded(served, p_headers) == (doc["usage"]["prompt_tokens"], 0, 0)


async def test_embeddings_with_the_openai_sdk_through_the_proxy_and_directly(
    served: ProxyProc, llamacpp_embeddings: LlamaCppServer
) -> None:
    """The openai SDK's embeddings.create (which asks for base64 and decodes it) gets the same
    vectors through the proxy as from llama.cpp itself, and the call is in the ledger."""
    rid = request_id("embeddings-sdk")
    inputs = ["the plan", "a quiet river", "hello world"]
    via = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="client-key", max_retries=0, timeout=10)
    direct = openai.AsyncOpenAI(base_url=llamacpp_embeddings.base_url, api_key="unused", max_retries=0, timeout=10)
    raw = await via.embeddings.with_raw_response.create(model="auto", input=inputs, extra_headers={"X-Request-Id": rid})
    got, want = raw.parse(), await direct.embeddings.create(model=EMBED_MODEL, input=inputs)
    assert raw.headers["X-Proxy-Tier"] == "ollama"
    assert [d.embedding for d in got.data] == [d.embedding for d in want.data]
    assert len(got.data) == 3 and len(got.data[0].embedding) == 64  # the tiny model's width
    assert got.data[0].embedding != got.data[1].embedding
    assert got.usage == want.usage
    req, atts = ledger_rows(served.db, rid)
    assert (req["tier"], req["status"], req["outcome"], req["model"]) == ("ollama", 200, "ok", EMBED_MODEL)
    assert (req["prompt_tokens"], req["completion_tokens"]) == (got.usage.prompt_tokens, 0)
    assert [(a["tier"], a["outcome"]) for a in atts] == [("ollama", "ok")]
    await via.close()
    await direct.close()


# ---------------------------------------------------------------------------- a tier without embeddings


@pytest.fixture
def undeclared(llamacpp: LlamaCppServer, llamacpp_embeddings: LlamaCppServer, tmp_path: Path) -> Iterator[ProxyProc]:
    """proxy serve with no `endpoints:` anywhere (the default: every tier serves all four), the
    primary being a llama.cpp server started without embeddings, which answers /v1/embeddings
    with 501 "This server does not support embeddings"."""
    tiers = {
        "llama": {"base_url": llamacpp.base_url, "model": LLAMA_MODEL, "timeout_seconds": 5},
        "ollama": {"base_url": llamacpp_embeddings.base_url, "model": EMBED_MODEL, "timeout_seconds": 5},
        "kimi": {"base_url": closed_port_url(), "model": "kimi-k2.5", "paid": True, "api_key_env": "TEST_KIMI_KEY"},
    }
    config = {"tiers": tiers, "ledger": {"path": str(tmp_path / "ledger.db")}}
    proc = ProxyProc.start(tmp_path, config, {"TEST_KIMI_KEY": KIMI_KEY})
    yield proc
    assert proc.terminate() == 0


def test_a_501_for_an_endpoint_the_tier_lacks_is_not_retried_there(undeclared: ProxyProc) -> None:
    """501 Not Implemented is the server saying it has no such endpoint: asking it again cannot
    help (as for the 400/404 refusals, the next tier is tried at once)."""
    status, headers, body = post(f"{undeclared.url}/v1/embeddings", {**BODIES["embeddings"], "model": "auto"})
    assert status == 200 and headers["X-Proxy-Tier"] == "ollama", body
    _, atts = ledger_rows(undeclared.db, headers["X-Request-Id"])
    assert [(a["tier"], a["http_status"]) for a in atts] == [("llama", 501), ("ollama", 200)]


def test_embeddings_a_tier_lacks_do_not_open_its_breaker_for_chat(undeclared: ProxyProc) -> None:
    """A tier whose server has no embeddings is healthy for chat: escalate_after_failures (3)
    embeddings calls answered 501 by it must not open its breaker and send chat elsewhere."""
    for _ in range(3):
        status, headers, body = post(f"{undeclared.url}/v1/embeddings", {**BODIES["embeddings"], "model": "auto"})
        assert status == 200 and headers["X-Proxy-Tier"] == "ollama", body
    status, headers, body = post(
        f"{undeclared.url}/v1/chat/completions", {**BODIES["chat/completions"], "model": "auto"}
    )
    assert status == 200, body
    assert headers["X-Proxy-Tier"] == "llama", f"chat went to {headers['X-Proxy-Tier']}: llama's breaker opened"


# ---------------------------------------------------------------------------- real clients, real server


async def test_agents_sdk_defaults_get_what_llamacpp_gives_directly(
    served: ProxyProc, llamacpp: LlamaCppServer
) -> None:
    """The OpenAI Agents SDK with its defaults (the Responses API), plain and streamed runs: the
    same agent gets the same final output through the proxy as pointed at llama.cpp itself."""
    settings = agents.ModelSettings(max_tokens=6, temperature=0, extra_body={"seed": 7, "cache_prompt": False})
    outputs: dict[str, list[str]] = {}
    agents.set_tracing_disabled(True)
    for where, base_url, model in (
        ("direct", llamacpp.base_url, LLAMA_MODEL),
        ("proxied", f"{served.url}/v1", "auto"),
    ):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="client-key", max_retries=0, timeout=10)
        agents.set_default_openai_client(client, use_for_tracing=False)
        agent = agents.Agent(name="planner", instructions="Be brief.", model=model, model_settings=settings)
        plain = await agents.Runner.run(agent, PROMPT)
        streamed = agents.Runner.run_streamed(agent, PROMPT)
        deltas = [
            e.data.delta
            async for e in streamed.stream_events()
            if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
        ]
        outputs[where] = [str(plain.final_output), str(streamed.final_output), "".join(deltas)]
        await client.close()
    assert outputs["proxied"] == outputs["direct"]
    assert outputs["direct"][0] and len(set(outputs["direct"])) == 1


def test_llama_index_openailike_defaults_get_what_llamacpp_gives_directly(
    served: ProxyProc, llamacpp: LlamaCppServer
) -> None:
    """llama-index's OpenAILike with its defaults (/v1/completions): .complete() and
    .stream_complete() through the proxy give what they give pointed at llama.cpp itself."""
    texts: dict[str, list[str]] = {}
    for where, base_url, model in (
        ("direct", llamacpp.base_url, LLAMA_MODEL),
        ("proxied", f"{served.url}/v1", "auto"),
    ):
        llm = OpenAILike(
            model=model,
            api_base=base_url,
            api_key="client-key",
            max_tokens=6,
            temperature=0,
            additional_kwargs={"seed": 7, "extra_body": {"cache_prompt": False}},
        )
        texts[where] = [llm.complete(PROMPT).text, "".join(c.delta or "" for c in llm.stream_complete(PROMPT))]
    assert texts["proxied"] == texts["direct"]
    assert texts["direct"][0] and texts["direct"][0] == texts["direct"][1]
