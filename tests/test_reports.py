from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, build_config
from proxy.ledger import Ledger, iso_utc, open_db, rebuild_rollups
from proxy.ledger.report import ALLOWED_SINCE, parse_since
from proxy.ledger.report_read import build_report
from proxy.ledger.report_text import render_table, report_main
from proxy.ledger.spill import import_main
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Outcome, Route, Usage
from tests.support.records import attempt, call

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()
TIERS: dict[str, dict[str, Any]] = {
    "llama": {"base_url": "http://127.0.0.1:1/v1", "model": "llama3.1:8b"},
    "ollama": {"base_url": "http://127.0.0.1:2/v1", "model": "qwen2.5:7b"},
    "kimi": {"base_url": "http://127.0.0.1:3/v1", "model": "kimi-k2.5", "paid": True},
}


def config(kimi_price: dict[str, str]) -> Config:
    tiers = {**TIERS, "kimi": {**TIERS["kimi"], "price": kimi_price}}
    return build_config({"tiers": tiers}, "test", {})


def record(rid: str, tier: str | None, at: float, **kw: Any) -> CallRecord:
    kw.setdefault("attempts", [attempt(1, tier or "llama", started_at=at, model="m", usage=kw.get("usage"))])
    return call(rid, tier, at=at, model=tier, **kw)


async def write(db: Path, cfg: Config, records: list[CallRecord]) -> None:
    ledger = Ledger(cfg, db)
    await ledger.start()
    for r in records:
        ledger.submit(r)
    await ledger.close()


async def test_nine_free_calls_and_one_paid_call(tmp_path: Path) -> None:
    """The acceptance example: Kimi at a flat $0.0008 per call, no token usage reported."""
    db = tmp_path / "ledger.db"
    cfg = config({"per_call_usd": "0.0008"})
    records = [record(f"l{i}", "llama", NOW - 60 - i) for i in range(9)] + [record("k", "kimi", NOW - 30)]
    await write(db, cfg, records)

    report = await build_report(db, "24h", now=NOW)
    assert report.calls == {"llama": 9, "kimi": 1}
    assert report.cost_usd == Decimal("0.0008")
    assert report.savings_usd == Decimal("0.0072")
    assert report.free_call_pct == 90.0
    data = report.to_json()
    assert (data["calls"], data["cost_usd"], data["savings_usd"], data["free_call_pct"]) == (
        {"llama": 9, "kimi": 1},
        0.0008,
        0.0072,
        90.0,
    )
    assert data["exact"] == {"cost_usd": "0.0008", "savings_usd": "0.0072", "bad_answer_cost_usd": "0"}
    # nothing was checked: the quality figures are zeros and nulls, not made up
    assert (data["answers_checked"], data["answers_passed_pct"], data["bad_answers"], data["escalated"]) == (
        0,
        None,
        0,
        0,
    )
    text = render_table(report)
    assert "Paid cost: $0.000800" in text and "Estimated savings: $0.007200" in text
    assert "Free calls: 90.0%" in text


def _mixed_records() -> list[CallRecord]:
    """Ten days of traffic with failovers, errors, cancellations, cached tokens and streams."""
    out: list[CallRecord] = []
    for i in range(600):
        at = NOW - i * 1447.0  # ~ every 24 minutes, not aligned to days
        usage = Usage(500 + i, 50 + i % 70, (i * 13) % 400) if i % 4 else None
        kind = i % 10
        if kind < 6:
            out.append(record(f"r{i}", "llama", at, usage=usage, duration_ms=100.0 + i, ttft_ms=10.0 + i % 50))
        elif kind < 8:
            out.append(
                record(
                    f"r{i}",
                    "ollama",
                    at,
                    usage=usage,
                    duration_ms=300.0 + i,
                    attempts=[
                        AttemptRecord(1, "llama", "m", at, 50.0, outcome=AttemptOutcome.TIMEOUT),
                        AttemptRecord(2, "ollama", "m", at + 1, 300.0, usage=usage),
                    ],
                )
            )
        elif kind == 8:
            out.append(record(f"r{i}", "kimi", at, usage=usage, duration_ms=900.0 + i, route=Route.ESCALATED))
        elif i % 20 == 9:
            failed = [AttemptRecord(1, "llama", "m", at, 5.0, outcome=AttemptOutcome.CONNECT_ERROR)]
            out.append(record(f"r{i}", None, at, status=502, outcome=Outcome.ERROR, attempts=failed))
        else:
            gone = [AttemptRecord(1, "kimi", "m", at, 5.0, outcome=AttemptOutcome.CANCELLED)]
            out.append(record(f"r{i}", None, at, status=499, outcome=Outcome.CLIENT_CANCELLED, attempts=gone))
    return out


def _hand_sql(db: Path, cutoff: str) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        q = conn.execute
        calls = dict(
            q(
                "SELECT tier, count(*) FROM requests WHERE started_at >= ? AND tier IS NOT NULL GROUP BY tier",
                (cutoff,),
            ).fetchall()
        )
        total, errors, cancelled, cost = q(
            "SELECT count(*), total(outcome = 'error'), total(outcome = 'client_cancelled'), sum(cost_nano_usd) "
            "FROM requests WHERE started_at >= ?",
            (cutoff,),
        ).fetchone()
        free, savings = q(
            "SELECT count(*), sum(baseline_nano_usd - cost_nano_usd) FROM requests "
            "WHERE started_at >= ? AND tier IS NOT NULL AND paid = 0",
            (cutoff,),
        ).fetchone()
        per_tier = {
            t: (c, f, p, comp, n)
            for t, c, f, p, comp, n in q(
                "SELECT tier, count(*), total(attempts > 1), total(prompt_tokens), total(completion_tokens), "
                "sum(cost_nano_usd) FROM requests WHERE started_at >= ? AND tier IS NOT NULL GROUP BY tier",
                (cutoff,),
            )
        }
        attempts = {
            t: (n, f)
            for t, n, f in q(
                "SELECT tier, count(*), total(outcome NOT IN ('ok', 'cancelled')) FROM attempts "
                "WHERE started_at >= ? GROUP BY tier",
                (cutoff,),
            )
        }
        durations = {
            t: sorted(
                d for (d,) in q("SELECT duration_ms FROM requests WHERE started_at >= ? AND tier = ?", (cutoff, t))
            )
            for t in calls
        }
    finally:
        conn.close()
    return {
        "calls": calls,
        "totals": (total, int(errors), int(cancelled), Decimal(cost) / 10**9),
        "free": (free, Decimal(savings or 0) / 10**9),
        "per_tier": per_tier,
        "attempts": attempts,
        "durations": durations,
    }


def _nearest_rank(values: list[float], p: float) -> float:
    return values[max(1, math.ceil(p * len(values))) - 1]


@pytest.mark.parametrize("since", ["24h", "36h", "7d", "all"])
async def test_report_totals_equal_hand_written_sql(tmp_path: Path, since: str) -> None:
    db = tmp_path / "ledger.db"
    await write(
        db,
        config(
            {
                "input_per_mtok": "0.60",
                "cached_input_per_mtok": "0.15",
                "output_per_mtok": "2.50",
                "per_call_usd": "0.0008",
            }
        ),
        _mixed_records(),
    )
    report = await build_report(db, since, now=NOW)
    cutoff = parse_since(since, NOW)
    sql = _hand_sql(db, "" if cutoff is None else iso_utc(cutoff))

    assert report.calls == sql["calls"]
    assert (report.requests, report.errors, report.client_cancelled, report.cost_usd) == sql["totals"]
    assert (report.free_calls, report.savings_usd) == sql["free"]
    assert report.answered == sum(sql["calls"].values())
    assert report.free_call_pct == round(100 * report.free_calls / report.answered, 2)
    tiers = {t.tier: t for t in report.tiers}
    for name, (calls, fallbacks, prompt, completion, cost) in sql["per_tier"].items():
        t = tiers[name]
        assert (t.calls, t.fallbacks, t.prompt_tokens, t.completion_tokens) == (calls, fallbacks, prompt, completion)
        assert t.cost_usd == Decimal(cost) / 10**9
        exact = sql["durations"][name]
        for p, got in ((0.5, t.latency_p50_ms), (0.95, t.latency_p95_ms)):
            assert got == pytest.approx(_nearest_rank(exact, p), rel=0.03)  # 5% histogram buckets
    assert {t.tier: (t.attempts, t.failures) for t in report.tiers if t.attempts} == {
        k: (n, int(f)) for k, (n, f) in sql["attempts"].items()
    }
    assert tiers["ollama"].fallback_rate == 1.0 and tiers["llama"].fallback_rate == 0.0
    assert tiers["llama"].failures > 0 and tiers["kimi"].cancelled > 0


def test_since_values() -> None:
    assert parse_since("all", NOW) is None
    assert parse_since("24h", NOW) == NOW - 86400
    assert parse_since("7d", NOW) == NOW - 7 * 86400
    assert parse_since("30d", NOW) == NOW - 30 * 86400
    assert parse_since("12h", NOW) == NOW - 12 * 3600
    for bad in ("", "24", "1w", "-1d", "0h", "1.5d", "yesterday", "7 days"):
        with pytest.raises(ValueError, match="24h, 7d, 30d, all"):
            parse_since(bad, NOW)


def test_report_main_exit_codes_and_json(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    assert report_main(str(db), "1w", False) == (2, f"invalid --since '1w': expected {ALLOWED_SINCE}")
    code, text = report_main(str(db), "24h", False)
    assert code == 1 and "no ledger database" in text
    asyncio.run(write(db, config({"per_call_usd": "0.0008"}), [record("k", "kimi", time.time() - 5)]))
    code, text = report_main(str(db), "24h", True)
    data = json.loads(text)
    assert code == 0 and data["calls"] == {"kimi": 1} and data["cost_usd"] == 0.0008
    assert list(data) == [
        "since",
        "window_start",
        "generated_at",
        "requests",
        "answered",
        "errors",
        "client_cancelled",
        "calls",
        "cost_usd",
        "savings_usd",
        "free_calls",
        "free_call_pct",
        "answers_checked",
        "answers_passed",
        "answers_passed_pct",
        "bad_answers",
        "bad_answer_cost_usd",
        "escalated",
        "escalated_bad_answers",
        "exact",
        "tiers",
        "endpoints",
    ]
    code, text = report_main(str(db), "all", False)
    assert code == 0 and "kimi" in text and "yes" in text
    assert import_main(str(db))[0] == 0
    assert import_main(str(db))[0] == 0


async def test_empty_window(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await (await open_db(db)).close()
    report = await build_report(db, "24h", now=NOW)
    assert report.requests == 0 and report.calls == {} and report.cost_usd == 0
    assert report.free_call_pct is None
    assert "No requests in this window." in render_table(report)


# ---------------------------------------------------------------------------- a million rows

_DAYS, _PER_DAY = 100, 10_000
_GENERATE = """
WITH RECURSIVE
days(d, prefix) AS (
    SELECT :first, date(:day0, 'unixepoch', '+' || :first || ' days')
    UNION ALL SELECT d + 1, date(prefix, '+1 day') FROM days WHERE d < :last),
seq(x, clock) AS (
    SELECT 0, 'T00:00:00.000Z'
    UNION ALL SELECT x + 1, strftime('T%H:%M:%fZ', (x + 1) * 86400.0 / :per_day, 'unixepoch')
    FROM seq WHERE x < :per_day - 1)
INSERT INTO requests (id, started_at, duration_ms, route, stream, tier, paid, status, outcome, attempts,
    ttft_ms, prompt_tokens, completion_tokens, cached_tokens, usage_source, cost_usd, baseline_cost_usd,
    cost_nano_usd, baseline_nano_usd, check_result, endpoint)
SELECT printf('%03d-%05d', d, x), prefix || clock, 50 + (x * 7919) % 2000, 'default', x % 2,
       CASE x % 10 WHEN 0 THEN 'kimi' WHEN 1 THEN 'ollama' ELSE 'llama' END, x % 10 = 0, 200, 'ok',
       1 + (x % 10 = 1), CASE WHEN x % 2 = 1 THEN 20 + (x * 31) % 400 END, 1000, 200, 100, 'upstream',
       CASE WHEN x % 10 = 0 THEN 0.001065 ELSE 0 END, 0.001065,
       CASE WHEN x % 10 = 0 THEN 1065000 ELSE 0 END, 1065000,
       CASE WHEN x % 100 = 0 THEN 'failed' WHEN x % 4 = 0 THEN 'passed' END,
       CASE x % 8 WHEN 1 THEN 'responses' WHEN 2 THEN 'completions' WHEN 4 THEN 'embeddings' ELSE 'chat/completions' END
FROM days CROSS JOIN seq
"""
_ATTEMPTS = """
INSERT INTO attempts (request_id, n, tier, model, started_at, duration_ms, ttft_ms, http_status, outcome,
    prompt_tokens, completion_tokens, cached_tokens, cost_usd, cost_nano_usd, checked)
SELECT id, 1, tier, 'm', started_at, duration_ms, ttft_ms, 200,
    CASE WHEN check_result = 'failed' THEN 'invalid_output' ELSE 'ok' END, prompt_tokens, completion_tokens,
    cached_tokens, cost_usd, cost_nano_usd, check_result IS NOT NULL
FROM requests WHERE started_at >= :lo
"""
_COPY_DAYS = """
WITH RECURSIVE days(prefix) AS (
    SELECT date(:day0, 'unixepoch', '+1 day') UNION ALL
    SELECT date(prefix, '+1 day') FROM days WHERE prefix < date(:day0, 'unixepoch', '+' || :last || ' days'))
"""
_COPY_ROLLUPS = [
    _COPY_DAYS + f"INSERT INTO {table} SELECT prefix, {cols} FROM days CROSS JOIN {table}"
    for table, cols in (
        (
            "daily_usage",
            "tier, route, paid, calls, failures, cancelled, fallbacks, attempts, prompt_tokens, "
            "completion_tokens, cached_tokens, duration_ms, cost_nano_usd, baseline_nano_usd, cost_usd, "
            "baseline_cost_usd, checked, check_failed, escalated_bad_answers",
        ),
        (
            "daily_attempts",
            "tier, attempts, failures, cancelled, prompt_tokens, completion_tokens, cached_tokens, "
            "cost_nano_usd, cost_usd, checked, invalid, invalid_cost_nano_usd, invalid_cost_usd",
        ),
        ("daily_latency", "tier, metric, bucket, count"),
        (
            "daily_endpoints",
            "endpoint, calls, failures, cancelled, prompt_tokens, completion_tokens, cached_tokens, duration_ms, "
            "cost_nano_usd, cost_usd",
        ),
    )
]


async def _million_row_ledger(db: Path, day0: float) -> None:
    """1M requests: every day is the same 10,000 requests, so the rollup of the first day
    (built by rebuild_rollups) is copied to the others instead of re-aggregating 1M rows.
    The attempts table holds the first and the last two days (what the report reads raw)."""
    conn = await open_db(db)
    params = {"day0": day0, "per_day": _PER_DAY, "first": 0, "last": 0}
    await conn.execute(_GENERATE, params)
    await conn.execute(_ATTEMPTS, {"lo": ""})
    await rebuild_rollups(conn)
    await conn.execute("BEGIN")
    for sql in _COPY_ROLLUPS:
        await conn.execute(sql, {"day0": day0, "last": _DAYS - 1})
    await conn.execute(_GENERATE, {**params, "first": 1, "last": _DAYS - 1})
    recent = iso_utc(day0 + (_DAYS - 2) * 86400)
    await conn.execute(_ATTEMPTS, {"lo": recent})
    await conn.execute("COMMIT")
    await conn.close()


async def test_report_over_a_million_rows_is_fast(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    last_day = datetime.fromtimestamp(NOW, UTC).replace(hour=0)
    day0 = (last_day - timedelta(days=_DAYS - 1)).timestamp()
    started = time.perf_counter()
    await _million_row_ledger(db, day0)
    generated = time.perf_counter() - started
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone() == (1_000_000,)

    timings = {}
    reports = {}
    for since in ("24h", "7d", "30d", "all"):
        best = float("inf")
        for _ in range(2):  # the best of two: the first may pay for a cold page cache on a busy machine
            t = time.perf_counter()
            reports[since] = await build_report(db, since, now=NOW)
            best = min(best, time.perf_counter() - t)
        timings[since] = best
    t = time.perf_counter()
    raw = sqlite3.connect(db).execute("SELECT count(*), sum(cost_nano_usd) FROM requests").fetchone()
    raw_time = time.perf_counter() - t
    print(
        f"\n1M-row ledger generated in {generated:.2f}s; report: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
        + f"; a raw SQL sum over all rows takes {raw_time * 1000:.0f} ms"
    )

    everything = reports["all"]
    assert (
        (everything.requests, everything.cost_usd)
        == (raw[0], Decimal(raw[1]) / 10**9)
        == (
            1_000_000,
            Decimal("106.5"),
        )
    )
    assert everything.calls == {"llama": 800_000, "kimi": 100_000, "ollama": 100_000}
    assert everything.savings_usd == Decimal("958.5") and everything.free_call_pct == 90.0
    # 24h at noon: the afternoon of yesterday (raw rows) plus all of today (rollup).
    assert reports["24h"].requests == _PER_DAY + _PER_DAY // 2
    assert reports["30d"].requests == 30 * _PER_DAY + _PER_DAY // 2
    assert {t.tier: t.attempts for t in reports["24h"].tiers} == {"llama": 12_000, "kimi": 1_500, "ollama": 1_500}
    # The quality figures come from the same rollups: every 4th request checked, every 100th
    # (a Kimi one) a bad answer; 24h = today's 10,000 plus yesterday's afternoon (5,000).
    day = reports["24h"]
    assert (day.answers_checked, day.answers_passed, day.answers_passed_pct) == (3_750, 3_600, 96.0)
    kimi = {t.tier: t for t in day.tiers}["kimi"]
    assert (kimi.checked, kimi.bad_answers, kimi.bad_answer_rate) == (750, 150, 0.2)
    assert kimi.bad_answer_cost_usd == day.bad_answer_cost_usd == Decimal("0.15975")
    assert (everything.answers_checked, everything.answers_passed, everything.bad_answers) == (
        250_000,
        240_000,
        10_000,
    )
    # The split by endpoint (every 8th request to responses, completions, embeddings; Kimi's
    # calls, the only paid ones, on chat, completions and embeddings in the ratio 2:1:1).
    assert [(e.endpoint, e.calls, e.cost_usd) for e in everything.endpoints] == [
        ("chat/completions", 625_000, Decimal("53.25")),
        ("completions", 125_000, Decimal("26.625")),
        ("embeddings", 125_000, Decimal("26.625")),
        ("responses", 125_000, Decimal(0)),
    ]
    assert [(e.endpoint, e.calls, e.prompt_tokens, e.cost_usd) for e in day.endpoints] == [
        ("chat/completions", 9_375, 9_375_000, Decimal("0.79875")),
        ("completions", 1_875, 1_875_000, Decimal("0.399375")),
        ("embeddings", 1_875, 1_875_000, Decimal("0.399375")),
        ("responses", 1_875, 1_875_000, Decimal(0)),
    ]
    assert max(timings.values()) < 1.0, timings  # a scan of the raw rows takes several seconds
