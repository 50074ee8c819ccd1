"""Breakers followed through Redis's events (proxy/state/breakers.py): a call on a closed breaker
costs no round trip, an opening elsewhere is honoured at once, and a lost subscription or a Redis
that restarted empty never leaves a replica trusting a stale mirror."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp

from proxy.sim import Behaviour
from tests.support.faults import SimThread
from tests.support.proc import ProxyProc
from tests.support.redis_server import RedisServer
from tests.test_state_redis import get_json, post, replicas, shared_config, stop_all, wait_shared

PINNED = {"X-Tier": "llama", "X-Fallback": "off"}
ROUTING = {"escalate_after_failures": 2, "breaker_cooldown_seconds": 30.0, "open_breakers_on_outage": False}
RETRIES = {"max_fallback_retries": 1}  # one attempt per request: two requests open the breaker


def script_calls(redis: RedisServer) -> int:
    """Scripts Redis has run (EVALSHA and EVAL), from INFO commandstats."""
    stats = redis.command("INFO", "commandstats").decode()
    return sum(int(n) for n in re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", stats))


async def open_llama_on(session: aiohttp.ClientSession, proc: ProxyProc, sims: SimThread) -> None:
    sims.sims["llama"].always(Behaviour(status=500))
    for _ in range(2):
        status, _, _ = await post(session, proc, PINNED)
        assert status == 502


async def rejoined_after_a_fallback(session: aiohttp.ClientSession, proc: ProxyProc) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        state = (await get_json(session, f"{proc.url}/readyz"))["state"]
        if state["fallbacks"] >= 1 and state["shared"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz never said it fell back and rejoined: {state}")


async def test_calls_on_a_closed_breaker_cost_no_round_trip_and_an_opening_stops_every_replica(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    procs = await replicas(tmp_path, shared_config(sims, tmp_path, redis_server, routing=ROUTING, retries=RETRIES), 3)
    try:
        for proc in procs:  # each replica syncs its mirror of llama once
            assert (await post(session, proc, PINNED))[0] == 200
        before = script_calls(redis_server)
        answers = await asyncio.gather(*(post(session, procs[i % 3], PINNED) for i in range(60)))
        assert [s for s, _, _ in answers] == [200] * 60
        assert script_calls(redis_server) == before, "60 successful free calls ran no script in Redis"

        await open_llama_on(session, procs[0], sims)
        hits = sims.sims["llama"].hits
        answers = await asyncio.gather(*(post(session, procs[1 + i % 2], PINNED) for i in range(20)))
        assert {s for s, _, _ in answers} == {503}, "the others saw it open"
        assert sims.sims["llama"].hits == hits, "no call reached the open tier"
    finally:
        await stop_all(procs)


async def test_a_lost_subscription_falls_back_and_the_replica_follows_again_after_rejoining(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    procs = await replicas(tmp_path, shared_config(sims, tmp_path, redis_server, routing=ROUTING, retries=RETRIES), 2)
    try:
        for proc in procs:
            assert (await post(session, proc, PINNED))[0] == 200
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        for proc in procs:
            await rejoined_after_a_fallback(session, proc)
        await open_llama_on(session, procs[0], sims)
        hits = sims.sims["llama"].hits
        status, _, doc = await post(session, procs[1], PINNED)
        assert status == 503 and doc["error"]["code"] == "all_tiers_open", doc
        assert sims.sims["llama"].hits == hits
    finally:
        await stop_all(procs)


async def test_a_redis_restarted_empty_is_followed_not_taken_for_old_news(
    sims: SimThread, tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """The mirrors saw many changes before the restart; the new Redis numbers its changes from its
    clock, so its first opening is applied, not ignored as older than what the mirror has."""
    sims.reset()
    procs = await replicas(tmp_path, shared_config(sims, tmp_path, redis_server, routing=ROUTING, retries=RETRIES), 2)
    try:
        sims.sims["llama"].always(Behaviour(status=500))
        for _ in range(6):  # failures and resets: several changes numbered by the first Redis
            await post(session, procs[0], PINNED)
            sims.sims["llama"].always(Behaviour())
            await post(session, procs[0], PINNED)
            sims.sims["llama"].always(Behaviour(status=500))
        sims.sims["llama"].always(Behaviour())
        redis_server.kill()
        for proc in procs:
            await wait_shared(session, proc, False)
        redis_server.start()
        for proc in procs:
            await wait_shared(session, proc, True)
        for proc in procs:
            assert (await post(session, proc, PINNED))[0] == 200
        await open_llama_on(session, procs[0], sims)
        hits = sims.sims["llama"].hits
        status, _, _ = await post(session, procs[1], PINNED)
        assert status == 503
        assert sims.sims["llama"].hits == hits
    finally:
        await stop_all(procs)
