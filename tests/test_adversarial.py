"""The money and secret promises, tried as an operator and an attacker would (issue 11): through
the real `proxy serve`, with the concurrency that broke them.

Each case records its figure for RELIABILITY.md ($RELIABILITY_OBSERVATIONS, as the fault matrix
does): the overspend factor is the ledger's paid spend over the budget (goal: at most 1 plus
one call's share).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, Observation, SimThread, proxy_config, tiers_for
from tests.support.faults import observe as observe  # a fixture, used by name
from tests.support.proc import ProxyProc

BUDGET = Decimal("0.01")
PER_CALL = Decimal("0.001")  # ten calls' worth
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the launch"}]}


@pytest.fixture(scope="module")
def sims() -> Iterator[SimThread]:
    thread = SimThread()
    for name in ("llama", "ollama", "kimi"):
        thread.add(name)
    yield thread
    thread.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def paid_spend(proc: ProxyProc) -> Decimal:
    with sqlite3.connect(proc.db) as conn:
        (nano,) = conn.execute("SELECT coalesce(sum(cost_nano_usd), 0) FROM requests WHERE paid = 1").fetchone()
    return Decimal(nano) / Decimal(10**9)


async def burst(session: aiohttp.ClientSession, proc: ProxyProc, n: int) -> list[tuple[int, str | None]]:
    async def one() -> tuple[int, str | None]:
        async with session.post(proc.chat_url, json=BODY, headers={"X-Complexity": "complex"}) as r:
            await r.read()
            return r.status, r.headers.get("X-Proxy-Tier")

    return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.parametrize("reloads", [0, 5], ids=["steady", "with-reloads"])
async def test_100_concurrent_paid_calls_against_a_budget_of_10(
    reloads: int, sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """100 concurrent paid calls at a flat $0.001 against `budgets.daily_usd: 0.01` (and SIGHUP
    reloads in the middle of the burst): the paid tier serves at most the budget plus one call."""
    sims.reset()
    # Slow enough that every call is in flight before the first is priced.
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))
    # Generous timeouts: on a loaded machine a timed-out paid call would fall back to a free tier
    # and make the check pass for the wrong reason.
    urls = {n: s.url for n, s in sims.sims.items()}
    tiers = tiers_for(urls, timeout=5.0, kimi={"price": {"per_call_usd": float(PER_CALL)}})
    config = proxy_config(
        {},
        tmp_path / "ledger.db",
        tiers=tiers,
        budgets={"daily_usd": float(BUDGET)},
        retries={"request_deadline_seconds": 20.0},
    )
    proc = ProxyProc.start(tmp_path, config, KIMI_ENV)
    try:

        async def reload_during_the_burst() -> None:
            for i in range(reloads):
                await asyncio.sleep(0.04)
                config["budgets"]["soft_ratio"] = 0.5 + i / 20  # a real change; the limit stays
                proc.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                proc.signal(signal.SIGHUP)

        answers, _ = await asyncio.gather(burst(session, proc, 100), reload_during_the_burst())
        assert await proc.stop() == 0
    finally:
        proc.kill()
    paid = sum(tier == "kimi" for _, tier in answers)
    spent = paid_spend(proc)
    factor = spent / BUDGET
    observe.fault = f"100 concurrent paid calls, budget of 10, {reloads} SIGHUP reloads during the burst"
    observe.client = f"{sum(s == 200 for s, _ in answers)}/100 answered 200; {paid} by the paid tier"
    observe.hits = sims.hits()
    observe.extra = {"overspend_factor": float(factor), "paid_calls": paid, "spent_usd": str(spent)}
    if reloads:
        assert proc.log_text().count("reloaded") >= 1, "the reloads happened"
    assert all(status == 200 for status, _ in answers), "calls over budget are answered by the free tiers"
    assert paid >= BUDGET / PER_CALL, "the budget itself is usable"
    assert sims.sims["kimi"].hits == paid, "a call over budget never reaches the paid tier"
    assert factor <= 1 + PER_CALL / BUDGET, f"spent {spent} of a {BUDGET} budget ({paid} paid calls)"
