from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, build_config
from proxy.ledger import Ledger, LedgerEntry, Pricer, iso_utc, open_db, rebuild_rollups, spill_path
from proxy.ledger.migrations import MIGRATIONS, migrate
from proxy.ledger.spill import import_ledger
from proxy.ledger.store import StoreError, StoreUnusable
from proxy.records import (
    AttemptOutcome,
    AttemptRecord,
    CallRecord,
    Outcome,
    Route,
    Usage,
    UsageSource,
)
from tests.support.records import attempt as made_attempt
from tests.support.records import call as made_call

T0 = datetime(2026, 11, 26, 15, 4, 5, 123000, tzinfo=UTC).timestamp()


def make_config(store_text: bool = False, batch_size: int = 500) -> Config:
    raw = {"ledger": {"store_text": store_text, "batch_size": batch_size}}
    return build_config(raw, "test", {"MOONSHOT_API_KEY": "k"})


def impatient(db: Path) -> Ledger:
    """A ledger that gives up on a busy or broken database within ~50 ms."""
    return Ledger(
        make_config(),
        db,
        retry_delays=(0.01, 0.01),
        start_retry_delays=(0.05, 0.1, 0.2),
        busy_timeout_ms=20,
        hold_retry_seconds=0.02,
    )


def attempt(n: int, tier: str, outcome: AttemptOutcome = AttemptOutcome.OK, **kw: Any) -> AttemptRecord:
    return made_attempt(n, tier, outcome, **{"started_at": T0 + n, "duration_ms": 100.0, **kw})


def call(rid: str, tier: str | None = "llama", *, at: float = T0, **kw: Any) -> CallRecord:
    kw.setdefault("attempts", [attempt(1, tier or "llama", started_at=at, usage=kw.get("usage"))])
    return made_call(rid, tier, at=at, **{"duration_ms": 250.0, **kw})


def rows(db: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def write(db: Path, *records: CallRecord, config: Config | None = None) -> Ledger:
    ledger = Ledger(config or make_config(), db)
    await ledger.start()
    for r in records:
        ledger.submit(r)
    await ledger.close()
    return ledger


async def test_success_row_field_by_field(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    usage = Usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=200)
    rec = call(
        "req-1",
        "kimi",
        usage=usage,
        stream=True,
        ttft_ms=80.5,
        client="alice",
        request_body=b"{}",
        attempts=[attempt(1, "kimi", started_at=T0 + 0.01, ttft_ms=80.0, http_status=200, usage=usage)],
    )
    ledger = await write(db, rec)
    assert ledger.stats.written == 1

    (r,) = rows(db, "SELECT * FROM requests")
    # 1000 * 0.60 + 200 * 0.15 + 300 * 2.50 per million
    cost = Decimal("0.00138")
    assert dict(r) == {
        "id": "req-1",
        "started_at": "2026-11-26T15:04:05.123Z",
        "duration_ms": 250.0,
        "route": "default",
        "stream": 1,
        "requested_model": "auto",
        "tier": "kimi",
        "paid": 1,
        "model": "kimi-model",
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "ttft_ms": 80.5,
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "cached_tokens": 200,
        "usage_source": "upstream",
        "cost_usd": float(cost),
        "baseline_cost_usd": float(cost),
        "cost_nano_usd": 1_380_000,
        "baseline_nano_usd": 1_380_000,
        "client": "alice",
        "error": None,
        "request_text": None,  # store_text is off by default
        "response_text": None,
        "check_result": None,  # nothing was checked
        "escalated_for": None,
        "endpoint": "chat/completions",
    }
    (a,) = rows(db, "SELECT * FROM attempts")
    assert dict(a) == {
        "request_id": "req-1",
        "n": 1,
        "tier": "kimi",
        "model": "kimi-model",
        "started_at": "2026-11-26T15:04:05.133Z",
        "duration_ms": 100.0,
        "ttft_ms": 80.0,
        "http_status": 200,
        "outcome": "ok",
        "error": None,
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "cached_tokens": 200,
        "cost_usd": float(cost),
        "cost_nano_usd": 1_380_000,
        "checked": 0,
    }
    (u,) = rows(db, "SELECT * FROM daily_usage")
    assert (u["day"], u["tier"], u["route"], u["paid"], u["calls"], u["cost_nano_usd"]) == (
        "2026-11-26",
        "kimi",
        "default",
        1,
        1,
        1_380_000,
    )


async def test_text_is_kept_only_when_configured(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    rec = call("t", request_body=b'{"messages": []}', response_body=b"caf\xc3\xa9 \xff")
    await write(db, rec, config=make_config(store_text=True))
    (r,) = rows(db, "SELECT request_text, response_text FROM requests")
    assert tuple(r) == ('{"messages": []}', "café \ufffd")


async def test_failover_is_one_request_row_and_one_row_per_attempt(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    rec = call(
        "fo",
        "kimi",
        usage=usage,
        route=Route.ESCALATED,
        attempts=[
            attempt(1, "llama", AttemptOutcome.TIMEOUT, error="read timeout", duration_ms=30000.0),
            attempt(2, "ollama", AttemptOutcome.HTTP_ERROR, http_status=503, error="upstream 503"),
            attempt(3, "ollama", AttemptOutcome.CONNECT_ERROR, error="refused"),
            attempt(4, "kimi", http_status=200, usage=usage),
        ],
    )
    await write(db, rec)
    (r,) = rows(db, "SELECT tier, route, attempts, cost_nano_usd, outcome FROM requests")
    assert tuple(r) == ("kimi", "escalated", 4, 3_100_000, "ok")
    got = rows(db, "SELECT n, tier, outcome, http_status, error, cost_nano_usd FROM attempts ORDER BY n")
    assert [tuple(a) for a in got] == [
        (1, "llama", "timeout", None, "read timeout", 0),
        (2, "ollama", "http_error", 503, "upstream 503", 0),
        (3, "ollama", "connect_error", None, "refused", 0),
        (4, "kimi", "ok", 200, None, 3_100_000),
    ]
    per_tier = rows(db, "SELECT tier, attempts, failures FROM daily_attempts ORDER BY tier")
    assert [tuple(x) for x in per_tier] == [("kimi", 1, 0), ("llama", 1, 1), ("ollama", 2, 2)]
    (u,) = rows(db, "SELECT calls, fallbacks, attempts FROM daily_usage")
    assert tuple(u) == (1, 1, 4)


async def test_failed_request_costs_what_its_attempts_cost(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    rec = call(
        "failed",
        None,
        status=502,
        outcome=Outcome.ERROR,
        error="all tiers failed",
        attempts=[
            attempt(1, "llama", AttemptOutcome.CONNECT_ERROR),
            # The upstream billed the tokens before the stream broke.
            attempt(2, "kimi", AttemptOutcome.BAD_RESPONSE, usage=Usage(0, 400)),
        ],
    )
    await write(db, rec)
    (r,) = rows(db, "SELECT tier, paid, status, cost_nano_usd, baseline_nano_usd, usage_source FROM requests")
    assert tuple(r) == (None, None, 502, 1_000_000, 0, "none")


async def test_per_call_price_and_estimated_usage(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    estimated = Usage(prompt_tokens=2000, completion_tokens=0, source=UsageSource.ESTIMATED)
    await write(db, call("flat", "kimi"), call("est", "kimi", usage=estimated), call("free", "llama"))
    got = rows(db, "SELECT id, usage_source, cost_nano_usd, baseline_nano_usd FROM requests ORDER BY id")
    assert [tuple(r) for r in got] == [
        ("est", "estimated", 800_000, 800_000),  # no upstream usage: kimi's flat per-call price
        ("flat", "none", 800_000, 800_000),
        ("free", "none", 0, 800_000),
    ]


async def test_close_drains_thousands_of_queued_records(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(batch_size=500), db)
    await ledger.start()
    n = 5000
    records = [call(f"r{i}", "kimi" if i % 10 == 0 else "llama", at=T0 + i / 1000) for i in range(n)]
    started = time.perf_counter()
    for r in records:
        ledger.submit(r)
    assert ledger.stats.queue_depth == n  # submit only queued: nothing was awaited yet
    await ledger.close()
    elapsed = time.perf_counter() - started
    print(f"\nledger: {n} records submitted and written in {elapsed:.2f}s = {n / elapsed:,.0f} records/s")
    assert ledger.stats.written == n and ledger.stats.queue_depth == 0
    assert tuple(rows(db, "SELECT count(*), sum(cost_nano_usd) FROM requests")[0]) == (n, 500 * 800_000)
    assert rows(db, "SELECT sum(calls) FROM daily_usage")[0][0] == n
    assert n / elapsed > 2000  # the brief: thousands of records per second on one core


async def test_reused_request_id_is_kept_under_a_new_id(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, call("same"), call("same"))
    await write(db, call("same"))
    ids = [r[0] for r in rows(db, "SELECT id FROM requests ORDER BY rowid")]
    assert len(ids) == 3 and ids[0] == "same" and all(i.startswith("same~") for i in ids[1:])
    assert rows(db, "SELECT count(DISTINCT request_id) FROM attempts")[0][0] == 3


async def test_locked_database_spills_and_the_next_start_imports(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, call("before"))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        ledger = impatient(db)
        await ledger.start()
        for i in range(50):
            ledger.submit(call(f"s{i}", "kimi"))
        await ledger.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (ledger.stats.written, ledger.stats.spilled, ledger.stats.failed) == (0, 50, 0)
    assert len(spill_path(db).read_bytes().splitlines()) == 50

    again = Ledger(make_config(), db)
    await again.start()
    assert again.stats.imported == 50
    await again.close()
    assert not spill_path(db).exists()
    assert tuple(rows(db, "SELECT count(*), sum(cost_nano_usd) FROM requests")[0]) == (51, 50 * 800_000)
    assert tuple(rows(db, "SELECT sum(calls), sum(cost_nano_usd) FROM daily_usage")[0]) == (51, 50 * 800_000)
    assert await import_ledger(db) == (0, f"nothing to import: no spill file {spill_path(db)}")


async def test_import_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    pricer = Pricer(make_config())
    entries = [pricer.entry(call(f"i{i}", "kimi")) for i in range(3)]
    lines = b"".join(e.to_json() + b"\n" for e in entries)
    spill_path(db).write_bytes(lines + b'{"torn line\n')
    assert (await import_ledger(db))[0] == 0
    # As if the proxy had died after committing but before deleting the file:
    spill_path(db).write_bytes(lines)
    code, text = await import_ledger(db)
    assert code == 0 and "imported 0" in text and "3 were already there" in text
    assert rows(db, "SELECT count(*) FROM requests")[0][0] == 3
    assert rows(db, "SELECT sum(calls) FROM daily_usage")[0][0] == 3
    assert Path(f"{db}.spill.rejected.jsonl").read_bytes() == b'{"torn line\n'
    assert LedgerEntry.from_json(entries[0].to_json()) == entries[0]


async def test_vanished_directory_loses_nothing_silently_and_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    db = folder / "ledger.db"
    ledger = impatient(db)
    await ledger.start()
    ledger.submit(call("a"))
    await ledger.flush()
    shutil.rmtree(folder)
    folder.write_text("not a directory")  # neither the database nor the spill file can be written
    ledger.submit(call("b"))
    ledger.submit(call("c"))
    for _ in range(100):  # the writer tries, fails both ways, and holds the rows
        await asyncio.sleep(0.01)
        if ledger.stats.queue_depth == 2 and ledger.stats.written == 1:
            break
    assert (ledger.stats.written, ledger.stats.spilled, ledger.stats.failed, ledger.stats.queue_depth) == (1, 0, 0, 2)
    folder.unlink()
    ledger.submit(call("d"))  # the directory is back: a fresh database is created, held rows land
    await ledger.close()
    assert ledger.stats.written == 4 and ledger.stats.failed == 0
    assert [r[0] for r in rows(db, "SELECT id FROM requests ORDER BY id")] == ["b", "c", "d"]


async def test_deleted_database_file_is_recreated(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(), db)
    await ledger.start()
    ledger.submit(call("a"))
    await ledger.flush()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    ledger.submit(call("b"))
    await ledger.close()
    assert [r[0] for r in rows(db, "SELECT id FROM requests")] == ["b"]


async def test_unopenable_database_spills_from_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    db = blocker / "ledger.db"
    ledger = impatient(db)
    await ledger.start()  # logs, does not raise
    ledger.submit(call("a"))
    await ledger.close()
    assert ledger.stats.failed == 1


async def test_a_required_store_that_no_retry_fixes_raises_at_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    db.write_bytes(b"a note, not a database\n" * 200)
    ledger = impatient(db)
    started = time.monotonic()
    with pytest.raises(StoreUnusable, match="not a database"):
        await ledger.start(required=True)
    assert time.monotonic() - started < 0.1, "not retried: no retry turns a note into a database"
    assert db.read_bytes() == b"a note, not a database\n" * 200
    assert not ledger.spill_path.exists()


async def test_a_required_store_that_is_locked_is_retried_until_free(tmp_path: Path) -> None:
    """Another process holds an exclusive lock on a rollback-journal file while the proxy starts:
    switching it to WAL fails with "database is locked" until the lock goes, then the start goes on."""
    db = tmp_path / "ledger.db"
    blocker = sqlite3.connect(db, timeout=0, isolation_level=None)
    blocker.execute("CREATE TABLE other (x)")
    blocker.execute("BEGIN EXCLUSIVE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.25, blocker.rollback)
    ledger = impatient(db)
    try:
        started = time.monotonic()
        await ledger.start(required=True)
        assert time.monotonic() - started >= 0.25
        ledger.submit(call("after-the-lock"))
        await ledger.close()
    finally:
        blocker.close()
    assert (ledger.stats.written, ledger.stats.spilled) == (1, 0)


async def test_a_required_store_locked_for_good_raises_after_the_retries(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    blocker = sqlite3.connect(db, timeout=0, isolation_level=None)
    blocker.execute("CREATE TABLE other (x)")
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked") as raised:
            await impatient(db).start(required=True)
        assert not isinstance(raised.value, StoreUnusable)
    finally:
        blocker.close()


async def test_submit_never_raises(tmp_path: Path) -> None:
    ledger = Ledger(make_config(), tmp_path / "ledger.db")
    await ledger.start()
    bad = call("bad")
    bad.started_at = None  # type: ignore[assignment]
    ledger.submit(bad)
    ledger.submit(call("unknown-tier", "gone"))
    await ledger.close()
    assert (ledger.stats.failed, ledger.stats.written) == (1, 1)
    ledger.submit(call("late"))  # after close: appended to the spill file
    assert ledger.stats.spilled == 1 and ledger.spill_path.exists()


async def test_rollups_match_a_rebuild_from_raw_rows(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    records = []
    for i in range(300):
        tier = ("llama", "ollama", "kimi", None)[i % 4]
        usage = Usage(100 + i, 10 + i, i % 50) if i % 3 else None
        records.append(
            call(
                f"r{i}",
                tier,
                at=T0 + i * 3600,
                usage=usage,
                ttft_ms=float(i % 200) if i % 2 else None,
                duration_ms=float(10 * i),
                outcome=Outcome.ERROR if tier is None else Outcome.OK,
                route=(Route.DEFAULT, Route.COMPLEX, Route.PINNED)[i % 3],
            )
        )
    await write(db, *records, config=make_config(batch_size=37))
    tables = ("daily_usage", "daily_attempts", "daily_latency", "daily_endpoints")
    live = {t: rows(db, f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4") for t in tables}
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    for t in tables:
        assert [tuple(r) for r in rows(db, f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4")] == [tuple(r) for r in live[t]]


async def test_migrations_are_recorded_and_applied_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    conn = await open_db(db)
    assert await migrate(conn) == []
    await conn.close()
    applied = [r[0] for r in rows(db, "SELECT name FROM _migrations")]
    assert applied == [m.name for m in MIGRATIONS]
    assert rows(db, "PRAGMA journal_mode")[0][0] == "wal"


async def test_iso_timestamps_sort_as_time() -> None:
    assert iso_utc(T0) == "2026-11-26T15:04:05.123Z"
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    stamps = [iso_utc(T0 + d) for d in (0.0005, 0.9999, 1.0, 59.9, 86400.0)]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("n", [1, 3])
async def test_flush_waits_for_the_writer(tmp_path: Path, n: int) -> None:
    ledger = Ledger(make_config(), tmp_path / "ledger.db")
    await ledger.start()
    for i in range(n):
        ledger.submit(call(f"f{i}"))
    await asyncio.wait_for(ledger.flush(), 5)
    assert ledger.stats.written == n
    await ledger.close()
