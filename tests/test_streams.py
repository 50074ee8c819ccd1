"""Streaming: the commit rule, usage handling, mid-stream failures, client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson

from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config

MSG = {"messages": [{"role": "user", "content": "plan"}]}


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "stream": True, **MSG, **extra}


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def data_events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for e in events(raw):
        if e.startswith(b"data: "):
            payload = e[6:]
            out.append(payload if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def test_stream_relays_events_and_hides_proxy_requested_usage(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Proxy-Tier"] == "llama"
    raw = await resp.read()
    evs = data_events(raw)
    assert evs[-1] == b"[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["choices"] for c in chunks), "the usage-only chunk the proxy asked for is hidden"
    assert b'"usage"' not in raw, "the client did not ask for usage; the stream looks as if nobody did"
    # but the upstream was asked for it, so the ledger gets real tokens
    assert upstreams["llama"].stats.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_stream_keeps_usage_when_client_asked(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=stream_body(stream_options={"include_usage": True}))
    evs = data_events(await resp.read())
    assert evs[-1] == b"[DONE]"
    assert evs[-2]["choices"] == [] and evs[-2]["usage"]["completion_tokens"] > 0


async def test_stream_fails_over_before_first_event(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    # llama sends keep-alive comments but no data before its timeout: comments do not count
    upstreams["llama"].always(Behaviour(first_event_delay=0.6, keepalive_interval=0.03))
    tiers = tier_config(upstreams, llama={"timeout_seconds": 0.2})
    client = await make_proxy(tiers=tiers)
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert resp.headers["X-Proxy-Attempts"] == "2"
    raw = await resp.read()
    assert b"keep-alive" not in raw, "nothing from the abandoned attempt reaches the client"
    assert data_events(raw)[-1] == b"[DONE]"
    assert (upstreams["llama"].hits, upstreams["ollama"].hits) == (1, 1)


async def test_stream_error_status_fails_over(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(status=503))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert data_events(await resp.read())[-1] == b"[DONE]"


async def test_stream_cut_after_commit_ends_with_error_event(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(drop_after=3))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert resp.status == 200  # committed at the first event
    evs = data_events(await resp.read())
    assert b"[DONE]" not in evs
    assert evs[-1]["error"]["code"] == "stream_interrupted"
    assert "connection lost" in evs[-1]["error"]["message"] or "without [DONE]" in evs[-1]["error"]["message"]
    assert upstreams["ollama"].hits == 0, "no failover after the stream was committed"


async def test_stream_without_done_is_not_a_clean_end(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(no_done=True))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=stream_body())
    evs = data_events(await resp.read())
    assert "without [DONE]" in evs[-1]["error"]["message"]


async def test_stream_idle_gap_times_out(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(chunk_delay=0.5, chunks=3))
    tiers = tier_config(upstreams, llama={"stream_idle_timeout_seconds": 0.15})
    client = await make_proxy(tiers=tiers)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await client.post("/v1/chat/completions", json=stream_body())
    evs = data_events(await resp.read())
    assert loop.time() - t0 < 0.45
    assert "stalled" in evs[-1]["error"]["message"]


async def test_client_disconnect_cancels_upstream(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(stall=True))
    client = await make_proxy()
    url = client.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        with contextlib.suppress(TimeoutError):
            await s.post(url, json=stream_body(stream=False), timeout=aiohttp.ClientTimeout(total=0.2))
    for _ in range(50):
        if upstreams["llama"].stats.cancelled:
            break
        await asyncio.sleep(0.02)
    assert upstreams["llama"].stats.cancelled == 1
    assert upstreams["llama"].stats.active == 0


async def test_client_leaving_mid_stream_cancels_upstream(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(chunk_delay=0.05, chunks=40))
    client = await make_proxy()
    url = client.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url, json=stream_body())
        await resp.content.readany()
        resp.close()
    for _ in range(50):
        if upstreams["llama"].stats.active == 0:
            break
        await asyncio.sleep(0.02)
    assert upstreams["llama"].stats.active == 0
    assert upstreams["llama"].stats.cancelled == 1


async def test_stream_larger_than_max_response_bytes_ends_with_error_event(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    # 5000 events of ~200 bytes, each far below the limit: only the whole stream passes it
    upstreams["llama"].always(Behaviour(chunks=5000, chunk_delay=0.0))
    limit = 64 * 1024
    client = await make_proxy(server={"max_response_bytes": limit})
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert resp.status == 200
    raw = await resp.read()
    evs = data_events(raw)
    assert evs[-1]["error"]["code"] == "stream_interrupted"
    assert "server.max_response_bytes" in evs[-1]["error"]["message"]
    assert b"[DONE]" not in raw
    assert limit - 4096 < len(raw) <= limit + 1024, len(raw)
    for _ in range(50):
        if upstreams["llama"].stats.active == 0:
            break
        await asyncio.sleep(0.02)
    assert upstreams["llama"].stats.active == 0, "the upstream is no longer read"
    assert upstreams["ollama"].hits == 0, "no failover after commit"


async def test_stream_within_max_response_bytes_is_whole(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(chunks=200))
    client = await make_proxy(server={"max_response_bytes": 64 * 1024})
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert data_events(await resp.read())[-1] == b"[DONE]"


async def test_stream_max_seconds_caps_an_endless_stream(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    # an event every 20 ms never trips the idle timeout; only the duration cap ends it
    upstreams["llama"].always(Behaviour(chunks=1000, chunk_delay=0.02))
    tiers = tier_config(upstreams, llama={"stream_idle_timeout_seconds": 0.5, "stream_max_seconds": 0.3})
    client = await make_proxy(tiers=tiers)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await client.post("/v1/chat/completions", json=stream_body())
    evs = data_events(await resp.read())
    assert 0.3 <= loop.time() - t0 < 0.8
    assert len(evs) > 5, "events flowed until the cap"
    assert evs[-1]["error"]["code"] == "stream_interrupted"
    assert "stream_max_seconds" in evs[-1]["error"]["message"]
