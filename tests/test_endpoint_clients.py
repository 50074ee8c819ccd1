"""Real clients of the new endpoints through the real `proxy serve` process, in front of simulated
tiers: the OpenAI Agents SDK with its defaults (the Responses API) running a tool-calling agent,
the openai SDK's `responses.create` failing over from upstreams that break before their answer
begins, llama-index's `OpenAILike` with its defaults (the legacy /v1/completions) and
`client.models.retrieve`. tests/test_endpoints.py covers the same endpoints in-process."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agents
import openai
import pytest
from llama_index.llms.openai_like import OpenAILike

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread, ledger_rows, proxy_config, request_id
from tests.support.proc import ProxyProc

TIERS = ("llama", "ollama", "kimi")


# ---------------------------------------------------------------------------- an upstream that breaks

STALL = b"<stall>"


@dataclass
class RawUpstream:
    """Answers each request with the next scripted bytes (status line, headers and body as
    written), then closes the connection: faults aiohttp's own server would never produce.
    A reply starting with STALL is sent without it and the connection is then held open, silent,
    until the proxy hangs up."""

    url: str = ""
    replies: deque[bytes] = field(default_factory=deque)
    hits: int = 0
    paths: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.hits += 1
            self.paths.append(head.split(b" ", 2)[1].decode())
            reply = self.replies.popleft() if self.replies else b"HTTP/1.1 500 No script\r\n\r\n"
            writer.write(reply.removeprefix(STALL))
            await writer.drain()
            if reply.startswith(STALL):
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(reader.read(), 5)  # b"" once the proxy closes
        finally:
            writer.close()


def sse_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CREATED = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":'
    b'{"id":"resp_raw","object":"response","status":"in_progress","output":[],"model":"raw"}}\n\n'
)
# The answer's first event would be next; the connection drops instead (no terminating chunk).
DIES_AFTER_CREATED = sse_head() + chunk(CREATED)
# ... or the stream ends cleanly there (the last chunk is sent): no answer, no response.completed.
ENDS_AFTER_CREATED = sse_head() + chunk(CREATED) + b"0\r\n\r\n"
# ... or it sends nothing more and keeps the connection open.
STALLS_AFTER_CREATED = STALL + sse_head() + chunk(CREATED)
# A 200 whose JSON body ends half way (its Content-Length promises more).
HALF_A_BODY = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"id":"resp_raw","obj'


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw(sims: SimThread) -> Iterator[RawUpstream]:
    upstream = RawUpstream()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(upstream.handle, "127.0.0.1", 0)

    async def stop(server: asyncio.Server) -> None:
        server.close()
        await server.wait_closed()

    server = sims.run(start())
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    yield upstream
    sims.run(stop(server))


def _serve(sims: SimThread, work: Path, llama_url: str) -> Iterator[ProxyProc]:
    urls = {name: sim.url for name, sim in sims.sims.items()}
    config = proxy_config({**urls, "llama": llama_url}, work / "ledger.db", retries={"max_fallback_retries": 1})
    proc = ProxyProc.start(work, config, KIMI_ENV)
    yield proc
    assert proc.terminate() == 0


@pytest.fixture(scope="module")
def served(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    """proxy serve in front of the three simulated tiers."""
    yield from _serve(sims, tmp_path_factory.mktemp("clients"), sims.sims["llama"].url)


@pytest.fixture(scope="module")
def served_raw(sims: SimThread, raw: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    """proxy serve whose llama tier is the RawUpstream; ollama and kimi are simulated."""
    yield from _serve(sims, tmp_path_factory.mktemp("clients-raw"), raw.url)


@pytest.fixture
def proxy(served: ProxyProc, sims: SimThread) -> ProxyProc:
    sims.reset()
    assert served.alive(), served.log_text()[-3000:]
    return served


def sdk(proxy: ProxyProc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0, timeout=10)


def requests_under(db: Path, rid: str, n: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The `n` request rows recorded under X-Request-Id `rid` (a reused id is stored as `rid~suffix`),
    oldest first, each with its attempt rows; waits for the background writer."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            reqs = conn.execute(
                "SELECT * FROM requests WHERE id = ? OR id LIKE ? ORDER BY started_at", (rid, f"{rid}~%")
            ).fetchall()
            if len(reqs) >= n:
                out = []
                for req in reqs:
                    atts = conn.execute("SELECT * FROM attempts WHERE request_id = ? ORDER BY n", (req["id"],))
                    out.append((dict(req), [dict(a) for a in atts.fetchall()]))
                return out
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} ledger rows for {rid}")
        time.sleep(0.02)


def responses_requests(sims: SimThread, tier: str) -> list[dict[str, Any]]:
    return [r.json for r in sims.sims[tier].stats.requests if r.path == "/v1/responses" and isinstance(r.json, dict)]


# ---------------------------------------------------------------------------- the OpenAI Agents SDK


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_agents_sdk_runs_a_tool_agent_through_failover(proxy: ProxyProc, sims: SimThread, streamed: bool) -> None:
    """The Agents SDK with its defaults (Responses API, HTTP transport) runs an agent whose model
    first calls a function tool, then answers; the free primary is down (503) for both model
    calls, so both come from the second free tier, and the paid tier is never asked."""
    llama, ollama = sims.sims["llama"], sims.sims["ollama"]
    llama.always(Behaviour(status=503))
    ollama.settings.script.extend(
        [
            Behaviour(tool_calls=[("get_weather", '{"city": "Oslo"}')]),
            Behaviour(content="It is sunny in Oslo."),
        ]
    )
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    rid = request_id("agents")
    client = openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0, default_headers={"X-Request-Id": rid}
    )
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", model="auto", tools=[get_weather])

    result: agents.RunResult | agents.RunResultStreaming
    if streamed:
        result = agents.Runner.run_streamed(agent, "What is the weather in Oslo?")
        kinds = [event.type async for event in result.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    else:
        result = await agents.Runner.run(agent, "What is the weather in Oslo?")

    assert result.final_output == "It is sunny in Oslo."
    assert seen == ["Oslo"]
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 0}
    first, second = responses_requests(sims, "ollama")
    assert first.get("stream", False) is second.get("stream", False) is streamed
    assert first["model"] == second["model"] == "qwen2.5:7b"  # the tier's model; the agent said "auto"
    assert [t["name"] for t in first["tools"]] == ["get_weather"] and first["tools"][0]["type"] == "function"
    assert first["instructions"] == "Answer with the weather."
    assert "previous_response_id" not in second  # stateless: the whole conversation is sent again
    by_type = {item.get("type", "message"): item for item in second["input"]}
    assert by_type["function_call"]["call_id"] == by_type["function_call_output"]["call_id"] == "call_0"
    assert by_type["function_call"]["name"] == "get_weather"
    assert by_type["function_call_output"]["output"] == "sunny in Oslo"
    assert by_type["message"]["content"] == "What is the weather in Oslo?"

    # Both model calls carried the client's X-Request-Id: the ledger keeps both (the second renamed).
    rows = requests_under(proxy.db, rid, 2)
    assert len(rows) == 2
    for req, atts in rows:
        assert (req["tier"], req["status"], req["outcome"], req["attempts"], req["paid"]) == ("ollama", 200, "ok", 2, 0)
        assert req["requested_model"] == "auto" and req["model"] == "qwen2.5:7b" and req["cost_usd"] == 0
        assert [(a["tier"], a["http_status"], a["outcome"]) for a in atts] == [
            ("llama", 503, "http_error"),
            ("ollama", 200, "ok"),
        ]
    usage = result.context_wrapper.usage
    assert sum(req["prompt_tokens"] for req, _ in rows) == usage.input_tokens
    assert sum(req["completion_tokens"] for req, _ in rows) == usage.output_tokens
    await client.close()


# ---------------------------------------------------------------------------- openai SDK: responses.create


@pytest.mark.parametrize(
    ("fault", "stream", "outcome"),
    [
        pytest.param(DIES_AFTER_CREATED, True, "connect_error", id="stream-dies-after-response.created"),
        pytest.param(ENDS_AFTER_CREATED, True, "bad_response", id="stream-ends-after-response.created"),
        pytest.param(STALLS_AFTER_CREATED, True, "timeout", id="stream-stalls-after-response.created"),
        pytest.param(HALF_A_BODY, False, "connect_error", id="plain-body-cut-short"),
    ],
)
async def test_responses_fail_over_from_an_upstream_that_breaks_before_its_answer(
    served_raw: ProxyProc, sims: SimThread, raw: RawUpstream, fault: bytes, stream: bool, outcome: str
) -> None:
    """The openai SDK's responses.create, plain and streamed: llama breaks before its answer
    begins (a connection lost is `connect_error`, a clean end with no answer `bad_response`);
    nothing of it reaches the client, which gets ollama's answer whole."""
    sims.reset()
    raw.replies.clear()
    raw.replies.append(fault)
    hits_before = raw.hits
    sims.sims["ollama"].always(Behaviour(content="Failed over: fine.", chunks=3))
    rid = request_id("responses-raw")
    client = sdk(served_raw).with_options(default_headers={"X-Request-Id": rid})
    if stream:
        kinds, text = [], ""
        async with client.responses.stream(model="auto", input="plan") as events:
            async for event in events:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            final = await events.get_final_response()
        # The client sees one response: the one from ollama, from its response.created on.
        assert kinds.count("response.created") == 1 and kinds[-1] == "response.completed"
        assert final.id.startswith("resp_sim_") and text == "Failed over: fine."
    else:
        final = await client.responses.create(model="auto", input="plan")
    assert final.output_text == "Failed over: fine."
    assert raw.hits - hits_before == 1 and raw.paths[-1] == "/v1/responses"
    assert sims.hits() == {"llama": 0, "ollama": 1, "kimi": 0}
    req, atts = ledger_rows(served_raw.db, rid)
    assert (req["tier"], req["outcome"], req["stream"]) == ("ollama", "ok", int(stream))
    assert [(a["tier"], a["outcome"]) for a in atts] == [("llama", outcome), ("ollama", "ok")]
    assert final.usage is not None and req["completion_tokens"] == final.usage.output_tokens


async def test_a_responses_stream_broken_mid_answer_is_an_error_to_both_sdks(proxy: ProxyProc, sims: SimThread) -> None:
    """llama's stream is cut after two text deltas (committed: no failover). The openai SDK gets
    the `error` event and no final response; the Agents SDK's streamed run raises, naming the
    cause, rather than ending with half an answer; the ledger says error."""
    sims.sims["llama"].always(Behaviour(content="one two three four", chunks=4, drop_after=2))
    rid = request_id("responses-broken")
    client = sdk(proxy).with_options(default_headers={"X-Request-Id": rid})
    kinds = []
    async with client.responses.stream(model="auto", input="plan") as events:
        async for event in events:
            kinds.append(event.type)
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await events.get_final_response()
    assert kinds[-1] == "error" and kinds.count("response.output_text.delta") == 2
    req, atts = ledger_rows(proxy.db, rid)
    assert (req["tier"], req["outcome"], req["status"]) == ("llama", "error", 200)
    assert [a["tier"] for a in atts] == ["llama"]

    agents.set_default_openai_client(sdk(proxy), use_for_tracing=False)
    agents.set_tracing_disabled(True)
    run = agents.Runner.run_streamed(agents.Agent(name="planner", model="auto"), "plan")
    with pytest.raises(agents.ModelBehaviorError, match="stream_interrupted"):
        async for _ in run.stream_events():
            pass
    assert sims.hits() == {"llama": 2, "ollama": 0, "kimi": 0}


async def test_the_error_event_of_a_broken_responses_stream_is_numbered_after_the_others(
    proxy: ProxyProc, sims: SimThread
) -> None:
    """Responses stream events carry an increasing `sequence_number` (clients order, resume and
    de-duplicate by it); the error event the proxy adds to a broken stream must come after the
    last one relayed, not restart at 0."""
    sims.sims["llama"].always(Behaviour(content="one two three four", chunks=4, drop_after=2))
    stream = await sdk(proxy).responses.create(model="auto", input="plan", stream=True)
    numbers = [(event.type, event.sequence_number) async for event in stream]
    assert numbers[-1][0] == "error"
    seq = [n for _, n in numbers]
    assert seq == sorted(set(seq)), f"sequence numbers not increasing: {numbers}"


# ---------------------------------------------------------------------------- llama-index OpenAILike


def test_llama_index_openailike_defaults_use_completions(proxy: ProxyProc, sims: SimThread) -> None:
    """OpenAILike's defaults (is_chat_model=False: /v1/completions; its own max_retries=3 and
    timeout=60 left alone): .complete() and .stream_complete() fail over from a 503 primary."""
    sims.sims["llama"].always(Behaviour(status=503))
    sims.sims["ollama"].always(Behaviour(content="Completed text.", chunks=4))
    llm = OpenAILike(model="auto", api_base=f"{proxy.url}/v1", api_key="client-key")

    done = llm.complete("Say something")
    assert done.text == "Completed text."
    pieces = [c.delta for c in llm.stream_complete("Say something") if c.delta]
    assert "".join(pieces) == "Completed text." and len(pieces) == 4

    sent = [r for r in sims.sims["ollama"].stats.requests if isinstance(r.json, dict)]
    assert [r.path for r in sent] == ["/v1/completions", "/v1/completions"]
    assert sent[0].json["prompt"] == "Say something" and sent[0].json["model"] == "qwen2.5:7b"
    assert sent[1].json["stream"] is True
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 0}


# ---------------------------------------------------------------------------- GET /v1/models/{id}


async def test_models_retrieve_through_proxy_serve(proxy: ProxyProc) -> None:
    client = sdk(proxy)
    names = ("auto", "ollama", "kimi")
    assert [(await client.models.retrieve(name)).id for name in names] == list(names)
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-9")
