"""`rebuild_rollups` on a real PostgreSQL ledger: the daily tables rebuilt from the raw rows equal
the ones the live writes made, and SQLite's rebuild of the same records; rows deleted by hand
leave the rollups (and the report) once rebuilt; the latency buckets computed in SQL are
rows.latency_bucket's; a rebuild while a writer keeps writing counts every batch once."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import asyncpg

from proxy.ledger import Ledger, SqliteStore, open_db, rebuild_rollups
from proxy.ledger.pg_sql import BUCKETS
from proxy.ledger.postgres import PostgresStore
from proxy.ledger.report_read import build_report
from proxy.ledger.rows import LOG_GROWTH, MAX_LATENCY_MS, latency_bucket
from proxy.records import CallRecord, Outcome, Route, Usage
from tests.support.postgres import PostgresServer
from tests.support.quality import quality_config
from tests.support.records import call
from tests.test_ledger_postgres import DAY, pg_tables, records, sqlite_tables, through_ledger

ROLLUPS = ("daily_usage", "daily_attempts", "daily_latency", "daily_endpoints")


def history(n: int = 300, prefix: str = "r") -> list[CallRecord]:
    """`records()` (every endpoint, quality checks, clients) and `n` calls over many days, tiers,
    routes, usage and latencies (whole milliseconds: float sums then do not depend on order)."""
    out = []
    for i in range(n):
        tier = ("llama", "ollama", "kimi", None)[i % 4]
        out.append(
            call(
                f"{prefix}{i}",
                tier,
                at=DAY - 86400 * 5 + i * 1800,
                usage=Usage(100 + i, 10 + i, i % 50) if i % 3 else None,
                ttft_ms=float(i % 200) if i % 2 else None,
                duration_ms=float(10 * i),
                outcome=Outcome.ERROR if tier is None else Outcome.OK,
                route=(Route.DEFAULT, Route.COMPLEX, Route.PINNED)[i % 3],
            )
        )
    return records() + out


async def rebuild(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await rebuild_rollups(conn)
    finally:
        await conn.close()


async def test_a_rebuild_gives_back_the_live_rollups_and_sqlites(pg: PostgresServer, tmp_path: Path) -> None:
    url, recs = pg.new_database(), history()
    await through_ledger(PostgresStore(url, spill_base=tmp_path / "l"), recs)
    live = await pg_tables(url)
    async with asyncpg.create_pool(url, min_size=1, max_size=1) as pool, pool.acquire() as pooled:
        await pooled.execute("UPDATE daily_usage SET calls = calls + 5")  # drifted: the rebuild corrects it
        await rebuild_rollups(pooled)  # a pooled connection works too
    rebuilt = await pg_tables(url)
    for t in ROLLUPS:
        assert rebuilt[t] == live[t], t
    assert len(rebuilt["daily_latency"]) > 50 and rebuilt["daily_endpoints"], "not an empty agreement"
    db = tmp_path / "ref.db"
    await through_ledger(SqliteStore(db), recs)
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    want = sqlite_tables(db)
    for t in ROLLUPS:
        assert rebuilt[t] == want[t], t


async def test_rows_deleted_by_hand_leave_the_rollups_and_the_report(pg: PostgresServer, tmp_path: Path) -> None:
    url, recs = pg.new_database(), history()
    await through_ledger(PostgresStore(url, spill_base=tmp_path / "l"), recs)
    conn = await asyncpg.connect(url)
    try:
        gone = [r["id"] for r in await conn.fetch("SELECT id FROM requests WHERE tier = 'kimi' OR id LIKE 'r1%'")]
        await conn.execute("DELETE FROM attempts WHERE request_id = ANY($1::text[])", gone)
        await conn.execute("DELETE FROM requests WHERE id = ANY($1::text[])", gone)
        await rebuild_rollups(conn)
    finally:
        await conn.close()
    kept = [r for r in recs if r.request_id not in set(gone)]
    assert 0 < len(kept) < len(recs) - 100
    ref = pg.new_database()  # the same ledger had only the kept rows been written
    await through_ledger(PostgresStore(ref, spill_base=tmp_path / "ref"), kept)
    got, want = await pg_tables(url), await pg_tables(ref)
    for t in ROLLUPS:
        assert got[t] == want[t], t
    report = (await build_report(url, "all")).to_json()
    assert report["requests"] == len(kept) and "kimi" not in report["calls"]
    assert report == {**(await build_report(ref, "all")).to_json(), "generated_at": report["generated_at"]}


async def test_latency_buckets_in_sql_are_the_pythons(pg: PostgresServer) -> None:
    rng = random.Random(14)
    edges = [math.exp(k * LOG_GROWTH) for k in range(1, 430)]  # every bucket boundary
    values = [0.0, -3.0, 0.5, 1.0, 1.0000001, 2.0, 1e12, math.inf, math.nan]
    values += [e * f for e in edges for f in (1 - 1e-12, 1.0, 1 + 1e-12)]
    values += [rng.uniform(0, 120_000) for _ in range(20_000)] + [rng.lognormvariate(5, 3) for _ in range(20_000)]
    conn = await asyncpg.connect(pg.url())
    try:
        got = [r[0] for r in await conn.fetch(BUCKETS, LOG_GROWTH, MAX_LATENCY_MS, values)]
    finally:
        await conn.close()
    want = [latency_bucket(v) for v in values]
    assert len(got) == len(values)
    assert [(v, g, w) for v, g, w in zip(values, got, want, strict=True) if g != w] == []


async def test_a_rebuild_while_the_ledger_writes_counts_every_batch_once(pg: PostgresServer, tmp_path: Path) -> None:
    url = pg.new_database()
    recs = history(1500, prefix="w")
    ledger = Ledger(quality_config(batch_size=5), store=PostgresStore(url, spill_base=tmp_path / "l"), linger=0)
    await ledger.start(required=True)
    rebuilds = 0

    async def feed() -> None:
        for i, r in enumerate(recs):
            ledger.submit(r)
            if i % 20 == 0:
                await asyncio.sleep(0.002)  # batches commit between, and during, the rebuilds

    feeding = asyncio.create_task(feed())
    while not feeding.done():
        await rebuild(url)
        rebuilds += 1
    await feeding
    await ledger.close()
    assert ledger.stats.written == len(recs) and rebuilds >= 3, rebuilds
    live = await pg_tables(url)
    await rebuild(url)  # from the raw rows alone: what the rollups must be
    rebuilt = await pg_tables(url)
    for t in ROLLUPS:
        assert live[t] == rebuilt[t], t
