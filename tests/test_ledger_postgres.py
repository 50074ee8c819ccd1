"""The ledger on a real PostgreSQL server (tests/support/postgres.py): schema and migrations,
rows and rollups equal to SQLite's for the same records, reused ids, spend, error mapping,
spill and replay while the server is down, `proxy ledger copy`."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.config import ConfigError, build_config
from proxy.config.urls import redact
from proxy.ledger import Ledger, Pricer, SqliteStore
from proxy.ledger.copy import copy_ledger, copy_main
from proxy.ledger.engine import store_for
from proxy.ledger.migrations import MIGRATIONS
from proxy.ledger.pg_migrations import PG_MIGRATIONS
from proxy.ledger.postgres import PostgresStore
from proxy.ledger.store import RowsRejected, StoreError, StoreUnusable
from proxy.records import AttemptOutcome, CallRecord, Outcome, Usage
from tests.support.endpoints import endpoint_calls
from tests.support.postgres import PostgresServer, remove, start_server
from tests.support.quality import quality_calls, quality_config
from tests.support.records import attempt, call

DAY = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
TABLES = ("requests", "attempts", "daily_usage", "daily_attempts", "daily_latency", "daily_endpoints")


@pytest.fixture
def pg_url(pg: PostgresServer) -> str:
    return pg.new_database()


@pytest.fixture
async def pg_store(pg_url: str, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url, spill_base=tmp_path / "ledger")
    await store.open()
    yield store
    await store.close()


def records() -> list[CallRecord]:
    """A varied day: every endpoint, quality checks, escalations, failures, cancellations, clients."""
    out = quality_calls(DAY + 3600, DAY + 7200) + endpoint_calls(DAY + 100, DAY + 200, DAY + 300, DAY - 86400 * 3)
    out.append(call("alice-1", "kimi", at=DAY + 50, client="alice", usage=Usage(1000, 100), stream=True, ttft_ms=9.5))
    out.append(call("bob-1", "kimi", at=DAY + 60, client="bob", usage=Usage(10, 1000, 5)))
    return out


async def pg_tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(url)
    try:
        out = {}
        for t in TABLES:
            rows = await conn.fetch(f"SELECT * FROM {t}")
            out[t] = sorted((tuple(r) for r in rows), key=repr)
        return out
    finally:
        await conn.close()


def sqlite_tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return {t: sorted((tuple(r) for r in conn.execute(f"SELECT * FROM {t}")), key=repr) for t in TABLES}
    finally:
        conn.close()


async def through_ledger(store: Any, recs: list[CallRecord], batch_size: int = 7) -> Ledger:
    ledger = Ledger(quality_config(batch_size=batch_size), store=store, linger=0)
    await ledger.start(required=True)
    for r in recs:
        ledger.submit(r)
    await ledger.close()
    return ledger


# -- schema


async def test_migrations_recorded_like_sqlite(pg_store: PostgresStore, pg_url: str, tmp_path: Path) -> None:
    assert [m.name for m in PG_MIGRATIONS] == [m.name for m in MIGRATIONS]
    names = [r[0] for r in await pg_store.fetch("SELECT name FROM _migrations ORDER BY name")]
    assert names == [m.name for m in MIGRATIONS]
    # Two more opens at once apply nothing twice; columns are SQLite's, table for table, in order.
    again = [PostgresStore(pg_url, spill_base=tmp_path / "x") for _ in range(2)]
    await asyncio.gather(*(s.open() for s in again))
    for s in again:
        await s.close()
    assert len(await pg_store.fetch("SELECT name FROM _migrations")) == len(MIGRATIONS)
    sq = SqliteStore(tmp_path / "ref.db")
    await sq.open()
    await sq.close()
    conn = sqlite3.connect(tmp_path / "ref.db")
    for t in (*TABLES, "_migrations"):
        want = [r[1] for r in conn.execute(f"PRAGMA table_info({t})")]
        got = await pg_store.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position", t
        )
        assert [r[0] for r in got] == want, t
    conn.close()


# -- rows and rollups


async def test_rows_and_rollups_equal_sqlite(pg_store: PostgresStore, pg_url: str, tmp_path: Path) -> None:
    recs = records()
    await through_ledger(SqliteStore(tmp_path / "ref.db"), recs)
    ledger = await through_ledger(pg_store, recs)
    assert ledger.stats.written == len(recs) and ledger.stats.spilled == 0
    want, got = sqlite_tables(tmp_path / "ref.db"), await pg_tables(pg_url)
    for t in TABLES:
        assert got[t] == want[t], t
    assert len(got["requests"]) == len(recs)


async def test_spend_equals_sqlite(pg_url: str, tmp_path: Path) -> None:
    recs = records()
    ref = SqliteStore(tmp_path / "ref.db")
    await through_ledger(ref, recs)
    pg = PostgresStore(pg_url, spill_base=tmp_path / "ledger")
    await through_ledger(pg, recs)
    for store in (ref, pg):
        await store.open()
    try:
        for day in ("2026-11-01", "2026-11-26", "2026-11-27"):
            assert await pg.spend_since(day) == await ref.spend_since(day)
            assert await pg.client_spend_since(day) == await ref.client_spend_since(day)
        assert await pg.spend_since("2026-11-26") > 0
        assert set(await pg.client_spend_since("2026-11-26")) == {"alice", "bob"}
    finally:
        await ref.close()
        await pg.close()


async def test_reused_ids_renamed_live_and_skipped_on_import(
    pg_store: PostgresStore, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.ledger")
    first = [call("dup", "llama", at=DAY), call("dup", "kimi", at=DAY + 1, usage=Usage(10, 10))]
    await through_ledger(pg_store, first)  # the same id twice in one batch
    await through_ledger(pg_store, [call("dup", "ollama", at=DAY + 2)])  # and again in a later batch
    ids = sorted(r[0] for r in await pg_store.fetch("SELECT id FROM requests"))
    assert ids[0] == "dup" and len(ids) == 3
    assert all(i.startswith("dup~") and len(i) == len("dup~") + 12 for i in ids[1:])
    n = await pg_store.fetch("SELECT request_id, count(*) FROM attempts GROUP BY 1")
    assert sorted(r[0] for r in n) == ids  # each row kept its own attempts
    (calls,) = await pg_store.fetch("SELECT sum(calls) FROM daily_usage")
    assert calls[0] == 3
    assert "was already recorded" in caplog.text
    # An import (a replay, a spill, a copy) takes a known id as already there.
    entry = Pricer(quality_config()).entry(call("dup", "llama", at=DAY))
    assert await pg_store.write([entry], keep_duplicates=False) == 0
    assert len(await pg_store.fetch("SELECT id FROM requests")) == 3


async def test_nul_in_text_is_stored_not_rejected(pg_store: PostgresStore) -> None:
    rec = call("nul", None, at=DAY, status=502, outcome=Outcome.ERROR, error="bad\x00byte",
               attempts=[attempt(1, "llama", AttemptOutcome.HTTP_ERROR, started_at=DAY, error="x\x00y")])  # fmt: skip
    await through_ledger(pg_store, [rec])
    (row,) = await pg_store.fetch("SELECT r.error, a.error FROM requests r JOIN attempts a ON a.request_id = r.id")
    assert tuple(row) == ("bad\ufffdbyte", "x\ufffdy")


async def test_constraint_violation_is_rows_rejected(pg_store: PostgresStore) -> None:
    entry = Pricer(quality_config()).entry(call("c1", "llama", at=DAY))
    bad = type(entry)(entry.request, (entry.attempts[0], entry.attempts[0]))  # attempt n=1 twice
    with pytest.raises(RowsRejected):
        await pg_store.write([bad])
    assert await pg_store.write([entry]) == 1  # the transaction was rolled back whole


# -- errors, passwords


async def test_wrong_password_is_unusable_and_never_shown(pg: PostgresServer, tmp_path: Path) -> None:
    url = pg.url().replace(pg.password, "not-the-password")
    store = PostgresStore(url, spill_base=tmp_path / "l")
    with pytest.raises(StoreUnusable) as e:
        await store.open()
    assert "not-the-password" not in str(e.value) and "not-the-password" not in store.location
    assert store.location == f"postgresql://proxy@127.0.0.1:{pg.port}/postgres"
    missing = PostgresStore(pg.url("no_such_db"), spill_base=tmp_path / "l")
    with pytest.raises(StoreUnusable):
        await missing.open()


def test_redact() -> None:
    assert redact("postgresql://u:s3cret@h:5/db?sslmode=require&password=x") == "postgresql://u@h:5/db?sslmode=require"
    assert redact("postgres://h/db") == "postgres://h/db"


async def test_unreachable_is_store_error_and_spills(tmp_path: Path) -> None:
    from tests.support.proc import free_port

    store = PostgresStore(f"postgresql://proxy:pw@127.0.0.1:{free_port()}/x", spill_base=tmp_path / "ledger")
    with pytest.raises(StoreError) as e:
        await store.open()
    assert not isinstance(e.value, StoreUnusable)
    ledger = Ledger(quality_config(), store=store, retry_delays=(0.01,), linger=0)
    await ledger.start()  # logged, not raised: the proxy serves and spills meanwhile
    for i in range(5):
        ledger.submit(call(f"s{i}", "llama", at=DAY))
    await ledger.close()
    assert ledger.stats.spilled == 5 and ledger.stats.failed == 0
    assert (tmp_path / "ledger.spill.jsonl").exists()
    assert not list(tmp_path.glob("ledger.journal.*"))  # spilled rows are fsynced: the journal goes


async def test_server_stopped_mid_load_loses_nothing(tmp_path: Path) -> None:
    """PostgreSQL killed (immediate stop) while records arrive, restarted: every row is in it once
    the spill file is imported (the next start does it), and the rollups match the raw rows."""
    server = start_server()
    try:
        url = server.new_database()
        config = quality_config(batch_size=20)
        store = PostgresStore(url, spill_base=tmp_path / "ledger")
        ledger = Ledger(config, store=store, retry_delays=(0.01, 0.02), hold_retry_seconds=0.05, linger=0.005)
        await ledger.start(required=True)
        n = 0
        for phase in ("up", "down", "up"):
            if phase == "down":
                await asyncio.to_thread(server.stop, "immediate")
            elif n:
                await asyncio.to_thread(server.start)
            for _ in range(150):
                ledger.submit(call(f"r{n}", "kimi", at=DAY + n, usage=Usage(100, 10)))
                n += 1
                if n % 10 == 0:
                    await asyncio.sleep(0.01)
            await ledger.flush()
        await ledger.close()
        assert ledger.stats.failed == 0 and ledger.stats.spilled > 0
        store2 = PostgresStore(url, spill_base=tmp_path / "ledger")
        again = Ledger(config, store=store2)
        await again.start(required=True)  # imports the spill file
        await again.close()
        await store2.open()
        (row,) = await store2.fetch("SELECT count(*), count(DISTINCT id), sum(cost_nano_usd) FROM requests")
        (roll,) = await store2.fetch("SELECT sum(calls), sum(cost_nano_usd) FROM daily_usage")
        await store2.close()
        assert tuple(row)[:2] == (n, n)
        assert (roll[0], roll[1]) == (n, row[2])
        assert not (tmp_path / "ledger.spill.jsonl").exists()
    finally:
        remove(server)


# -- config


def test_config_url_and_password(tmp_path: Path) -> None:
    raw = {"ledger": {"url": "postgresql://proxy@db:5432/ledger", "password_env": "PGPW", "path": str(tmp_path / "l")}}
    config = build_config(raw, "t", {"PGPW": "hunter2"})
    assert config.ledger_password == "hunter2" and "hunter2" not in repr(config)
    store = store_for(config)
    assert isinstance(store, PostgresStore) and store.spill_path == tmp_path / "l.spill.jsonl"
    assert isinstance(store_for(config, config.ledger.path), PostgresStore)  # what the app passes
    assert isinstance(store_for(config, tmp_path / "other.db"), SqliteStore)  # --db another file
    assert isinstance(store_for(build_config({}, "t", {})), SqliteStore)  # the default
    with pytest.raises(ConfigError, match="PGPW is not set"):
        build_config(raw, "t", {})
    with pytest.raises(ConfigError, match=r"ledger\.url"):
        build_config({"ledger": {"url": "mysql://x/y"}}, "t", {})


# -- proxy ledger copy


async def test_copy_twice_equals_once(pg_url: str, tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    recs = records()
    await through_ledger(SqliteStore(db), recs)
    config = build_config({}, "t", {})
    code, text = await asyncio.to_thread(copy_main, config, str(db), pg_url)
    assert code == 0, text
    assert text.startswith(f"copied {len(recs)} request(s)") and "hunter" not in text
    first = await pg_tables(pg_url)
    code, text = await asyncio.to_thread(copy_main, config, str(db), pg_url)
    assert code == 0, text
    assert text.startswith("copied 0 request(s)") and f"{len(recs)} were there already" in text
    assert await pg_tables(pg_url) == first == sqlite_tables(db)
    # Rows the source gains later are copied on the next run, and only those.
    await through_ledger(SqliteStore(db), [call("late", "kimi", at=DAY + 9000, usage=Usage(5, 5))])
    store = PostgresStore(pg_url, spill_base=tmp_path / "x")
    await store.open()
    try:
        result = await copy_ledger(db, store, chunk=4)
        assert (result.copied, result.skipped) == (1, len(recs))
    finally:
        await store.close()
    assert await pg_tables(pg_url) == sqlite_tables(db)


def test_copy_refuses_missing_source(pg_url: str, tmp_path: Path) -> None:
    code, text = copy_main(build_config({}, "t", {}), str(tmp_path / "nope.db"), pg_url)
    assert code == 1 and "no such ledger file" in text


def test_report_from_an_empty_postgres_says_so(pg_url: str) -> None:
    from proxy.ledger.report_text import report_main  # reports proper: tests/test_reports_postgres.py

    code, text = report_main(pg_url, "24h", False)
    assert code == 1 and "no ledger tables in" in text
    assert pg_url.split(":")[2].split("@")[0] not in text  # the password
