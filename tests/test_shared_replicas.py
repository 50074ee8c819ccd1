"""Three real `proxy serve` replicas against one real PostgreSQL ledger and one real redis-server,
under concurrent load (free and paid calls, streamed and not, two client keys, an upstream that
fails a share of its calls so requests take several attempts): after a clean stop, the database
holds one row per request sent (with the ids the clients were given), one attempt row per
upstream hit (per tier), the report equals hand-written SQL over the raw tables, and the paid
calls of all three replicas together stay within the one budget."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from proxy.ledger.report_read import build_report
from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread, chat_body
from tests.support.postgres import PostgresServer
from tests.support.proc import ProxyProc, start_proxies
from tests.support.redis_server import RedisServer
from tests.test_state_redis import PER_CALL, shared_config, stop_all

REPLICAS = 3
REQUESTS = 240
IN_FLIGHT = 40
BUDGET = Decimal("0.03")  # 30 paid calls, of the 60 that ask for one
PW_ENV = "PROXY_TEST_REPLICAS_PG_PASSWORD"
CLIENTS = {"alice": "replicas-alice-key-0123456789", "bob": "replicas-bob-key-0123456789"}
KEYS_ENV = {"KEY_ALICE": CLIENTS["alice"], "KEY_BOB": CLIENTS["bob"], **KIMI_ENV}


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as the client saw it."""

    status: int
    request_id: str
    tier: str | None
    client: str
    paid_asked: bool
    stream: bool


async def send(session: aiohttp.ClientSession, proc: ProxyProc, i: int, gate: asyncio.Semaphore) -> Sent:
    client = ("alice", "bob")[i % 2]
    paid_asked, stream = i % 4 == 1, i % 5 < 2  # periods prime to the replicas' 3: each gets a mix
    headers = {"Authorization": f"Bearer {CLIENTS[client]}"}
    if paid_asked:
        headers["X-Complexity"] = "complex"
    async with gate, session.post(proc.chat_url, json=chat_body(stream), headers=headers) as r:
        body = await r.read()
        if stream:
            assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
        return Sent(r.status, r.headers["X-Request-Id"], r.headers.get("X-Proxy-Tier"), client, paid_asked, stream)


def every_fourth_fails() -> Any:
    """llama answers 500 to one call in four (counted on the sims' loop: deterministic)."""
    n = itertools.count()
    return lambda: Behaviour(status=500, headers_delay=0.01) if next(n) % 4 == 0 else None


async def by_key(conn: asyncpg.Connection, query: str) -> dict[Any, Any]:
    return {row[0]: row[1] for row in await conn.fetch(query)}


async def sql(url: str) -> dict[str, Any]:
    """The figures, by hand, from the raw tables."""
    conn = await asyncpg.connect(url)
    one, by = conn.fetchval, functools.partial(by_key, conn)
    failed = "outcome NOT IN ('ok', 'cancelled')"  # docs/ledger.md: an attempt that failed
    try:
        return {
            "ids": Counter(r["id"] for r in await conn.fetch("SELECT id FROM requests")),
            "clients": await by("SELECT client, count(*) FROM requests GROUP BY 1"),
            "streams": await one("SELECT count(*) FROM requests WHERE stream = 1"),
            "requests": await one("SELECT count(*) FROM requests"),
            "calls": await by("SELECT tier, count(*) FROM requests WHERE tier IS NOT NULL GROUP BY 1"),
            "cost": await one("SELECT coalesce(sum(cost_nano_usd), 0) FROM requests"),
            "paid": await one("SELECT count(*) FROM requests WHERE paid = 1"),
            "free": await one("SELECT count(*) FROM requests WHERE tier IS NOT NULL AND paid = 0"),
            "paid_cost": await one("SELECT coalesce(sum(cost_nano_usd), 0) FROM requests WHERE paid = 1"),
            "fallbacks": await by(
                "SELECT tier, count(*) FROM requests WHERE attempts > 1 AND tier IS NOT NULL GROUP BY 1"
            ),
            "tier_cost": await by("SELECT tier, sum(cost_nano_usd) FROM requests GROUP BY 1"),
            "attempt_rows": await one("SELECT count(*) FROM attempts"),
            "attempts_said": await one("SELECT sum(attempts) FROM requests"),
            "attempts": await by("SELECT tier, count(*) FROM attempts GROUP BY 1"),
            "attempt_failures": await by(f"SELECT tier, count(*) FROM attempts WHERE {failed} GROUP BY 1"),
        }
    finally:
        await conn.close()


async def test_three_replicas_one_postgres_one_redis_under_concurrent_load(
    sims: SimThread, pg: PostgresServer, redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    sims.sims["llama"].always(Behaviour(headers_delay=0.02))
    sims.sims["llama"].chooser = every_fourth_fails()
    sims.sims["ollama"].always(Behaviour(headers_delay=0.02))
    # No usage in kimi's answers: its flat per-call price applies (with token counts, token prices do).
    sims.sims["kimi"].always(Behaviour(headers_delay=0.05, no_usage=True))
    db_url = pg.new_database()
    dsn = pg.url(db_url.rsplit("/", 1)[1], with_password=False)
    keys = [{"name": name, "secret_env": f"KEY_{name.upper()}"} for name in CLIENTS]
    config = shared_config(
        sims,
        tmp_path,
        redis_server,
        ledger={"url": dsn, "password_env": PW_ENV},
        budgets={"daily_usd": float(BUDGET)},
        auth={"keys": keys},
    )
    env = {**KEYS_ENV, PW_ENV: pg.password}
    procs = await start_proxies(tmp_path, config, env, REPLICAS)
    gate = asyncio.Semaphore(IN_FLIGHT)
    try:
        sent = await asyncio.gather(*(send(session, procs[i % REPLICAS], i, gate) for i in range(REQUESTS)))
    finally:
        await stop_all(procs)
    hits = sims.hits()
    got = await sql(db_url)

    assert [s.status for s in sent] == [200] * REQUESTS, Counter(s.status for s in sent)
    # Every request has its row, under the id its client was given (each replica numbers its own).
    assert got["ids"] == Counter(s.request_id for s in sent) and len(got["ids"]) == REQUESTS
    assert got["clients"] == dict(Counter(s.client for s in sent))
    assert got["streams"] == sum(s.stream for s in sent)
    assert got["calls"] == dict(Counter(s.tier for s in sent))
    # One attempt row per upstream hit, per tier; and some requests needed several.
    assert got["attempt_rows"] == got["attempts_said"] == sum(hits.values())
    assert got["attempts"] == {tier: n for tier, n in hits.items() if n}
    assert got["attempt_rows"] > REQUESTS and got["fallbacks"], "llama's 500s made failovers"
    # One budget across the replicas: exactly its 30 calls were paid (Redis reserves atomically),
    # the other paid requests went to the free tiers.
    paid = [s for s in sent if s.tier == "kimi"]
    assert len(paid) == got["paid"] == hits["kimi"] == BUDGET / PER_CALL, f"{len(paid)} paid calls"
    assert sum(s.paid_asked for s in sent) > len(paid)
    assert Decimal(got["paid_cost"]) / 10**9 <= BUDGET + PER_CALL

    # The report (from the rollups every replica upserted concurrently) equals SQL on the raw rows.
    report = await build_report(db_url, "all")
    assert report.requests == got["requests"] == REQUESTS
    assert report.calls == got["calls"]
    assert report.cost_usd == Decimal(got["cost"]) / 10**9 == len(paid) * PER_CALL
    assert report.free_calls == got["free"] == REQUESTS - len(paid)
    by_tier = {t.tier: t for t in report.tiers}
    assert set(by_tier) == set(got["attempts"])
    for tier, t in by_tier.items():
        assert t.attempts == got["attempts"][tier], tier
        assert t.failures == got["attempt_failures"].get(tier, 0), tier
        assert t.calls == got["calls"].get(tier, 0), tier
        assert t.fallbacks == got["fallbacks"].get(tier, 0), tier
        assert t.cost_usd == Decimal(got["tier_cost"].get(tier) or 0) / 10**9, tier
    assert by_tier["llama"].failures == (hits["llama"] + 3) // 4, "one llama call in four failed"
