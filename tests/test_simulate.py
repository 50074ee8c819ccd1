"""The simulated upstream: answer shapes, stream framing and every fault knob."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.sim import (
    SIM_SETTINGS,
    SIM_STATS,
    Behaviour,
    SimSettings,
    create_sim_app,
    start_sim,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

URL = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(stream: bool = False, include_usage: bool = False, model: str = "m-1") -> dict[str, Any]:
    req: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if stream:
        req["stream"] = True
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    return req


async def sim(aiohttp_client: MakeClient, **kwargs: Any) -> Client:
    return await aiohttp_client(create_sim_app(SimSettings(**kwargs)))


async def read_events(resp: aiohttp.ClientResponse) -> tuple[list[str], list[str], bool]:
    """(data payloads, comment lines, ended cleanly) of an SSE response."""
    data: list[str] = []
    comments: list[str] = []
    clean = True
    try:
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                data.append(line[len("data: ") :])
            elif line.startswith(":"):
                comments.append(line)
    except aiohttp.ClientPayloadError:
        clean = False
    return data, comments, clean


async def wait_for(check: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_non_stream_completion_shape(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=5))
    resp = await client.post(URL, json=chat())
    assert resp.status == 200
    assert resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["id"] == "chatcmpl-sim-1"
    assert doc["object"] == "chat.completion"
    assert isinstance(doc["created"], int)
    assert doc["model"] == "m-1"
    assert doc["system_fingerprint"]
    assert doc["sim_tier"] == "sim"
    (choice,) = doc["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    usage = doc["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    # The next request gets the next id; a fixed model overrides the echo.
    client.app[SIM_SETTINGS].model = "fixed"
    doc = await (await client.post(URL, json=chat())).json()
    assert (doc["id"], doc["model"]) == ("chatcmpl-sim-2", "fixed")


async def test_stream_event_order_without_usage(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=3))
    resp = await client.post(URL, json=chat(stream=True))
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    data, comments, clean = await read_events(resp)
    assert clean and not comments
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert len(chunks) == 1 + 3 + 1
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-sim-1" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks[1:4]:
        assert set(c["choices"][0]["delta"]) == {"content"}
        assert c["choices"][0]["finish_reason"] is None
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_stream_event_order_with_include_usage(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=4))
    resp = await client.post(URL, json=chat(stream=True, include_usage=True))
    data, _, clean = await read_events(resp)
    assert clean and data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert len(chunks) == 1 + 4 + 1 + 1
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4


async def test_stream_content_matches_non_stream(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=6))
    doc = await (await client.post(URL, json=chat())).json()
    data, _, _ = await read_events(await client.post(URL, json=chat(stream=True)))
    streamed = "".join(orjson.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert streamed == doc["choices"][0]["message"]["content"]


async def test_no_usage(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(no_usage=True))
    doc = await (await client.post(URL, json=chat())).json()
    assert "usage" not in doc
    data, _, _ = await read_events(await client.post(URL, json=chat(stream=True, include_usage=True)))
    assert data[-1] == "[DONE]"
    assert all("usage" not in orjson.loads(d) for d in data[:-1])


async def test_script_consumed_in_order_then_default(aiohttp_client: MakeClient) -> None:
    client = await sim(
        aiohttp_client,
        script=[Behaviour(status=503), Behaviour(status=429), Behaviour(chunks=2)],
        default=Behaviour(chunks=1),
    )
    statuses = []
    for _ in range(3):
        resp = await client.post(URL, json=chat())
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [503, 429, 200]
    doc = await (await client.post(URL, json=chat())).json()
    assert doc["usage"]["completion_tokens"] == 1
    # Appending at run time works too.
    client.app[SIM_SETTINGS].script.append(Behaviour(status=500))
    assert (await client.post(URL, json=chat())).status == 500
    assert (await client.post(URL, json=chat())).status == 200


async def test_error_status_with_retry_after(aiohttp_client: MakeClient) -> None:
    client = await sim(
        aiohttp_client,
        name="kimi",
        script=[Behaviour(status=429, retry_after="1"), Behaviour(status=502, error_body=b"bad gateway")],
    )
    resp = await client.post(URL, json=chat(stream=True))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert resp.content_type == "application/json"
    assert await resp.json() == {
        "error": {"message": "simulated 429 from kimi", "type": "server_error", "param": None, "code": None}
    }
    resp = await client.post(URL, json=chat())
    assert resp.status == 502
    assert "Retry-After" not in resp.headers
    assert await resp.read() == b"bad gateway"


async def test_drop_after_closes_stream_without_done(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=5, drop_after=2))
    resp = await client.post(URL, json=chat(stream=True))
    assert resp.status == 200
    data, _, clean = await read_events(resp)
    assert not clean
    assert "[DONE]" not in data
    chunks = [orjson.loads(d) for d in data]
    assert [c["choices"][0]["delta"].get("role") for c in chunks] == ["assistant", None, None]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    await wait_for(lambda: client.app[SIM_STATS].active == 0)
    assert client.app[SIM_STATS].cancelled == 0


async def test_drop_after_beyond_content_still_truncates(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=2, drop_after=10, chunk_delay=0.001))
    data, _, clean = await read_events(await client.post(URL, json=chat(stream=True)))
    assert not clean
    assert len(data) == 3  # role + both content deltas, no finish, no [DONE]


async def test_drop_after_non_stream_cuts_body(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(drop_after=20))
    resp = await client.post(URL, json=chat())
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_malformed_non_stream(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(malformed=True))
    resp = await client.post(URL, json=chat())
    assert resp.status == 200
    assert resp.content_type == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await resp.read())


async def test_malformed_stream(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(malformed=True, chunks=2))
    data, _, clean = await read_events(await client.post(URL, json=chat(stream=True)))
    assert clean and data[-1] == "[DONE]"
    bad = []
    for d in data[:-1]:
        try:
            orjson.loads(d)
        except orjson.JSONDecodeError:
            bad.append(d)
    assert len(bad) == 1
    assert data[1] == bad[0]


async def test_not_completion_and_no_done(aiohttp_client: MakeClient) -> None:
    client = await sim(
        aiohttp_client,
        script=[Behaviour(not_completion=True), Behaviour(not_completion=True), Behaviour(no_done=True)],
    )
    assert await (await client.post(URL, json=chat())).json() == {"hello": 1}
    data, _, _ = await read_events(await client.post(URL, json=chat(stream=True)))
    assert data == ['{"hello":1}', "[DONE]"]
    data, _, clean = await read_events(await client.post(URL, json=chat(stream=True)))
    assert clean and data and "[DONE]" not in data
    assert orjson.loads(data[-1])["choices"][0]["finish_reason"] == "stop"


async def test_bad_json_is_400_and_hits_are_recorded(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, script=[Behaviour(status=503)])
    stats = client.app[SIM_STATS]
    resp = await client.post(URL, data=b"{not json", headers={"Authorization": "Bearer k"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert (await client.post(URL, json=chat())).status == 200  # the 503 went to the bad request
    assert (await client.get("/v1/models")).status == 200
    assert await (await client.get("/health")).json() == {"status": "ok"}
    assert stats.hits == 4
    assert [(r.method, r.path) for r in stats.requests] == [
        ("POST", URL),
        ("POST", URL),
        ("GET", "/v1/models"),
        ("GET", "/health"),
    ]
    first, second = stats.requests[:2]
    assert first.body == b"{not json" and first.json is None
    assert first.headers["authorization"] == "Bearer k"
    assert second.json == chat()
    assert stats.active == 0 and stats.cancelled == 0


async def test_record_requests_off_still_counts(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, record_requests=False)
    for _ in range(3):
        await (await client.post(URL, json=chat())).read()
    assert client.app[SIM_STATS].hits == 3
    assert client.app[SIM_STATS].requests == []


async def test_models_list(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, name="llama", model="tiny")
    doc = await (await client.get("/v1/models")).json()
    assert doc["object"] == "list"
    assert doc["data"][0]["id"] == "tiny"


async def test_keepalive_comments_before_first_event(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(chunks=1, first_event_delay=0.05, keepalive_interval=0.01))
    resp = await client.post(URL, json=chat(stream=True))
    data, comments, clean = await read_events(resp)
    assert clean and data[-1] == "[DONE]"
    assert 2 <= len(comments) <= 5
    assert set(comments) == {": keep-alive"}


async def test_stall_counts_client_going_away(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(stall=True))
    stats = client.app[SIM_STATS]
    with pytest.raises(asyncio.TimeoutError):
        await client.post(URL, json=chat(), timeout=aiohttp.ClientTimeout(total=0.1))
    await wait_for(lambda: stats.cancelled == 1)
    assert stats.active == 0 and stats.hits == 1


async def test_stall_after_headers(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, default=Behaviour(stall_after_headers=True))
    stats = client.app[SIM_STATS]
    resp = await client.post(URL, json=chat(stream=True))
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(resp.content.readany(), 0.1)
    resp.close()
    await wait_for(lambda: stats.cancelled == 1)
    assert stats.active == 0


async def test_delays_and_trickle(aiohttp_client: MakeClient) -> None:
    client = await sim(
        aiohttp_client,
        script=[
            Behaviour(headers_delay=0.05),
            Behaviour(chunks=3, chunk_delay=0.02),
            Behaviour(status=500, error_body=b'{"error":{}}', trickle=0.002),
        ],
    )
    started = time.monotonic()
    await (await client.post(URL, json=chat())).read()
    assert time.monotonic() - started >= 0.05
    started = time.monotonic()
    data, _, clean = await read_events(await client.post(URL, json=chat(stream=True)))
    assert clean and len(data) == 6
    assert time.monotonic() - started >= 0.08  # 5 gaps between 6 events
    started = time.monotonic()
    resp = await client.post(URL, json=chat())
    assert resp.status == 500
    assert await resp.read() == b'{"error":{}}'
    assert time.monotonic() - started >= 0.02  # one byte every 2 ms


async def test_content_type_and_body_size(aiohttp_client: MakeClient) -> None:
    client = await sim(
        aiohttp_client,
        script=[Behaviour(content_type="text/html"), Behaviour(body_size=200_000)],
    )
    resp = await client.post(URL, json=chat(stream=True))
    assert resp.content_type == "text/html"
    await resp.read()
    body = await (await client.post(URL, json=chat())).read()
    assert 198_000 <= len(body) <= 202_000  # "about": the usage digits grow with the padding
    doc = orjson.loads(body)
    assert doc["usage"]["completion_tokens"] > 40_000


async def test_failure_rate_and_seed(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, failure_rate=1.0, script=[Behaviour()])
    assert (await client.post(URL, json=chat())).status == 200  # scripted requests are exempt
    resp = await client.post(URL, json=chat())
    assert resp.status == 503
    assert (await resp.json())["error"]["message"] == "simulated 503 from sim"

    async def pattern() -> list[int]:
        c = await sim(aiohttp_client, failure_rate=0.5, seed=7, latency=(0.0, 0.001))
        return [(await c.post(URL, json=chat())).status for _ in range(12)]

    first = await pattern()
    assert first == await pattern()
    assert set(first) == {200, 503}


async def test_simulated_label(aiohttp_client: MakeClient) -> None:
    client = await sim(aiohttp_client, name="llama", simulated_label=True, default=Behaviour(chunks=2))
    resp = await client.post(URL, json=chat())
    assert resp.headers["x-simulated"] == "true"
    assert (await resp.json())["choices"][0]["message"]["content"].startswith("[simulated llama] ")


async def test_start_sim_with_openai_client() -> None:
    openai = pytest.importorskip("openai")
    runner, base_url = await start_sim(SimSettings(default=Behaviour(chunks=3)))
    try:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as oai:
            done = await oai.chat.completions.create(model="m", messages=MESSAGES)
            assert done.choices[0].message.content
            assert done.usage is not None and done.usage.completion_tokens == 3
            stream = await oai.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            parts = [part async for part in stream]
            text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            assert text == done.choices[0].message.content
            assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3
    finally:
        await runner.cleanup()


async def test_cleanup_releases_stalled_request() -> None:
    runner, base_url = await start_sim(SimSettings(default=Behaviour(stall=True)))
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(f"{base_url}/chat/completions", json=chat()))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 0.5
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_disconnect_noticed_without_handler_cancellation() -> None:
    # aiohttp's default server does not cancel handlers when the client leaves; the
    # simulator must still notice, or stalled requests would pile up in `active`.
    app = create_sim_app(SimSettings(default=Behaviour(stall=True)))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(
                    f"http://127.0.0.1:{port}{URL}", json=chat(), timeout=aiohttp.ClientTimeout(total=0.05)
                )
        stats = app[SIM_STATS]
        await wait_for(lambda: stats.cancelled == 1)
        assert stats.active == 0
    finally:
        await runner.cleanup()
