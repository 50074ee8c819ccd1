"""state.url: several real `proxy serve` replicas sharing one real redis-server and one SQLite
ledger file: the budget, a client key's rate and daily cap, and the breakers hold across them, and
a Redis killed under load costs no call."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread, proxy_config, tiers_for
from tests.support.proc import ProxyProc, start_proxies
from tests.support.redis_server import RedisServer

BUDGET = Decimal("0.01")
PER_CALL = Decimal("0.001")  # ten calls' worth
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the launch"}]}
KEY_ENV = {"KEY_RATE": "state-rate-key-0123456789", "KEY_CAP": "state-cap-key-0123456789", **KIMI_ENV}


@pytest.fixture(scope="module")
def sims() -> Iterator[SimThread]:
    thread = SimThread()
    for name in ("llama", "ollama", "kimi"):
        thread.add(name)
    yield thread
    thread.close()


def shared_config(sims: SimThread, tmp_path: Path, redis: RedisServer, **sections: Any) -> dict[str, Any]:
    urls = {n: s.url for n, s in sims.sims.items()}
    tiers = sections.pop("tiers", None) or tiers_for(
        urls, timeout=5.0, kimi={"price": {"per_call_usd": float(PER_CALL)}}
    )
    config = proxy_config({}, tmp_path / "ledger.db", tiers=tiers, **sections)
    # A generous timeout: on a loaded 2-core machine a slow answer must not flip a test into the
    # degraded mode (tested on its own, with Redis killed).
    config["state"] = {"url": redis.url, "timeout_ms": 1000, "reconnect_seconds": 0.2}
    config["ledger"]["busy_timeout_ms"] = 2000  # several writers on one file
    return config


async def replicas(tmp_path: Path, config: dict[str, Any], n: int) -> list[ProxyProc]:
    return await start_proxies(tmp_path, config, KEY_ENV, n)


async def stop_all(procs: list[ProxyProc]) -> None:
    try:
        codes = await asyncio.gather(*(p.stop() for p in procs))
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * len(procs), [p.log_text()[-2000:] for p in procs]


def paid_spend(db: Path) -> Decimal:
    with sqlite3.connect(db) as conn:
        (nano,) = conn.execute("SELECT coalesce(sum(cost_nano_usd), 0) FROM requests WHERE paid = 1").fetchone()
    return Decimal(nano) / Decimal(10**9)


async def post(
    session: aiohttp.ClientSession, proc: ProxyProc, headers: dict[str, str] | None = None
) -> tuple[int, str | None, Any]:
    async with session.post(proc.chat_url, json=BODY, headers=headers or {}) as r:
        doc = await r.json(content_type=None)
        return r.status, r.headers.get("X-Proxy-Tier"), doc


async def test_100_concurrent_paid_calls_over_three_replicas_against_a_budget_of_10(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))  # every call in flight at once
    config = shared_config(
        sims, tmp_path, redis_server, budgets={"daily_usd": float(BUDGET)}, retries={"request_deadline_seconds": 20.0}
    )
    procs = await replicas(tmp_path, config, 3)
    try:
        answers = await asyncio.gather(*(post(session, procs[i % 3], {"X-Complexity": "complex"}) for i in range(100)))
    finally:
        await stop_all(procs)
    paid = sum(tier == "kimi" for _, tier, _ in answers)
    assert all(status == 200 for status, _, _ in answers), "calls over budget go to the free tiers"
    assert sims.sims["kimi"].hits == paid
    assert paid == BUDGET / PER_CALL, f"{paid} paid calls for a budget of 10 across 3 replicas"
    spent = paid_spend(tmp_path / "ledger.db")
    assert spent <= BUDGET + PER_CALL
    assert redis_server.command("HLEN", "{proxy}:holds") == b":0\r\n", "every hold was released"


async def test_a_client_keys_rate_and_daily_cap_are_exact_across_replicas(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.2))
    keys = [
        {"name": "rate", "secret_env": "KEY_RATE", "requests_per_minute": 12},
        {"name": "cap", "secret_env": "KEY_CAP", "daily_usd": 0.005},  # five paid calls
    ]
    config = shared_config(sims, tmp_path, redis_server, auth={"keys": keys})
    procs = await replicas(tmp_path, config, 2)
    rate = {"Authorization": f"Bearer {KEY_ENV['KEY_RATE']}"}
    cap = {"Authorization": f"Bearer {KEY_ENV['KEY_CAP']}", "X-Complexity": "complex"}
    try:
        t0 = time.monotonic()
        by_rate = await asyncio.gather(*(post(session, procs[i % 2], rate) for i in range(40)))
        elapsed = time.monotonic() - t0
        by_cap = await asyncio.gather(*(post(session, procs[i % 2], cap) for i in range(40)))
    finally:
        await stop_all(procs)
    admitted = sum(s == 200 for s, _, _ in by_rate)
    refused = [doc for s, _, doc in by_rate if s == 429]
    assert admitted + len(refused) == 40
    assert 12 <= admitted <= 12 + int(elapsed * 12 / 60) + 1, f"{admitted} of 40 admitted at 12/min over 2 replicas"
    assert all(d["error"]["code"] == "rate_limit_exceeded" for d in refused)
    paid = sum(tier == "kimi" for _, tier, _ in by_cap)
    assert paid == 5, f"{paid} paid calls for a daily cap of 5 across 2 replicas"
    assert all(s == 200 for s, _, _ in by_cap), "past the cap the free tiers answer"


async def test_a_breaker_opened_on_one_replica_is_open_on_the_others_and_one_probe_goes(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    llama = sims.sims["llama"]
    llama.always(Behaviour(status=500))
    config = shared_config(
        sims,
        tmp_path,
        redis_server,
        routing={"escalate_after_failures": 2, "breaker_cooldown_seconds": 1.0, "open_breakers_on_outage": False},
        retries={"max_fallback_retries": 1},
    )
    procs = await replicas(tmp_path, config, 3)
    pinned = {"X-Tier": "llama", "X-Fallback": "off"}
    try:
        for _ in range(2):
            status, _, _ = await post(session, procs[0], pinned)
            assert status == 502
        assert llama.hits == 2
        for proc in procs[1:]:
            status, _, doc = await post(session, proc, pinned)
            assert status == 503 and doc["error"]["code"] == "all_tiers_open", doc
        assert llama.hits == 2, "the other replicas did not call the open tier"
        await asyncio.sleep(1.1)  # the cooldown ends: one probe across all replicas
        llama.always(Behaviour(headers_delay=0.3))  # up again, and slow: the probe is out a while
        answers = await asyncio.gather(*(post(session, procs[i % 3], pinned) for i in range(9)))
        assert llama.hits == 3, "one probe per cooldown across the replicas"
        assert sorted(s for s, _, _ in answers) == [200] + [503] * 8
        status, tier, _ = await post(session, procs[2], pinned)  # the probe closed it everywhere
        assert (status, tier) == (200, "llama")
    finally:
        await stop_all(procs)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return await r.json()


async def metric(session: aiohttp.ClientSession, proc: ProxyProc, name: str) -> float:
    async with session.get(f"{proc.url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def wait_shared(session: aiohttp.ClientSession, proc: ProxyProc, shared: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await get_json(session, f"{proc.url}/readyz"))["state"]["shared"] is shared:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz never said shared={shared}")


async def test_redis_killed_under_load_fails_no_call_and_the_state_rejoins(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["kimi"].always(Behaviour(headers_delay=0.02))
    config = shared_config(sims, tmp_path, redis_server, budgets={"daily_usd": 1.0})
    procs = await replicas(tmp_path, config, 2)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(i: int) -> None:
        while not stop.is_set():
            status, _, _ = await post(session, procs[i % 2], {"X-Complexity": "complex"})
            statuses.append(status)

    try:
        workers = [asyncio.create_task(load(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        redis_server.kill()
        await asyncio.sleep(0.8)
        for proc in procs:
            await wait_shared(session, proc, False)
            assert await metric(session, proc, "proxy_state_shared") == 0.0
            assert await metric(session, proc, "proxy_state_fallbacks_total") >= 1.0
        redis_server.start()  # the same port, empty
        for proc in procs:
            await wait_shared(session, proc, True)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        assert await metric(session, procs[0], "proxy_state_shared") == 1.0
        assert redis_server.command("EXISTS", "{proxy}:procs") == b":1\r\n", "the heartbeat is back"
    finally:
        stop.set()
        await stop_all(procs)
    assert statuses and set(statuses) == {200}, f"{len(statuses)} calls: {sorted(set(statuses))}"
    for proc in procs:
        log = proc.log_text()
        assert log.count("is unreachable") == 1, "logged once, not per call"
        assert log.count("answers again: shared state rejoined") == 1


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"url": "http://127.0.0.1:6379"}, "state.url: not a redis://"),
        ({"url": "redis://127.0.0.1:6379", "hold_seconds": 1}, "state.hold_seconds must be above"),
        ({"url": "redis://127.0.0.1:6379", "prefix": "a b"}, "state.prefix"),
        ({"url": "redis://127.0.0.1:6379", "bogus": 1}, "bogus"),
    ],
)
def test_the_state_section_is_checked(state: dict[str, Any], message: str) -> None:
    from proxy.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config({"state": state}, "proxy.yaml", {})


def test_a_redis_password_is_redacted_like_the_api_keys() -> None:
    from proxy.config import build_config

    config = build_config({"state": {"url": "redis://:s3cret-redis-pw@127.0.0.1:6379/0"}}, "proxy.yaml", {})
    assert "s3cret-redis-pw" not in config.redactor.clean(b"x s3cret-redis-pw y").decode()
