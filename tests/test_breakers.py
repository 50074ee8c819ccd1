"""Circuit breakers through the real app while calls are in flight: an opening is not undone by
calls that started before it, half-open admits exactly one probe, and /readyz and
/metrics say the same thing."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.sim.bodies import completion, error_body
from tests.conftest import ProxyFactory, Upstream, tier_config

BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the next step"}]}
COOLDOWN = 0.8
ROUTING = {"escalate_after_failures": 3, "breaker_cooldown_seconds": COOLDOWN}
METRIC_STATES = {0.0: "closed", 1.0: "half_open", 2.0: "open"}


@dataclass
class GatedTier:
    """An upstream whose answers are scripted: 'ok', 'fail' (500), or 'held-ok' / 'held-fail',
    which wait for `gate`; unscripted requests get 'ok'."""

    url: str = ""
    modes: deque[str] = field(default_factory=deque)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0
    held: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        mode = self.modes.popleft() if self.modes else "ok"
        if mode.startswith("held-"):
            self.held += 1
            await self.gate.wait()
        if mode.endswith("fail"):
            return web.Response(status=500, body=error_body(500, "gated"), content_type="application/json")
        return web.json_response(completion("c-1", 1, "llama3.1:8b", "gated", "fine"))


async def _gated(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> GatedTier:
    tier = GatedTier()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", tier.handle)
    tier.url = str((await aiohttp_server(app)).make_url("/v1"))
    return tier


async def _until(cond: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0.005)
    assert cond(), what


async def _seen(client: TestClient[web.Request, web.Application]) -> tuple[str, str]:
    """The llama breaker's state as /readyz and as /metrics report it."""
    ready = await (await client.get("/readyz")).json()
    text = await (await client.get("/metrics")).text()
    (value,) = (
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "proxy_breaker_state"
        for s in f.samples
        if s.labels["tier"] == "llama"
    )
    return ready["tiers"]["llama"]["breaker"], METRIC_STATES[value]


async def _open_llama(client: TestClient[web.Request, web.Application], llama: GatedTier) -> float:
    llama.modes.extend(["fail"] * 3)
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=BODY)
        assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "ollama"
    assert await _seen(client) == ("open", "open")
    return time.monotonic()


async def test_in_flight_successes_leave_an_open_breaker_open_until_its_probe(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    llama = await _gated(aiohttp_server)
    tiers = tier_config(upstreams, llama={"base_url": llama.url, "timeout_seconds": 5.0})
    client = await make_proxy(tiers=tiers, retries={"max_fallback_retries": 1}, routing=ROUTING)
    llama.modes.extend(["held-ok"] * 5)
    in_flight = [asyncio.create_task(client.post("/v1/chat/completions", json=BODY)) for _ in range(5)]
    await _until(lambda: llama.held == 5, "five calls in flight at llama")
    opened = await _open_llama(client, llama)
    llama.gate.set()
    for resp in await asyncio.gather(*in_flight):
        assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
    assert time.monotonic() - opened < COOLDOWN, "too slow to tell: the cooldown ended already"
    assert await _seen(client) == ("open", "open")
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("kimi", "escalated")
    assert llama.hits == 8
    await asyncio.sleep(max(0.0, opened + COOLDOWN - time.monotonic()) + 0.02)
    assert await _seen(client) == ("half_open", "half_open")
    resp = await client.post("/v1/chat/completions", json=BODY)  # the probe
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("llama", "default")
    assert await _seen(client) == ("closed", "closed")


async def test_half_open_admits_exactly_one_probe_among_50_concurrent_requests(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    llama = await _gated(aiohttp_server)
    tiers = tier_config(upstreams, llama={"base_url": llama.url, "timeout_seconds": 5.0})
    client = await make_proxy(
        tiers=tiers, retries={"max_fallback_retries": 1}, routing={**ROUTING, "breaker_cooldown_seconds": 0.2}
    )
    opened = await _open_llama(client, llama)
    await asyncio.sleep(max(0.0, opened + 0.2 - time.monotonic()) + 0.02)
    assert await _seen(client) == ("half_open", "half_open")
    llama.modes.append("held-ok")  # the probe waits; any second llama call would answer at once
    calls = [asyncio.create_task(client.post("/v1/chat/completions", json=BODY)) for _ in range(50)]
    await _until(lambda: llama.held == 1 and upstreams["kimi"].hits == 49, "one probe, 49 escalated")
    assert llama.hits == 3 + 1
    assert await _seen(client) == ("half_open", "half_open")
    llama.gate.set()
    replies = await asyncio.gather(*calls)
    assert all(r.status == 200 for r in replies)
    routes = sorted((r.headers["X-Proxy-Tier"], r.headers["X-Proxy-Route"]) for r in replies)
    assert routes == [("kimi", "escalated")] * 49 + [("llama", "default")]
    assert llama.hits == 4
    assert await _seen(client) == ("closed", "closed")
