"""The money and secret promises, tried as an operator and an attacker would (issue 11): through
the real `proxy serve`, with the concurrency that broke them.

Each case records its figure for RELIABILITY.md ($RELIABILITY_OBSERVATIONS, as the fault matrix
does): the overspend factor is the ledger's paid spend over the budget (goal: at most 1 plus
one call's share).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, Observation, SimThread, chat_body, proxy_config, tiers_for
from tests.support.faults import observe as observe  # a fixture, used by name
from tests.support.proc import ProxyProc

BUDGET = Decimal("0.01")
PER_CALL = Decimal("0.001")  # ten calls' worth
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the launch"}]}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM requests")}


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


async def test_upstreams_that_echo_the_key_they_received(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """Every tier echoes the Authorization it received in its body, headers and stream events, in
    every status class, streamed and not: the paid tier's key appears nowhere the proxy writes."""
    sims.reset()
    urls = {n: s.url for n, s in sims.sims.items()}
    config = proxy_config({}, tmp_path / "ledger.db", tiers=tiers_for(urls, timeout=5.0))
    proc = ProxyProc.start(tmp_path, config, KIMI_ENV)
    seen: list[bytes] = []
    statuses = (200, 301, 307, 400, 401, 429, 500)
    try:
        for status in statuses:
            for stream in (False, True):
                for sim in sims.sims.values():
                    sim.always(Behaviour(status=status, echo_auth=True))
                headers = {"X-Tier": "kimi", "X-Fallback": "off"}
                async with session.post(proc.chat_url, json={**BODY, "stream": stream}, headers=headers) as r:
                    seen.append(str(r.headers).encode() + await r.read())
        async with session.get(f"{proc.url}/metrics") as r:
            seen.append(await r.read())
        assert await proc.stop() == 0
    finally:
        proc.kill()
    key = KIMI_ENV["TEST_KIMI_KEY"].encode()
    assert sims.sims["kimi"].stats.requests, "the paid tier was called"
    received = sims.sims["kimi"].stats.requests[-1].headers.get("authorization", "")
    assert key.decode() in received, "the upstream really had the key to echo"
    places = {
        "responses": b"".join(seen),
        "log": proc.log.read_bytes(),
        "ledger": b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*")),
    }
    found = {name: data.count(key) for name, data in places.items()}
    observe.fault = f"upstreams echoing their key in statuses {', '.join(map(str, statuses))}, streamed and not"
    observe.client = f"{len(seen) - 1} answers read; [redacted] in them: {places['responses'].count(b'[redacted]')}"
    observe.hits = sims.hits()
    observe.extra = {"keys_found": sum(found.values()), **{f"in_{k}": v for k, v in found.items()}}
    assert b"[redacted]" in places["responses"], "the echoes came back, cleaned"
    assert found == {"responses": 0, "log": 0, "ledger": 0}, found


async def test_a_breaker_opening_with_calls_in_flight_stays_open(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession, observe: Observation
) -> None:
    """Slow calls to the primary are in flight when fast failures open its breaker (cooldown 1.5 s);
    the slow calls then succeed: the breaker stays open until its cooldown ends and a probe succeeds."""
    sims.reset()
    urls = {n: s.url for n, s in sims.sims.items()}
    config = proxy_config({}, tmp_path / "ledger.db", tiers=tiers_for(urls, timeout=5.0))
    config["routing"] = {"escalate_after_failures": 3, "breaker_cooldown_seconds": 1.5}
    proc = ProxyProc.start(tmp_path, config, KIMI_ENV)
    llama = sims.sims["llama"]
    llama.script(*[Behaviour(headers_delay=0.5)] * 5, *[Behaviour(status=500)] * 3)
    states: list[str] = []
    try:

        async def call(headers: dict[str, str] | None = None) -> int:
            async with session.post(proc.chat_url, json=BODY, headers=headers or {}) as r:
                await r.read()
                return r.status

        async def breaker() -> str:
            async with session.get(f"{proc.url}/readyz") as r:
                return str((await r.json())["tiers"]["llama"]["breaker"])

        slow = [asyncio.create_task(call()) for _ in range(5)]
        await asyncio.sleep(0.2)  # the slow ones are in flight
        for _ in range(3):  # X-Fallback: off, so each failure is llama's alone
            await call({"X-Fallback": "off", "X-Tier": "llama"})
        states.append(await breaker())
        await asyncio.gather(*slow)  # five successes of calls that started before it opened
        await asyncio.sleep(0.1)
        states.append(await breaker())
        await asyncio.sleep(1.5)  # past the cooldown: the next call is the probe
        states.append(await breaker())
        assert await call() == 200
        states.append(await breaker())
        assert await proc.stop() == 0
    finally:
        proc.kill()
    closed_early = int(states[1] != "open")
    observe.fault = "5 slow calls in flight while 3 failures open the primary's breaker (cooldown 1.5 s)"
    moments = "after opening, after the in-flight successes, after the cooldown, after a probe"
    observe.client = f"breaker: {' -> '.join(states)} ({moments})"
    observe.hits = sims.hits()
    observe.extra = {"breaker_closed_early": closed_early}
    assert states == ["open", "open", "half_open", "closed"], states


async def hammer(url: str, clients: int, seconds: float) -> tuple[set[str], int]:
    """`clients` concurrent clients until the proxy dies (or `seconds`): the request ids whose
    answer arrived whole (a 200 body, or a stream through `data: [DONE]`), and how many were cut."""
    answered: set[str] = set()
    cut = 0
    stop = time.monotonic() + seconds

    async def client(n: int, s: aiohttp.ClientSession) -> None:
        nonlocal cut
        i = 0
        while time.monotonic() < stop:
            i += 1
            stream = (n + i) % 3 == 0
            headers = {"X-Tier": "kimi"} if (n + i) % 4 == 0 else {}  # some of them paid
            try:
                async with s.post(url, json=chat_body(stream), headers=headers) as r:
                    body = await r.read()
                    done = body.endswith(b"data: [DONE]\n\n") if stream else bool(body)
                    if r.status == 200 and done:
                        answered.add(r.headers["X-Request-Id"])
                    else:
                        cut += 1
            except (aiohttp.ClientError, TimeoutError):
                cut += 1
                return

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(client(n, s) for n in range(clients)))
    return answered, cut


async def test_kill_9_under_load_loses_no_answered_call(sims: SimThread, tmp_path: Path, observe: Observation) -> None:
    """50 clients hammer `proxy serve` (a third of them streams, a quarter on the paid tier); SIGKILL at
    a random moment of the load; the restart on the same ledger has the row and every attempt row of
    each call whose answer reached its client. Three rounds on one ledger."""
    sims.reset()
    db = tmp_path / "ledger.db"
    config = proxy_config({n: s.url for n, s in sims.sims.items()}, db)
    for sim in sims.sims.values():
        sim.always(Behaviour(chunks=3))
    all_answered: set[str] = set()
    lost = 0
    observe.fault = "kill -9 of proxy serve under load from 50 clients (a third streaming, a quarter paid), 3 rounds"
    report = []
    proc = await asyncio.to_thread(ProxyProc.start, tmp_path, config, KIMI_ENV)
    try:
        for round_ in range(3):
            load = asyncio.create_task(hammer(proc.chat_url, 50, 4.0))
            await asyncio.sleep(0.6 + 0.2 * round_)
            os.kill(proc.pid, signal.SIGKILL)
            answered, cut = await load
            assert await proc.wait(5) == -signal.SIGKILL
            assert len(answered) > 50, f"round {round_}: the load barely ran ({len(answered)} answered)"
            all_answered |= answered
            before = ids(db)
            proc = await asyncio.to_thread(ProxyProc.start, tmp_path, config, KIMI_ENV)
            after = ids(db)  # the replay is done before the proxy listens
            missing = all_answered - after
            lost += len(missing)
            report.append(f"{len(answered)} answered, {len(answered - before)} only in the journal, {cut} cut")
            observe.extra = {"acked_lost": lost, "rounds": round_ + 1, "answered": len(all_answered)}
            observe.client = "; ".join(report)
            assert not missing, f"round {round_}: {len(missing)} answered calls have no row: {sorted(missing)[:5]}"
    finally:
        proc.kill()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        marks = ",".join("?" * len(all_answered))
        got = conn.execute(
            f"SELECT r.id, r.attempts, count(a.n), r.outcome, r.paid FROM requests r"
            f" LEFT JOIN attempts a ON a.request_id = r.id WHERE r.id IN ({marks}) GROUP BY r.id",
            sorted(all_answered),
        ).fetchall()
    assert len(got) == len(all_answered)
    assert all(n_rows == n >= 1 and outcome == "ok" for _, n, n_rows, outcome, _ in got), "every attempt row"
    assert any(paid for *_, paid in got), "paid calls were among them"
    assert "replayed the journal of an unclean stop" in proc.log_text()
    print("; ".join(report))
