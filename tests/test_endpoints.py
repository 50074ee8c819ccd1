"""The Responses, Completions and Embeddings APIs and GET /v1/models/{id}, through the real app,
simulated tiers and the real openai SDK: the same chain, failover and ledger as chat."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config


def hits(ups: dict[str, Upstream]) -> dict[str, int]:
    return {name: u.hits for name, u in ups.items()}


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)


async def request_row(db: Path, rid: str) -> dict[str, Any]:
    for _ in range(200):
        with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM requests WHERE id = ?", (rid,)).fetchone()
            if row is not None:
                return dict(row)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no ledger row for {rid}")


def events_of(raw: bytes) -> list[tuple[str | None, Any]]:
    out: list[tuple[str | None, Any]] = []
    for block in raw.split(b"\n\n"):
        name = None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
                out.append((name, data if data == b"[DONE]" else orjson.loads(data)))
    return out


async def test_responses_fail_over_and_record_usage(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["llama"].always(Behaviour(status=503))
    upstreams["ollama"].always(Behaviour(content="Plan: ship it."))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    raw = await sdk(client).responses.with_raw_response.create(
        model="auto", input="plan", extra_headers={"X-Request-Id": "resp-1"}
    )
    response = raw.parse()
    assert response.output_text == "Plan: ship it."
    assert raw.headers["X-Proxy-Tier"] == "ollama" and raw.headers["X-Proxy-Attempts"] == "2"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}
    sent = upstreams["ollama"].stats.requests[-1]
    assert sent.path == "/v1/responses" and sent.json["model"] == "qwen2.5:7b" and sent.json["input"] == "plan"
    row = await request_row(tmp_path / "ledger.db", "resp-1")
    assert response.usage is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    assert row["usage_source"] == "upstream"


async def test_a_responses_stream_fails_over_before_its_answer_begins(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    # llama sends response.created and response.in_progress, then its connection drops.
    upstreams["llama"].always(Behaviour(drop_after=0))
    upstreams["ollama"].always(Behaviour(content="Streamed plan.", chunks=3))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    kinds, text = [], ""
    async with sdk(client).responses.stream(model="auto", input="plan") as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = await stream.get_final_response()
    assert text == "Streamed plan." and final.output_text == "Streamed plan."
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}


async def test_a_responses_stream_broken_after_commit_ends_with_an_error_event(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(content="one two three four", chunks=4, drop_after=2))
    client = await make_proxy()
    resp = await client.post("/v1/responses", json={"model": "auto", "input": "x", "stream": True})
    events = events_of(await resp.read())
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
    name, last = events[-1]
    assert name == "error" and last["type"] == "error" and last["code"] == "stream_interrupted"
    assert "response.completed" not in [e[0] for e in events]
    assert hits(upstreams)["ollama"] == 0  # committed: nothing can be retried


async def test_completions_plain_and_streamed(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].script(Behaviour(status=500), Behaviour(content="Hello there"))
    upstreams["llama"].always(Behaviour(content="Hello there", chunks=3))
    client = await make_proxy()
    openai_client = sdk(client)
    done = await openai_client.completions.create(model="auto", prompt="Say hello")
    assert done.choices[0].text == "Hello there" and done.usage is not None
    pieces = [
        c.choices[0].text
        async for c in await openai_client.completions.create(model="auto", prompt="x", stream=True)
        if c.choices
    ]
    assert "".join(pieces) == "Hello there"
    assert upstreams["llama"].stats.requests[-1].path == "/v1/completions"
    # The proxy asked for usage on the client's behalf; the client did not, so it saw no usage chunk.
    assert upstreams["llama"].stats.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_embeddings_skip_tiers_that_do_not_serve_them(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    tiers = tier_config(upstreams, llama={"endpoints": ["chat/completions", "responses"]})
    client = await make_proxy(tiers=tiers)
    raw = await sdk(client).embeddings.with_raw_response.create(
        model="auto", input=["a", "b"], extra_headers={"X-Request-Id": "emb-1"}
    )
    result = raw.parse()
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert raw.headers["X-Proxy-Tier"] == "ollama"
    assert hits(upstreams) == {"llama": 0, "ollama": 1, "kimi": 0}
    row = await request_row(tmp_path / "ledger.db", "emb-1")
    assert row["prompt_tokens"] == result.usage.prompt_tokens and row["completion_tokens"] == 0


async def test_no_tier_serving_an_endpoint_is_a_clear_404(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    only_chat = {"endpoints": ["chat/completions"]}
    client = await make_proxy(tiers=tier_config(upstreams, llama=only_chat, ollama=only_chat, kimi=only_chat))
    resp = await client.post("/v1/embeddings", json={"model": "auto", "input": "x"})
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["code"] == "endpoint_not_served" and "/v1/embeddings" in err["message"] and "endpoints" in err["message"]
    assert sum(hits(upstreams).values()) == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"model": "auto"}, "input"),
        ("/v1/completions", {"model": "auto"}, "prompt"),
        ("/v1/embeddings", {"model": "auto", "input": 3}, "input"),
        ("/v1/embeddings", {"model": "auto", "input": "x", "stream": True}, "stream"),
    ],
)
async def test_bad_bodies_are_400s_naming_the_field(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], path: str, body: dict[str, Any], param: str
) -> None:
    client = await make_proxy()
    resp = await client.post(path, json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert sum(hits(upstreams).values()) == 0


async def test_models_retrieve_knows_every_name(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    openai_client = sdk(client)
    for name in ("auto", "llama", "llama3.1-8b", "kimi-k2"):
        assert (await openai_client.models.retrieve(name)).id == name
    with pytest.raises(openai.NotFoundError) as e:
        await openai_client.models.retrieve("gpt-9")
    assert "auto" in str(e.value)


async def test_a_model_path_without_an_id_is_no_endpoint(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    for method in ("GET", "POST"):
        resp = await client.request(method, "/v1/models/")
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"
    resp = await client.post("/v1/models/llama")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
