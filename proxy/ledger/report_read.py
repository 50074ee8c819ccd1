"""Reading the cost report from a ledger, SQLite or PostgreSQL alike.

Counts and sums come from the daily rollup tables (a handful of rows per day however busy
the proxy is); only the part of the window that starts mid-day is read from raw rows, via
the started_at index. Latency percentiles come from per-day histograms (5% buckets).
The SQL is `report_sql.py` (one text for both engines), run by the engine's `report_source.py`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.ledger import report_sql
from proxy.ledger.by_endpoint import endpoint_reports
from proxy.ledger.pricing import from_nano
from proxy.ledger.report import EndpointReport, Report, TierReport, parse_since
from proxy.ledger.report_source import Rows, Target, source_for
from proxy.ledger.report_sql import Query
from proxy.ledger.rows import bucket_ms, iso_utc, latency_bucket

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


class _Reader:
    """Each figure over the rollup days plus, when the window starts mid-day, the raw rows of
    that partial day: all queries at once, through the engine's source, in one snapshot."""

    def __init__(self, window: _ReportWindow) -> None:
        self.window = window
        self.queries: list[Query] = []
        self._slots: dict[tuple[int, str], int] = {}  # (pair index, "rollup"/"raw") -> query index
        for i, pair in enumerate(report_sql.PAIRS):
            self._add(i, "rollup", pair.rollup, (window.first_full_day or "",))
            if window.raw_from is not None:
                self._add(i, "raw", pair.raw, (window.raw_from, window.raw_to))

    def _add(self, i: int, part: str, sql: str, args: tuple[object, ...]) -> None:
        self._slots[(i, part)] = len(self.queries)
        self.queries.append(Query(sql, args))

    def split(self, results: Sequence[Rows], pair: report_sql.Pair) -> tuple[Rows, Rows]:
        """The rollup rows and the raw rows of one figure."""
        i = report_sql.PAIRS.index(pair)
        raw = self._slots.get((i, "raw"))
        return results[self._slots[(i, "rollup")]], ([] if raw is None else results[raw])


def _requests(rollup: Rows, raw: Rows) -> dict[tuple[str, bool], _RequestTotals]:
    sums: dict[tuple[str, bool], _RequestTotals] = {}
    for r in (*rollup, *raw):
        sums.setdefault((str(r[0]), bool(r[1])), _RequestTotals()).add(r[2:])
    return sums


def _attempts(rollup: Rows, raw: Rows) -> dict[str, _AttemptTotals]:
    sums: dict[str, _AttemptTotals] = {}
    for r in (*rollup, *raw):
        sums.setdefault(str(r[0]), _AttemptTotals()).add(r[1:])
    return sums


def _histograms(rollup: Rows, raw: Rows) -> dict[tuple[str, str], dict[int, int]]:
    hist: dict[tuple[str, str], dict[int, int]] = {}
    for tier, metric, bucket, n in rollup:
        h = hist.setdefault((str(tier), str(metric)), {})
        h[int(bucket)] = h.get(int(bucket), 0) + int(n)
    for tier, duration, ttft in raw:  # at most one partial day of rows, read through the started_at index
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


async def build_report(target: Target, since: str, *, now: float | None = None) -> Report:
    """The cost report for the window `since` (24h, 7d, 30d, all, Nh, Nd) ending at `now`.

    `target`: a ledger file, a postgresql:// URL, or the store a running proxy writes to.
    Raises ValueError for a bad `since`, OSError (FileNotFoundError) when the ledger cannot be read.
    """
    now = time.time() if now is None else now
    cutoff = parse_since(since, now)
    reader = _Reader(_ReportWindow.of(cutoff))
    results = await source_for(target).run(reader.queries)
    requests = _requests(*reader.split(results, report_sql.REQUESTS))
    attempts = _attempts(*reader.split(results, report_sql.ATTEMPTS))
    hist = _histograms(*reader.split(results, report_sql.LATENCY))
    endpoints = endpoint_reports(itertools.chain(*reader.split(results, report_sql.ENDPOINTS)))
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
