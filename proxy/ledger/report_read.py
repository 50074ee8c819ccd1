"""Reading the cost report from a ledger file.

Counts and sums come from the daily rollup tables (a handful of rows per day however busy
the proxy is); only the part of the window that starts mid-day is read from raw rows, via
the started_at index. Latency percentiles come from per-day histograms (5% buckets).
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.ledger.by_endpoint import read_endpoints
from proxy.ledger.migrations import pending
from proxy.ledger.postgres import is_postgres_url, redact
from proxy.ledger.pricing import from_nano
from proxy.ledger.report import EndpointReport, Report, TierReport, parse_since
from proxy.ledger.rows import bucket_ms, iso_utc, latency_bucket
from proxy.ledger.sqlite import open_db

_NO_TIER = ""


@dataclass(frozen=True, slots=True)
class _ReportWindow:
    """The report window split into whole days (rollup) and a leading partial day (raw rows)."""

    first_full_day: str | None  # None: every day in the rollup
    raw_from: str | None  # ISO bounds of the partial day; None when the window starts at midnight
    raw_to: str | None

    @classmethod
    def of(cls, cutoff: float | None) -> _ReportWindow:
        if cutoff is None:
            return cls(None, None, None)
        start = datetime.fromtimestamp(cutoff, UTC)
        midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
        if start == midnight:
            return cls(midnight.date().isoformat(), None, None)
        next_day = midnight + timedelta(days=1)
        return cls(next_day.date().isoformat(), iso_utc(cutoff), iso_utc(next_day.timestamp()))


@dataclass(slots=True)
class _Sums:
    """Integer sums, added up column by column from a query row in field order."""

    def add(self, row: Sequence[Any]) -> None:
        for f, v in zip(fields(self), row, strict=True):
            setattr(self, f.name, getattr(self, f.name) + int(v or 0))

    def merge(self, other: _Sums) -> None:
        self.add([getattr(other, f.name) for f in fields(other)])


@dataclass(slots=True)
class _RequestTotals(_Sums):
    """Sums for one (tier, paid) group of requests."""

    calls: int = 0
    errors: int = 0
    cancelled: int = 0
    fallbacks: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cost: int = 0  # nano-dollars
    baseline: int = 0
    checked: int = 0  # answers the quality gate judged
    check_failed: int = 0
    escalated: int = 0  # route = escalated
    escalated_bad: int = 0  # ... for bad answers


@dataclass(slots=True)
class _AttemptTotals(_Sums):
    attempts: int = 0
    failures: int = 0
    cancelled: int = 0
    checked: int = 0
    invalid: int = 0
    invalid_cost: int = 0  # nano-dollars


_ROLLUP_REQUESTS = """
SELECT tier, paid, sum(calls), sum(failures), sum(cancelled), sum(fallbacks), sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(checked), sum(check_failed), sum(CASE WHEN route = 'escalated' THEN calls ELSE 0 END),
       sum(escalated_bad_answers)
FROM daily_usage WHERE day >= :day GROUP BY tier, paid
"""
_RAW_REQUESTS = """
SELECT coalesce(tier, ''), coalesce(paid, 0), count(*), sum(outcome = 'error'),
       sum(outcome = 'client_cancelled'), sum(tier IS NOT NULL AND attempts > 1),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(check_result IS NOT NULL), sum(check_result IS 'failed'), sum(route = 'escalated'),
       sum(escalated_for IS 'bad_answers')
FROM requests WHERE started_at >= :lo AND started_at < :hi GROUP BY 1, 2
"""
_ROLLUP_ATTEMPTS = """
SELECT tier, sum(attempts), sum(failures), sum(cancelled), sum(checked), sum(invalid), sum(invalid_cost_nano_usd)
FROM daily_attempts WHERE day >= :day GROUP BY tier
"""
_RAW_ATTEMPTS = """
SELECT tier, count(*), sum(outcome NOT IN ('ok', 'cancelled')), sum(outcome = 'cancelled'), sum(checked != 0),
       sum(outcome = 'invalid_output'), coalesce(sum(CASE WHEN outcome = 'invalid_output' THEN cost_nano_usd END), 0)
FROM attempts WHERE started_at >= :lo AND started_at < :hi GROUP BY tier
"""
_ROLLUP_LATENCY = """
SELECT tier, metric, bucket, sum(count) FROM daily_latency WHERE day >= :day GROUP BY tier, metric, bucket
"""
_RAW_LATENCY = """
SELECT tier, duration_ms, ttft_ms FROM requests
WHERE started_at >= :lo AND started_at < :hi AND tier IS NOT NULL
"""


class _Reader:
    """Runs each query over the rollup days plus, when the window starts mid-day, raw rows."""

    def __init__(self, conn: aiosqlite.Connection, window: _ReportWindow) -> None:
        self.conn = conn
        self.window = window

    async def rows(self, rollup_sql: str, raw_sql: str) -> list[sqlite3.Row]:
        w = self.window
        out = list(await self.conn.execute_fetchall(rollup_sql, {"day": w.first_full_day or ""}))
        if w.raw_from is not None:
            out += await self.conn.execute_fetchall(raw_sql, {"lo": w.raw_from, "hi": w.raw_to})
        return out

    async def requests(self) -> dict[tuple[str, bool], _RequestTotals]:
        sums: dict[tuple[str, bool], _RequestTotals] = {}
        for r in await self.rows(_ROLLUP_REQUESTS, _RAW_REQUESTS):
            sums.setdefault((str(r[0]), bool(r[1])), _RequestTotals()).add(r[2:])
        return sums

    async def attempts(self) -> dict[str, _AttemptTotals]:
        sums: dict[str, _AttemptTotals] = {}
        for r in await self.rows(_ROLLUP_ATTEMPTS, _RAW_ATTEMPTS):
            sums.setdefault(str(r[0]), _AttemptTotals()).add(r[1:])
        return sums

    async def histograms(self) -> dict[tuple[str, str], dict[int, int]]:
        hist: dict[tuple[str, str], dict[int, int]] = {}
        w = self.window
        for tier, metric, bucket, n in await self.conn.execute_fetchall(
            _ROLLUP_LATENCY, {"day": w.first_full_day or ""}
        ):
            h = hist.setdefault((str(tier), str(metric)), {})
            h[int(bucket)] = h.get(int(bucket), 0) + int(n)
        if w.raw_from is not None:
            # At most one partial day of rows, read through the started_at index.
            raw = await self.conn.execute_fetchall(_RAW_LATENCY, {"lo": w.raw_from, "hi": w.raw_to})
            for tier, duration, ttft in raw:
                _count(hist, str(tier), "duration", float(duration))
                if ttft is not None:
                    _count(hist, str(tier), "ttft", float(ttft))
        return hist


def _count(hist: dict[tuple[str, str], dict[int, int]], tier: str, metric: str, ms: float) -> None:
    h = hist.setdefault((tier, metric), {})
    b = latency_bucket(ms)
    h[b] = h.get(b, 0) + 1


def percentile(hist: dict[int, int] | None, p: float) -> float | None:
    """Nearest-rank percentile from a bucket histogram, to 0.1 ms."""
    if not hist:
        return None
    total = sum(hist.values())
    rank = max(1, math.ceil(p * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(bucket_ms(bucket), 1)
    return None  # unreachable: the last bucket always reaches the rank


async def _open_for_report(db_path: Path) -> aiosqlite.Connection:
    """Read-only when the schema is current, so a report never writes to a live ledger;
    an old file is upgraded in place first."""
    conn = await aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        todo = await pending(conn)
    except sqlite3.Error:
        await conn.close()
        raise
    if not todo:
        return conn
    await conn.close()
    await (await open_db(db_path)).close()
    return await aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)


async def build_report(db_path: str | Path, since: str, *, now: float | None = None) -> Report:
    """The cost report for the window `since` (24h, 7d, 30d, all, Nh, Nd) ending at `now`."""
    now = time.time() if now is None else now
    cutoff = parse_since(since, now)
    if is_postgres_url(db_path):
        # Not yet: the report's queries are SQLite's. An OSError, so callers say "cannot be read".
        raise OSError(f"reports are not read from PostgreSQL yet ({redact(str(db_path))}): see docs/ledger.md")
    path = Path(db_path)
    if not path.exists():
        raise FileNotFoundError(f"no ledger database at {path}")
    conn = await _open_for_report(path)
    try:
        reader = _Reader(conn, _ReportWindow.of(cutoff))
        requests = await reader.requests()
        attempts = await reader.attempts()
        hist = await reader.histograms()
        endpoints = await read_endpoints(reader.rows)
    finally:
        await conn.close()
    window_start = None if cutoff is None else iso_utc(cutoff)
    return _assemble(since, window_start, iso_utc(now), requests, attempts, hist, endpoints)


def _assemble(
    since: str,
    window_start: str | None,
    generated_at: str,
    requests: dict[tuple[str, bool], _RequestTotals],
    attempts: dict[str, _AttemptTotals],
    hist: dict[tuple[str, str], dict[int, int]],
    endpoints: tuple[EndpointReport, ...],
) -> Report:
    total = _RequestTotals()
    answered = free = savings = 0
    for (tier, paid), s in requests.items():
        total.merge(s)
        if tier != _NO_TIER:
            answered += s.calls
            if not paid:
                free += s.calls
                savings += s.baseline - s.cost
    tiers = _tier_reports(requests, attempts, hist)
    return Report(
        since=since,
        window_start=window_start,
        generated_at=generated_at,
        requests=total.calls,
        answered=answered,
        errors=total.errors,
        client_cancelled=total.cancelled,
        calls={t.tier: t.calls for t in tiers if t.calls},
        cost_usd=from_nano(total.cost),
        savings_usd=from_nano(savings),
        free_calls=free,
        free_call_pct=_pct(free, answered),
        answers_checked=total.checked,
        answers_passed=total.checked - total.check_failed,
        answers_passed_pct=_pct(total.checked - total.check_failed, total.checked),
        bad_answers=sum(a.invalid for a in attempts.values()),
        bad_answer_cost_usd=from_nano(sum(a.invalid_cost for a in attempts.values())),
        escalated=total.escalated,
        escalated_bad_answers=total.escalated_bad,
        tiers=tiers,
        endpoints=endpoints,
    )


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def _tier_reports(
    requests: dict[tuple[str, bool], _RequestTotals],
    attempts: dict[str, _AttemptTotals],
    hist: dict[tuple[str, str], dict[int, int]],
) -> tuple[TierReport, ...]:
    by_tier: dict[str, _RequestTotals] = {}
    paid: dict[str, bool] = {}
    for (tier, is_paid), s in requests.items():
        if tier != _NO_TIER:
            by_tier.setdefault(tier, _RequestTotals()).merge(s)
            paid[tier] = paid.get(tier, False) or is_paid
    names = sorted(set(by_tier) | set(attempts), key=lambda t: (-by_tier.get(t, _RequestTotals()).calls, t))
    return tuple(
        _tier_report(t, paid.get(t, False), by_tier.get(t, _RequestTotals()), attempts.get(t, _AttemptTotals()), hist)
        for t in names
    )


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _tier_report(
    tier: str, paid: bool, s: _RequestTotals, a: _AttemptTotals, hist: dict[tuple[str, str], dict[int, int]]
) -> TierReport:
    duration, ttft = hist.get((tier, "duration")), hist.get((tier, "ttft"))
    return TierReport(
        tier=tier,
        paid=paid,
        calls=s.calls,
        fallbacks=s.fallbacks,
        fallback_rate=_ratio(s.fallbacks, s.calls),
        attempts=a.attempts,
        failures=a.failures,
        cancelled=a.cancelled,
        failure_rate=_ratio(a.failures, a.attempts),
        latency_p50_ms=percentile(duration, 0.50),
        latency_p95_ms=percentile(duration, 0.95),
        ttft_p50_ms=percentile(ttft, 0.50),
        ttft_p95_ms=percentile(ttft, 0.95),
        prompt_tokens=s.prompt,
        completion_tokens=s.completion,
        cached_tokens=s.cached,
        cost_usd=from_nano(s.cost),
        baseline_cost_usd=from_nano(s.baseline),
        checked=a.checked,
        bad_answers=a.invalid,
        bad_answer_rate=_ratio(a.invalid, a.checked),
        bad_answer_cost_usd=from_nano(a.invalid_cost),
        escalated=s.escalated,
        escalated_bad_answers=s.escalated_bad,
    )
