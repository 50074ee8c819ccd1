"""The degraded share errs on the safe side: processes whose Redis stops answering before the
first paid call (their own first Redis call times out) each take 1/N of the budget, N the most
processes known, never the whole of it because the heartbeat had not seen the others yet.

A long heartbeat interval (`state.reconnect_seconds`) keeps each process at the count its one
start-up heartbeat saw: the first to start saw itself alone. Redis is frozen (SIGSTOP), not
killed: its connections stay open and silent, so every call waits out `state.timeout_ms`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread
from tests.support.proc import ProxyProc, start_proxies
from tests.support.redis_server import RedisServer
from tests.test_state_redis import BUDGET, PER_CALL, metric, shared_config, stop_all
from tests.test_workers import workers

PAID = {"X-Complexity": "complex"}
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan the launch"}]}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A connection per request: the kernel spreads connections, not requests, over --workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        yield s


def frozen_config(sims: SimThread, tmp_path: Path, redis: RedisServer, **state: Any) -> dict[str, Any]:
    config = shared_config(
        sims, tmp_path, redis, budgets={"daily_usd": float(BUDGET)}, retries={"request_deadline_seconds": 20.0}
    )
    # 150 ms: the first reserve gives up soon; 60 s: no heartbeat after the one at start.
    config["state"].update(timeout_ms=150, reconnect_seconds=60.0, **state)
    return config


async def paid_calls(session: aiohttp.ClientSession, procs: list[ProxyProc], n: int) -> list[tuple[int, str | None]]:
    async def one(proc: ProxyProc) -> tuple[int, str | None]:
        async with session.post(proc.chat_url, json=BODY, headers=PAID) as r:
            await r.read()
            return r.status, r.headers.get("X-Proxy-Tier")

    return list(await asyncio.gather(*(one(procs[i % len(procs)]) for i in range(n))))


def freeze(redis: RedisServer) -> None:
    assert redis.popen is not None
    os.kill(redis.popen.pid, signal.SIGSTOP)


def thaw(redis: RedisServer) -> None:
    assert redis.popen is not None
    os.kill(redis.popen.pid, signal.SIGCONT)


def check(answers: list[tuple[int, str | None]], sims: SimThread, logs: str) -> None:
    paid = sum(tier == "kimi" for _, tier in answers)
    assert all(status == 200 for status, _ in answers), "past each share the free tiers answer"
    assert sims.sims["kimi"].hits == paid
    assert 0 < paid <= BUDGET / PER_CALL + 1, f"{paid} paid calls for a budget of 10"
    assert "takes 1/2 of what is left" in logs, logs[-3000:]


async def test_two_workers_whose_first_redis_call_times_out_spend_at_most_the_budget(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """`--workers 2`: worker 0's heartbeat ran before worker 1 existed; the worker count is known."""
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))  # every call in flight at once
    proc = await workers(tmp_path, frozen_config(sims, tmp_path, redis_server))
    freeze(redis_server)
    try:
        answers = await paid_calls(session, [proc], 100)
    finally:
        thaw(redis_server)
        assert await proc.stop() == 0, proc.log_text()[-3000:]
    check(answers, sims, proc.log_text())


async def test_replicas_started_apart_share_by_state_processes(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Two `proxy serve` (two machines): the first's heartbeat saw itself alone, so only
    `state.processes` tells it that two share the budget."""
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))
    config = frozen_config(sims, tmp_path, redis_server, processes=2)
    procs = await start_proxies(tmp_path, config, KIMI_ENV, 2, together=False)  # the second sees the first
    freeze(redis_server)
    try:
        answers = await paid_calls(session, procs, 100)
    finally:
        thaw(redis_server)
        await stop_all(procs)
    check(answers, sims, "".join(p.log_text() for p in procs))


async def test_a_process_that_left_the_heartbeat_still_counts(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """A process that dropped out of the heartbeat may be gone, or cut off from Redis and
    spending its own share: the survivor keeps counting it (the most it ever saw)."""
    sims.reset()
    sims.sims["kimi"].always(Behaviour(no_usage=True, headers_delay=0.3))
    config = frozen_config(sims, tmp_path, redis_server)
    config["state"]["reconnect_seconds"] = 0.1  # heartbeats: the first sees the second, then not
    first, second = await start_proxies(tmp_path, config, KIMI_ENV, 2, together=False)
    try:
        await until(lambda: metric(session, first, "proxy_state_processes"), 2.0)
        await stop_all([second])
        await until(lambda: metric(session, first, "proxy_state_processes"), 1.0)
        freeze(redis_server)
        answers = await paid_calls(session, [first], 20)
    finally:
        thaw(redis_server)
        await stop_all([first, second])
    paid = sum(tier == "kimi" for _, tier in answers)
    assert 0 < paid <= BUDGET / PER_CALL / 2 + 1, f"{paid} paid calls for half a budget of 10"
    assert "takes 1/2 of what is left" in first.log_text()


async def until(read: Callable[[], Awaitable[float]], value: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await read()) != value:
        assert time.monotonic() < deadline, f"still {seen}, not {value}"
        await asyncio.sleep(0.05)


def test_state_processes_is_checked() -> None:
    from proxy.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="processes"):
        build_config({"state": {"url": "redis://127.0.0.1:6379", "processes": 0}}, "proxy.yaml", {})
    config = build_config({"state": {"url": "redis://127.0.0.1:6379", "processes": 6}}, "proxy.yaml", {})
    assert config.state.processes == 6
