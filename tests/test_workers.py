"""`proxy serve --workers 2` as a real process, without state.url: both workers serve the one port,
SIGTERM ends both with every acknowledged row in the ledger, and the budget and a client key's
rate hold across them (through the private redis-server the supervisor starts)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread, proxy_config, tiers_for
from tests.support.proc import ProxyProc, start_proxy
from tests.support.redis_server import redis_binary

BUDGET = Decimal("0.01")
PER_CALL = Decimal("0.001")  # ten calls' worth
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the launch"}]}
KEY_ENV = {"KEY_RATE": "workers-rate-key-0123456789", **KIMI_ENV}


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    redis_binary()  # the supervisor's private state; skipped (or failed in .ci/run) without it


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A connection per request: the kernel spreads connections, not requests, over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        yield s


def config_for(sims: SimThread, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    urls = {n: s.url for n, s in sims.sims.items()}
    tiers = tiers_for(urls, timeout=5.0, kimi={"price": {"per_call_usd": float(PER_CALL)}})
    config = proxy_config({}, tmp_path / "ledger.db", tiers=tiers, **sections)
    config["ledger"]["busy_timeout_ms"] = 2000  # two writers on one file
    return config


async def workers(
    tmp_path: Path, config: dict[str, Any], n: int = 2, preexec_fn: Callable[[], None] | None = None
) -> ProxyProc:
    """Once every worker answers: /healthz answers as soon as the first listens (the others start
    after it, so that one process replays the journal), so wait for n distinct pids."""
    proc = await start_proxy(tmp_path, config, KEY_ENV, "--workers", str(n), preexec_fn=preexec_fn)
    seen: set[str] = set()
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while len(seen) < n and time.monotonic() < deadline:
            async with s.get(f"{proc.url}/healthz") as r:
                seen.add(r.headers["X-Proxy-Worker"])
    assert len(seen) == n, proc.log_text()[-2000:]
    return proc


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def rows(db: Path, where: str = "1") -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute(f"SELECT count(*) FROM requests WHERE {where}").fetchone()
    return int(n)


async def post(
    session: aiohttp.ClientSession, proc: ProxyProc, headers: dict[str, str] | None = None
) -> tuple[int, str | None, str | None]:
    async with session.post(proc.chat_url, json=BODY, headers=headers or {}) as r:
        await r.read()
        return r.status, r.headers.get("X-Proxy-Tier"), r.headers.get("X-Proxy-Worker")


async def test_both_workers_serve_and_sigterm_ends_both_with_every_row(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["llama"].always(Behaviour(headers_delay=0.4))
    proc = await workers(tmp_path, config_for(sims, tmp_path))
    kids = children(proc.pid)
    assert len(kids) == 3, f"two workers and the private redis-server: {kids}"
    try:
        calls = [asyncio.ensure_future(post(session, proc)) for _ in range(60)]
        await asyncio.sleep(0.2)  # every call sent, none answered yet
        proc.signal(signal.SIGTERM)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        code = await proc.wait(20)
    finally:
        proc.kill()
    assert code == 0, proc.log_text()[-3000:]
    served = [a for a in answers if not isinstance(a, BaseException) and a[0] == 200]
    assert len(served) == 60, f"calls in flight finish during the graceful stop: {answers[:3]}"
    pids = {a[2] for a in served}
    assert len(pids) == 2 and pids <= {str(k) for k in kids}, f"answered by {pids}, workers {kids}"
    assert rows(tmp_path / "ledger.db") == len(served), "every acknowledged call has its row"
    time.sleep(0.2)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "no worker or redis-server outlives it"
    log = proc.log_text()
    assert log.count("ledger ") >= 2 and "workers: all stopped" in log


async def test_a_budget_of_10_paid_calls_holds_across_two_workers_without_redis_configured(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))  # every call in flight at once
    config = config_for(
        sims, tmp_path, budgets={"daily_usd": float(BUDGET)}, retries={"request_deadline_seconds": 20.0}
    )
    assert "state" not in config
    proc = await workers(tmp_path, config)
    try:
        answers = await asyncio.gather(*(post(session, proc, {"X-Complexity": "complex"}) for _ in range(100)))
    finally:
        assert await proc.stop() == 0, proc.log_text()[-3000:]
    assert all(status == 200 for status, _, _ in answers), "calls over budget go to the free tiers"
    paid = [w for _, tier, w in answers if tier == "kimi"]
    assert len({w for _, _, w in answers}) == 2, "the calls were spread over both workers"
    assert sims.sims["kimi"].hits == len(paid)
    assert len(paid) <= BUDGET / PER_CALL + 1, f"{len(paid)} paid calls for a budget of 10 over 2 workers"
    assert rows(tmp_path / "ledger.db", "paid = 1") == len(paid)


async def test_a_client_keys_requests_per_minute_holds_across_two_workers(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    keys = [{"name": "rate", "secret_env": "KEY_RATE", "requests_per_minute": 12}]
    proc = await workers(tmp_path, config_for(sims, tmp_path, auth={"keys": keys}))
    rate = {"Authorization": f"Bearer {KEY_ENV['KEY_RATE']}"}
    try:
        t0 = time.monotonic()
        answers = await asyncio.gather(*(post(session, proc, rate) for _ in range(40)))
        elapsed = time.monotonic() - t0
    finally:
        assert await proc.stop() == 0, proc.log_text()[-3000:]
    admitted = sum(s == 200 for s, _, _ in answers)
    assert admitted + sum(s == 429 for s, _, _ in answers) == 40
    assert len({w for _, _, w in answers}) == 2, "the requests were spread over both workers"
    assert 12 <= admitted <= 12 + int(elapsed * 12 / 60) + 1, f"{admitted} of 40 admitted at 12/min over 2 workers"


async def test_a_killed_worker_is_restarted_and_sighup_reaches_every_worker(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    proc = await workers(tmp_path, config_for(sims, tmp_path))
    try:
        before = set(children(proc.pid))
        pids = {w for _, _, w in await asyncio.gather(*(post(session, proc) for _ in range(20)))}
        victim = int(sorted(p for p in pids if p)[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(children(proc.pid)) - before) < 1:
            await asyncio.sleep(0.05)
        assert len(set(children(proc.pid)) - before) == 1, proc.log_text()[-2000:]
        await asyncio.sleep(1.0)  # the new worker listens
        answers = await asyncio.gather(*(post(session, proc) for _ in range(20)))
        assert all(s == 200 for s, _, _ in answers)
        assert str(victim) not in {w for _, _, w in answers}
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.log_text().count("reloaded ") < 2:
            await asyncio.sleep(0.05)
    finally:
        code = await proc.stop()
    log = proc.log_text()
    assert code == 0, log[-3000:]
    assert f"(pid {victim}) was killed by SIGKILL: restarting it" in log
    assert log.count("reloaded ") == 2, "each worker reloaded the config"


async def test_workers_must_be_a_positive_number(tmp_path: Path) -> None:
    from tests.support.proc import run_cli

    code, _, err = await run_cli("serve", "--workers", "0")
    assert code == 2 and "expected a number of processes" in err


@pytest.mark.parametrize("setting", ["auto", "off"])
async def test_workers_as_many_as_the_cpus_run_one_on_each_unless_affinity_is_off(
    sims: SimThread, tmp_path: Path, setting: str
) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")

    def two_cpus() -> None:  # the proxy may use exactly two CPUs, whatever this machine has
        os.sched_setaffinity(0, set(cpus))

    proc = await workers(tmp_path, config_for(sims, tmp_path, server={"worker_affinity": setting}), 2, two_cpus)
    try:
        pids = [p for p in children(proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() != "redis-server"]
        masks = sorted((os.sched_getaffinity(p) for p in pids), key=sorted)
        # Every thread of a worker too (the ledger's writer thread, the resolver's), not only its main one.
        threads = {frozenset(os.sched_getaffinity(int(t))) for p in pids for t in os.listdir(f"/proc/{p}/task")}
    finally:
        assert await proc.stop() == 0
    assert len(pids) == 2
    if setting == "auto":
        assert masks == [{cpus[0]}, {cpus[1]}], masks
        assert threads == {frozenset({cpus[0]}), frozenset({cpus[1]})}
        assert f"worker 0 on CPU {cpus[0]}, worker 1 on CPU {cpus[1]}" in proc.log_text()
    else:
        assert masks == [set(cpus), set(cpus)], masks
        assert "runs on its own CPU" not in proc.log_text()
