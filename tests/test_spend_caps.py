"""Budgets and client caps that cap: calls in flight hold their worst-case cost, so a burst of
concurrent paid calls cannot all pass a nearly spent budget, across reloads too."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from decimal import Decimal
from typing import Any

from aiohttp import ClientResponse

from proxy.gateway.state import STATE
from proxy.ops.reload import apply_config
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config

MSG = {"model": "auto", "messages": [{"role": "user", "content": "plan the week"}]}
COMPLEX = {"X-Complexity": "complex"}  # the paid tier first
FLAT = {"price": {"per_call_usd": 0.001}}  # kimi answers without usage: a flat $0.001 a call
CLIENT_KEY = "sk-client-spend-caps"
AUTH = {"keys": [{"name": "team", "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest(), "daily_usd": 0.01}]}


async def burst(client: Any, n: int, headers: dict[str, str], body: dict[str, Any] = MSG) -> list[ClientResponse]:
    async def one() -> ClientResponse:
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        await resp.read()
        return resp

    return list(await asyncio.gather(*(one() for _ in range(n))))


def paid(responses: list[ClientResponse]) -> int:
    return sum(r.headers.get("X-Proxy-Tier") == "kimi" for r in responses)


async def ledger_spend(client: Any) -> Decimal:
    ledger = client.app[STATE].ledger
    await ledger.flush()
    with sqlite3.connect(ledger.store.location) as conn:
        (nano,) = conn.execute("SELECT coalesce(sum(cost_nano_usd), 0) FROM requests").fetchone()
    return Decimal(nano) / Decimal(10**9)


async def test_100_concurrent_paid_calls_spend_at_most_the_budget_plus_one_call(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    # Slow enough that all 100 are in flight before the first is priced.
    upstreams["kimi"].always(Behaviour(no_usage=True, headers_delay=0.2))
    client = await make_proxy(tiers=tier_config(upstreams, kimi=FLAT), budgets={"daily_usd": 0.01})
    responses = await burst(client, 100, COMPLEX)
    assert all(r.status == 200 for r in responses), "over budget, the free tiers answer"
    assert paid(responses) <= 11, f"{paid(responses)} paid calls against a budget of 10"
    assert paid(responses) >= 10, "the budget itself is usable"
    assert upstreams["kimi"].hits == paid(responses), "a call over budget never reaches the paid tier"
    assert await ledger_spend(client) <= Decimal("0.011")
    over = [r for r in responses if r.headers.get("X-Proxy-Tier") != "kimi"]
    assert all(r.headers["X-Proxy-Route"] == "budget" for r in over)
    # Once spent, the budget stays spent: the next burst pays nothing.
    again = await burst(client, 20, COMPLEX)
    assert paid(again) == 0 and upstreams["kimi"].hits == paid(responses)


async def test_token_priced_calls_hold_their_worst_case(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["kimi"].always(Behaviour(headers_delay=0.2))  # reports usage: priced per token
    price = {"price": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}}
    client = await make_proxy(tiers=tier_config(upstreams, kimi=price), budgets={"daily_usd": 0.05})
    body = {**MSG, "max_tokens": 100}
    responses = await burst(client, 100, COMPLEX, body)
    assert all(r.status == 200 for r in responses)
    # The worst case of one call: its body at a token a byte plus 100 output tokens, at $100/Mtok.
    size = len(b'{"model":"auto","messages":[{"role":"user","content":"plan the week"}],"max_tokens":100}')
    worst = Decimal(size + 100) * 100 / 10**6
    spent = await ledger_spend(client)
    assert 0 < spent <= Decimal("0.05") + worst, (spent, worst)
    assert 0 < paid(responses) < 100


async def test_a_client_keys_daily_cap_holds_under_100_concurrent_calls(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["kimi"].always(Behaviour(no_usage=True, headers_delay=0.2))
    client = await make_proxy(tiers=tier_config(upstreams, kimi=FLAT), auth=AUTH)
    responses = await burst(client, 100, {**COMPLEX, "Authorization": f"Bearer {CLIENT_KEY}"})
    assert all(r.status == 200 for r in responses), "over its cap, the key is served by the free tiers"
    assert 10 <= paid(responses) <= 11, paid(responses)
    assert await ledger_spend(client) <= Decimal("0.011")
    # Pinned to the paid tier with no fallback, a key over its cap gets its own 429.
    pinned = await client.post(
        "/v1/chat/completions",
        json={**MSG, "model": "kimi"},
        headers={"X-Fallback": "off", "Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert pinned.status == 429
    assert (await pinned.json())["error"]["code"] == "daily_budget_exhausted"


async def test_reloads_in_the_middle_of_a_burst_keep_the_cap(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Any
) -> None:
    upstreams["kimi"].always(Behaviour(no_usage=True, headers_delay=0.2))
    raw = {
        "tiers": tier_config(upstreams, kimi=FLAT),
        "budgets": {"daily_usd": 0.01},
        "ledger": {"path": str(tmp_path / "ledger.db")},
    }
    client = await make_proxy(**raw)
    state = client.app[STATE]

    async def reload_repeatedly() -> None:
        for i in range(5):
            await asyncio.sleep(0.05)
            # The same budget, with a different warning ratio: a real change that keeps the limit.
            await apply_config(state, make_config({**raw, "budgets": {"daily_usd": 0.01, "soft_ratio": 0.5 + i / 10}}))

    responses, _ = await asyncio.gather(burst(client, 100, COMPLEX), reload_repeatedly())
    assert paid(responses) <= 11, f"{paid(responses)} paid calls against a budget of 10 across 5 reloads"
    await apply_config(state, make_config(raw))  # after the burst: unwritten spend must not be forgotten
    assert paid(await burst(client, 20, COMPLEX)) == 0
    assert await ledger_spend(client) <= Decimal("0.011")


async def test_a_failed_paid_attempt_gives_its_hold_back(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    # Budget for one call: a 503 from the paid tier costs nothing, so the retry it asks for
    # (Retry-After: a paid tier is retried only then) may still go.
    upstreams["kimi"].script(Behaviour(status=503, retry_after="0.01"))
    upstreams["kimi"].always(Behaviour(no_usage=True))
    client = await make_proxy(tiers=tier_config(upstreams, kimi=FLAT), budgets={"daily_usd": 0.001})
    resp = await client.post("/v1/chat/completions", json=MSG, headers=COMPLEX)
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "kimi"
    assert resp.headers["X-Proxy-Attempts"] == "2"
    assert client.app[STATE].budget.reserved == 0, "every hold is released once the call is priced"
