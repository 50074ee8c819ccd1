"""The endpoint in the ledger: `requests.endpoint` from the record's API, the `daily_endpoints`
rollup (exact, and equal to a rebuild), ledger files from before it upgraded in place with the
rollup backfilled, and spill and journal lines from before it still read."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from proxy.ledger import Ledger, LedgerEntry, Pricer, SqliteStore, open_db, rebuild_rollups, spill_path
from proxy.ledger.journal import Journal, journal_base
from proxy.ledger.migrations import MIGRATIONS, migrate, statements
from proxy.ledger.replay import replay
from proxy.ledger.report_read import build_report
from proxy.ledger.spill import import_ledger
from proxy.records import Api, Usage
from tests.support.endpoints import ENDPOINT_OF, endpoint_calls, endpoint_config
from tests.support.records import call
from tests.test_ledger_quality import columns, make_old_ledger, rollups, rows

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()
FIRST, SECOND, LATE, OLD = NOW - 3 * 3600, NOW - 18 * 3600, NOW - 1800, NOW - 3 * 86400

# (day, endpoint, calls, failures, cancelled, prompt, completion, cached, duration_ms, cost nano, cost_usd)
EXPECTED_ROLLUP = [
    ("2026-11-23", "embeddings", 1, 0, 0, 5, 0, 0, 200.0, 0, 0.0),
    ("2026-11-25", "chat/completions", 1, 1, 0, 0, 0, 0, 200.0, 0, 0.0),
    ("2026-11-25", "completions", 1, 0, 0, 200, 100, 0, 200.0, 370_000, 0.00037),
    ("2026-11-25", "embeddings", 1, 0, 0, 2000, 0, 0, 200.0, 1_200_000, 0.0012),
    ("2026-11-25", "responses", 2, 0, 1, 500, 100, 0, 400.0, 550_000, 0.00055),
    ("2026-11-26", "chat/completions", 3, 0, 0, 1107, 223, 400, 600.0, 920_000, 0.00092),
    ("2026-11-26", "completions", 1, 0, 0, 40, 10, 0, 200.0, 0, 0.0),
    ("2026-11-26", "embeddings", 1, 0, 0, 12, 0, 0, 200.0, 0, 0.0),
    ("2026-11-26", "responses", 1, 0, 0, 300, 50, 0, 200.0, 0, 0.0),
]


async def write(db: Path, records: list[Any], batch_size: int = 500) -> None:
    ledger = Ledger(endpoint_config(batch_size), db)
    await ledger.start()
    for r in records:
        ledger.submit(r)
    await ledger.close()


def endpoint_rollup(db: Path) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in rows(db, "SELECT * FROM daily_endpoints ORDER BY day, endpoint")]


async def test_each_request_row_says_its_endpoint(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, endpoint_calls(FIRST, SECOND, LATE, OLD))
    assert {r["id"]: r["endpoint"] for r in rows(db, "SELECT id, endpoint FROM requests")} == ENDPOINT_OF
    assert columns(db, "requests")[-1] == "endpoint"
    # the record's API as the row's column, and the row's JSON (spill, journal) carries it too
    entry = Pricer(endpoint_config()).entry(call("e", "ollama", at=NOW, api=Api.EMBEDDINGS))
    assert entry.request.endpoint == "embeddings"
    assert orjson.loads(entry.to_json())["request"]["endpoint"] == "embeddings"
    assert LedgerEntry.from_json(entry.to_json()) == entry


async def test_the_daily_endpoints_rollup_exact(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, endpoint_calls(FIRST, SECOND, LATE, OLD))
    assert columns(db, "daily_endpoints") == [
        "day",
        "endpoint",
        "calls",
        "failures",
        "cancelled",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "duration_ms",
        "cost_nano_usd",
        "cost_usd",
    ]
    assert endpoint_rollup(db) == EXPECTED_ROLLUP
    # the rollup agrees with the raw rows and with the other rollup
    (raw,) = rows(db, "SELECT count(*) AS calls, sum(cost_nano_usd) AS cost FROM requests")
    (usage,) = rows(db, "SELECT sum(calls) AS calls, sum(cost_nano_usd) AS cost FROM daily_usage")
    assert raw == usage == {"calls": 12, "cost": 3_040_000}


async def test_rollups_equal_a_rebuild_in_small_batches_over_days(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    records = []
    for day in range(4):  # the same set four days apart, batches of 5 cutting across them
        for r in endpoint_calls(FIRST + day * 86400, SECOND + day * 86400, LATE + day * 86400, OLD + day * 86400):
            r.request_id = f"{day}-{r.request_id}"
            for a in r.attempts:
                a.started_at += day * 86400
            records.append(r)
    await write(db, records, batch_size=5)
    live = rollups(db)
    assert sum(r[2] for r in live["daily_endpoints"]) == 4 * 12
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    assert rollups(db) == live


# ---------------------------------------------------------------------------- files from before 0003


def make_0002_ledger(db: Path) -> None:
    """A ledger as the proxy left it before the endpoint column: 0001 and 0002 applied, with rows
    and their rollups (the 0001 file of test_ledger_quality, upgraded by 0002's own script)."""
    make_old_ledger(db)
    conn = sqlite3.connect(db, isolation_level=None)
    for stmt in statements(MIGRATIONS[1].sql):
        conn.execute(stmt)
    conn.execute("INSERT INTO _migrations VALUES ('0002_quality', '2026-11-10T00:00:00Z')")
    conn.close()


async def test_a_0002_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    make_0002_ledger(db)
    assert MIGRATIONS[1].name == "0002_quality" and "endpoint" not in columns(db, "requests")
    old_requests = rows(db, "SELECT * FROM requests ORDER BY id")
    old_rollups = rollups(db, ("daily_usage", "daily_attempts", "daily_latency"))

    conn = await open_db(db)
    assert await migrate(conn) == []  # open_db applied 0003; a second run finds nothing to do
    await conn.close()
    assert [r["name"] for r in rows(db, "SELECT name FROM _migrations ORDER BY name")] == [m.name for m in MIGRATIONS]
    assert MIGRATIONS[-1].name == "0003_endpoint"

    # every old row came to chat completions, the only endpoint there was; nothing else changed
    upgraded = rows(db, "SELECT * FROM requests ORDER BY id")
    assert [{k: r[k] for k in old_requests[0]} for r in upgraded] == old_requests
    assert {r["endpoint"] for r in upgraded} == {"chat/completions"}
    assert rollups(db, ("daily_usage", "daily_attempts", "daily_latency")) == old_rollups
    # daily_endpoints was backfilled from them (make_old_ledger: 100 ms each, old-2 cost 110,000)
    assert endpoint_rollup(db) == [
        ("2026-11-20", "chat/completions", 2, 0, 0, 200, 40, 0, 200.0, 110_000, 0.00011),
        ("2026-11-21", "chat/completions", 1, 1, 0, 0, 0, 0, 100.0, 0, 0.0),
    ]
    live = rollups(db)
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    assert rollups(db) == live

    # the upgraded file takes new records beside the old ones, and reports split them
    await write(db, endpoint_calls(FIRST, SECOND, LATE, OLD))
    report = await build_report(db, "all", now=NOW)
    assert [(e.endpoint, e.calls, e.errors) for e in report.endpoints] == [
        ("chat/completions", 7, 2),
        ("embeddings", 3, 0),
        ("responses", 3, 0),
        ("completions", 2, 0),
    ]


async def test_a_report_upgrades_a_0002_file_first(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    make_0002_ledger(db)
    report = await build_report(db, "all", now=NOW)
    assert [(e.endpoint, e.calls, e.errors, e.prompt_tokens, e.cost_usd) for e in report.endpoints] == [
        ("chat/completions", 3, 1, 200, report.cost_usd),
    ]
    assert len(rows(db, "SELECT * FROM _migrations")) == len(MIGRATIONS)


def _line_from_before(rid: str) -> bytes:
    """A spill/journal line as a proxy from before 0003 wrote it: no `endpoint`."""
    doc = orjson.loads(Pricer(endpoint_config()).entry(call(rid, "kimi", at=NOW, usage=Usage(10, 10))).to_json())
    del doc["request"]["endpoint"]
    return orjson.dumps(doc)


async def test_spill_lines_from_before_the_endpoint_still_import(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    new = Pricer(endpoint_config()).entry(call("new", "ollama", at=NOW, api=Api.RESPONSES, usage=Usage(5, 5)))
    spill_path(db).write_bytes(_line_from_before("old") + b"\n" + new.to_json() + b"\n")
    code, text = await import_ledger(db)
    assert code == 0 and "imported 2" in text, text
    assert rows(db, "SELECT id, endpoint FROM requests ORDER BY id") == [
        {"id": "new", "endpoint": "responses"},
        {"id": "old", "endpoint": "chat/completions"},
    ]
    assert [r[1:3] for r in endpoint_rollup(db)] == [("chat/completions", 1), ("responses", 1)]


async def test_journal_lines_from_before_the_endpoint_still_replay(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    journal = Journal(journal_base(spill_path(db)))
    journal.open()
    journal.append(_line_from_before("j-old"))
    journal._close_fds()  # the process died: the segment is left behind, unlocked
    store = SqliteStore(db)
    await store.open()
    try:
        result = await replay(store, journal_base(store.spill_path))
    finally:
        await store.close()
    assert result.replayed == 1
    assert rows(db, "SELECT id, endpoint FROM requests") == [{"id": "j-old", "endpoint": "chat/completions"}]
    assert [r[1:3] for r in endpoint_rollup(db)] == [("chat/completions", 1)]
