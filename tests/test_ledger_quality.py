"""The quality gate in the ledger: bad answers as attempts, check results and escalation causes
as request columns, their daily rollups, and ledger files from before them upgraded in place."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from proxy.config import Config, build_config
from proxy.ledger import Ledger, LedgerEntry, Pricer, open_db, rebuild_rollups, spill_path
from proxy.ledger.migrations import MIGRATIONS, migrate, statements
from proxy.ledger.report_read import build_report
from proxy.ledger.rows import latency_bucket
from proxy.ledger.spill import import_ledger
from proxy.records import AttemptOutcome, CheckResult, Escalation, Route, Usage
from tests.support.quality import BAD, CUT, TIERS, quality_calls
from tests.support.quality import quality_config as config
from tests.support.records import attempt, call

T0 = datetime(2026, 11, 26, 9, 0, 0, tzinfo=UTC).timestamp()
ROLLUPS = ("daily_usage", "daily_attempts", "daily_latency", "daily_endpoints")
OLD_ROLLUPS = ROLLUPS[:3]  # the tables of 0001_initial


def rows(db: Path, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def columns(db: Path, table: str) -> list[str]:
    return [r["name"] for r in rows(db, f"PRAGMA table_info({table})")]


def rollups(db: Path, tables: tuple[str, ...] = ROLLUPS) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(r.values()) for r in rows(db, f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4")] for t in tables}


async def write(db: Path, records: list[Any], cfg: Config | None = None) -> None:
    ledger = Ledger(cfg or config(), db)
    await ledger.start()
    for r in records:
        ledger.submit(r)
    await ledger.close()


async def test_bad_answers_and_check_results_as_rows(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, quality_calls(T0, T0 + 3600))

    got = rows(
        db, "SELECT n, tier, http_status, outcome, error, checked, cost_nano_usd FROM attempts WHERE request_id = 'D'"
    )
    assert [tuple(a.values()) for a in got] == [
        (1, "llama", 200, "invalid_output", BAD, 1, 0),
        (2, "ollama", 200, "invalid_output", BAD, 1, 0),
        (3, "kimi", 200, "invalid_output", BAD, 1, 1_600_000),  # a bad answer is paid for
    ]
    (d,) = rows(
        db,
        "SELECT status, outcome, tier, check_result, escalated_for, error, cost_nano_usd FROM requests WHERE id = 'D'",
    )
    assert d == {
        "status": 200,
        "outcome": "ok",  # the client got the last bad answer
        "tier": "kimi",
        "check_result": "failed",
        "escalated_for": None,
        "error": BAD,
        "cost_nano_usd": 1_600_000,
    }
    by_id = {r["id"]: (r["route"], r["check_result"], r["escalated_for"]) for r in rows(db, "SELECT * FROM requests")}
    assert by_id["A0"] == ("default", "passed", None)
    assert by_id["E1"] == ("escalated", "passed", "bad_answers")
    assert by_id["F"] == ("escalated", None, "failures")
    assert by_id["G0"] == ("default", None, None)
    assert rows(db, "SELECT outcome, error, checked FROM attempts WHERE request_id = 'B0' ORDER BY n") == [
        {"outcome": "invalid_output", "error": CUT, "checked": 1},
        {"outcome": "ok", "error": None, "checked": 1},
    ]
    # H: the bad Kimi answer and the good one both cost 200/100 tokens; the request carries both
    assert rows(db, "SELECT cost_nano_usd FROM attempts WHERE request_id = 'H' ORDER BY n") == [
        {"cost_nano_usd": 370_000},
        {"cost_nano_usd": 370_000},
    ]
    assert rows(db, "SELECT cost_nano_usd FROM requests WHERE id = 'H'") == [{"cost_nano_usd": 740_000}]


async def test_a_bad_answer_counts_as_checked_even_if_the_record_forgot(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    bad = attempt(1, "llama", AttemptOutcome.INVALID_OUTPUT, started_at=T0, error=BAD)  # checked left False
    entry = Pricer(config()).entry(call("x", "llama", at=T0, attempts=[bad]))
    assert entry.attempts[0].checked == 1
    await write(db, [call("x", "llama", at=T0, attempts=[bad])])
    assert rows(db, "SELECT checked, invalid FROM daily_attempts") == [{"checked": 1, "invalid": 1}]


async def test_quality_rollups_exact(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write(db, quality_calls(T0, T0 + 3600))
    usage = rows(
        db,
        "SELECT tier, route, sum(calls) AS calls, sum(checked) AS checked, sum(check_failed) AS failed,"
        " sum(escalated_bad_answers) AS esc_bad FROM daily_usage GROUP BY tier, route ORDER BY tier, route",
    )
    assert [tuple(u.values()) for u in usage] == [
        ("kimi", "complex", 1, 1, 0, 0),
        ("kimi", "default", 1, 1, 1, 0),
        ("kimi", "escalated", 3, 2, 0, 2),
        ("llama", "default", 9, 6, 0, 0),
        ("ollama", "default", 2, 2, 0, 0),
    ]
    attempts = rows(
        db,
        "SELECT tier, attempts, failures, checked, invalid, invalid_cost_nano_usd, invalid_cost_usd"
        " FROM daily_attempts ORDER BY tier",
    )
    assert [tuple(a.values()) for a in attempts] == [
        ("kimi", 6, 2, 5, 2, 1_970_000, 0.00197),
        ("llama", 15, 6, 11, 5, 0, 0.0),
        ("ollama", 3, 1, 3, 1, 0, 0.0),
    ]


async def test_rollups_equal_a_rebuild_with_bad_answers_in_small_batches(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    records = []
    for day in range(3):  # the same set on three days, batches cutting across them
        records += [
            call(f"{day}-{r.request_id}", r.tier, at=r.started_at + day * 86400, **_fields(r, day))
            for r in quality_calls(T0, T0 + 3600)
        ]
    await write(db, records, config(batch_size=7))
    live = rollups(db)
    assert sum(r[-1] for r in live["daily_usage"]) == 3 * 2  # escalated_bad_answers is the last column
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    assert rollups(db) == live


def _fields(r: Any, day: int) -> dict[str, Any]:
    attempts = [
        attempt(a.n, a.tier, a.outcome, started_at=a.started_at + day * 86400, usage=a.usage, checked=a.checked)
        for a in r.attempts
    ]
    return {
        "attempts": attempts,
        "usage": r.usage,
        "route": r.route,
        "check": r.check,
        "escalated_for": r.escalated_for,
        "status": r.status,
    }


# ---------------------------------------------------------------------------- files from before the gate

_OLD_REBUILD = """
INSERT INTO daily_usage
SELECT substr(started_at, 1, 10), coalesce(tier, ''), route, coalesce(paid, 0), count(*),
       sum(outcome = 'error'), sum(outcome = 'client_cancelled'), sum(tier IS NOT NULL AND attempts > 1),
       sum(attempts), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(cached_tokens), 0), total(duration_ms), sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(cost_nano_usd) / 1e9, sum(baseline_nano_usd) / 1e9
FROM requests GROUP BY 1, 2, 3, 4;
INSERT INTO daily_attempts
SELECT substr(started_at, 1, 10), tier, count(*), sum(outcome NOT IN ('ok', 'cancelled')),
       sum(outcome = 'cancelled'), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(cached_tokens), 0), sum(cost_nano_usd), sum(cost_nano_usd) / 1e9
FROM attempts GROUP BY 1, 2;
INSERT INTO daily_latency
SELECT substr(started_at, 1, 10), tier, 'duration', ledger_bucket(duration_ms), count(*)
FROM requests WHERE tier IS NOT NULL GROUP BY 1, 2, 4;
"""
_OLD_REQUESTS = [
    # id, started_at, route, tier, paid, status, outcome, attempts, prompt, completion, cost, baseline
    ("old-1", "2026-11-20T10:00:00.000Z", "default", "llama", 0, 200, "ok", 1, 100, 20, 0, 110_000),
    ("old-2", "2026-11-20T11:00:00.000Z", "escalated", "kimi", 1, 200, "ok", 2, 100, 20, 110_000, 110_000),
    ("old-3", "2026-11-21T09:00:00.000Z", "default", None, None, 502, "error", 1, None, None, 0, 0),
]
_OLD_ATTEMPTS = [
    ("old-1", 1, "llama", "2026-11-20T10:00:00.000Z", "ok", 0),
    ("old-2", 1, "llama", "2026-11-20T11:00:00.000Z", "bad_response", 0),
    ("old-2", 2, "kimi", "2026-11-20T11:00:01.000Z", "ok", 110_000),
    ("old-3", 1, "llama", "2026-11-21T09:00:00.000Z", "http_error", 0),
]


def make_old_ledger(db: Path) -> None:
    """A ledger as the proxy left it before the quality gate: only 0001_initial, with rows and rollups."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.create_function("ledger_bucket", 1, latency_bucket)
    for stmt in statements(MIGRATIONS[0].sql):
        conn.execute(stmt)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    conn.execute("INSERT INTO _migrations VALUES ('0001_initial', '2026-11-01T00:00:00Z')")
    conn.executemany(
        "INSERT INTO requests (id, started_at, duration_ms, route, stream, tier, paid, status, outcome, attempts,"
        " prompt_tokens, completion_tokens, usage_source, cost_usd, baseline_cost_usd, cost_nano_usd,"
        " baseline_nano_usd) VALUES (?, ?, 100.0, ?, 0, ?, ?, ?, ?, ?, ?, ?, 'upstream', ? / 1e9, ? / 1e9, ?, ?)",
        [(*r[:10], r[10], r[11], r[10], r[11]) for r in _OLD_REQUESTS],
    )
    conn.executemany(
        "INSERT INTO attempts (request_id, n, tier, model, started_at, duration_ms, outcome, cost_usd, cost_nano_usd)"
        " VALUES (?, ?, ?, 'm', ?, 50.0, ?, ? / 1e9, ?)",
        [(*a, a[5]) for a in _OLD_ATTEMPTS],
    )
    for stmt in statements(_OLD_REBUILD):
        conn.execute(stmt)
    conn.close()


async def test_an_old_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    make_old_ledger(db)
    old_requests = rows(db, "SELECT * FROM requests ORDER BY id")
    old_rollups = rollups(db, OLD_ROLLUPS)
    assert "check_result" not in columns(db, "requests")

    conn = await open_db(db)
    assert await migrate(conn) == []  # open_db applied it; a second run finds nothing to do
    await conn.close()
    assert [r["name"] for r in rows(db, "SELECT name FROM _migrations ORDER BY name")] == [
        "0001_initial",
        "0002_quality",
        "0003_endpoint",
    ]
    assert columns(db, "requests")[-3:] == ["check_result", "escalated_for", "endpoint"]
    assert columns(db, "attempts")[-1] == "checked"
    assert columns(db, "daily_usage")[-3:] == ["checked", "check_failed", "escalated_bad_answers"]
    assert columns(db, "daily_attempts")[-4:] == ["checked", "invalid", "invalid_cost_nano_usd", "invalid_cost_usd"]

    # the old rows are all there, unchecked; the old rollups gain zeros, which is what a rebuild says
    upgraded = rows(db, "SELECT * FROM requests ORDER BY id")
    assert [{k: r[k] for k in old_requests[0]} for r in upgraded] == old_requests
    assert {(r["check_result"], r["escalated_for"]) for r in upgraded} == {(None, None)}
    assert rows(db, "SELECT DISTINCT checked FROM attempts") == [{"checked": 0}]
    assert {t: [r[: len(old_rollups[t][0])] for r in v] for t, v in rollups(db, OLD_ROLLUPS).items()} == old_rollups
    live = rollups(db)
    conn = await open_db(db)
    await rebuild_rollups(conn)
    await conn.close()
    assert rollups(db) == live

    # and the upgraded file takes the new records beside the old ones
    await write(db, quality_calls(T0, T0 + 3600))
    report = await build_report(db, "all", now=T0 + 86400)
    assert (report.requests, report.answers_checked, report.answers_passed, report.bad_answers) == (19, 12, 11, 8)
    assert (report.escalated, report.escalated_bad_answers) == (4, 2)  # old-2 escalated, cause unknown


async def test_a_report_upgrades_an_old_file_first(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    make_old_ledger(db)
    report = await build_report(db, "all", now=T0)
    assert (report.requests, report.answers_checked, report.answers_passed_pct, report.bad_answers) == (3, 0, None, 0)
    assert {t.tier: (t.attempts, t.failures, t.checked, t.bad_answer_rate) for t in report.tiers} == {
        "llama": (3, 2, 0, None),
        "kimi": (1, 0, 0, None),
    }
    assert len(rows(db, "SELECT * FROM _migrations")) == len(MIGRATIONS)


async def test_spill_lines_from_before_the_gate_still_import(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    new = Pricer(config()).entry(
        call(
            "new",
            "kimi",
            at=T0,
            usage=Usage(10, 10),
            route=Route.ESCALATED,
            check=CheckResult.PASSED,
            escalated_for=Escalation.BAD_ANSWERS,
        )
    )
    old = orjson.loads(Pricer(config()).entry(call("old", "llama", at=T0)).to_json())
    for key in ("check_result", "escalated_for"):
        del old["request"][key]
    for a in old["attempts"]:
        del a["checked"]
    assert old["v"] == 1
    spill_path(db).write_bytes(orjson.dumps(old) + b"\n" + new.to_json() + b"\n")
    assert LedgerEntry.from_json(new.to_json()) == new

    code, text = await import_ledger(db)
    assert code == 0 and "imported 2" in text, text
    got = rows(db, "SELECT id, check_result, escalated_for FROM requests ORDER BY id")
    assert got == [
        {"id": "new", "check_result": "passed", "escalated_for": "bad_answers"},
        {"id": "old", "check_result": None, "escalated_for": None},
    ]
    assert rows(db, "SELECT sum(checked) AS c, sum(escalated_bad_answers) AS e FROM daily_usage") == [{"c": 1, "e": 1}]


async def test_a_bad_answer_is_billed_like_an_answer_at_a_flat_price(tmp_path: Path) -> None:
    """Kimi at $0.0008 a call with no token counts: the bad answer was answered, so it costs
    the flat price (a timeout would not); the request pays for it and for the good answer."""
    db = tmp_path / "ledger.db"
    tiers = {**TIERS, "kimi": {**TIERS["kimi"], "price": {"per_call_usd": "0.0008"}}}
    cfg = build_config({"tiers": tiers}, "test", {})
    attempts = [
        attempt(1, "kimi", AttemptOutcome.TIMEOUT, started_at=T0),
        attempt(2, "kimi", AttemptOutcome.INVALID_OUTPUT, started_at=T0, http_status=200, error=CUT, checked=True),
        attempt(3, "kimi", started_at=T0, http_status=200, checked=True),
    ]
    await write(db, [call("k", "kimi", at=T0, attempts=attempts, check=CheckResult.PASSED)], cfg)
    got = rows(db, "SELECT outcome, cost_nano_usd FROM attempts ORDER BY n")
    assert [tuple(a.values()) for a in got] == [("timeout", 0), ("invalid_output", 800_000), ("ok", 800_000)]
    assert rows(db, "SELECT cost_nano_usd FROM requests") == [{"cost_nano_usd": 1_600_000}]
    assert rows(db, "SELECT invalid, invalid_cost_nano_usd FROM daily_attempts") == [
        {"invalid": 1, "invalid_cost_nano_usd": 800_000}
    ]
