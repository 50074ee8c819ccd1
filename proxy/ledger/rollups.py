"""The daily rollup tables, kept current in the same transaction as the raw rows."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from proxy.ledger import by_endpoint
from proxy.ledger.pricing import nano_to_float
from proxy.ledger.rows import AttemptRow, LedgerEntry, RequestRow, latency_bucket
from proxy.records import AttemptOutcome, CheckResult, Escalation, Outcome


@dataclass(slots=True)
class _DayUsage:
    calls: int = 0
    failures: int = 0
    cancelled: int = 0
    fallbacks: int = 0
    attempts: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    duration: float = 0.0
    cost: int = 0
    baseline: int = 0
    checked: int = 0  # answers the client got that the quality gate judged
    check_failed: int = 0  # ... and that failed it (every tier answered badly)
    escalated_bad: int = 0  # escalated because the primary's breaker opened on bad answers


@dataclass(slots=True)
class _DayAttempts:
    attempts: int = 0
    failures: int = 0
    cancelled: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cost: int = 0
    checked: int = 0  # answers the quality gate judged
    invalid: int = 0  # ... that were bad (outcome invalid_output)
    invalid_cost: int = 0  # what those cost, nano-dollars


USAGE_COLUMNS = """day, tier, route, paid, calls, failures, cancelled, fallbacks, attempts,
    prompt_tokens, completion_tokens, cached_tokens, duration_ms, cost_nano_usd, baseline_nano_usd,
    cost_usd, baseline_cost_usd, checked, check_failed, escalated_bad_answers"""
ATTEMPT_COLUMNS = """day, tier, attempts, failures, cancelled, prompt_tokens, completion_tokens,
    cached_tokens, cost_nano_usd, cost_usd, checked, invalid, invalid_cost_nano_usd, invalid_cost_usd"""

_UPSERT_USAGE = f"""
INSERT INTO daily_usage ({USAGE_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, tier, route, paid) DO UPDATE SET
    calls = calls + excluded.calls,
    failures = failures + excluded.failures,
    cancelled = cancelled + excluded.cancelled,
    fallbacks = fallbacks + excluded.fallbacks,
    attempts = attempts + excluded.attempts,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    duration_ms = duration_ms + excluded.duration_ms,
    cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd,
    baseline_nano_usd = baseline_nano_usd + excluded.baseline_nano_usd,
    -- the REAL columns are re-derived from the exact integers, so they never drift
    cost_usd = (cost_nano_usd + excluded.cost_nano_usd) / 1e9,
    baseline_cost_usd = (baseline_nano_usd + excluded.baseline_nano_usd) / 1e9,
    checked = checked + excluded.checked,
    check_failed = check_failed + excluded.check_failed,
    escalated_bad_answers = escalated_bad_answers + excluded.escalated_bad_answers
"""

_UPSERT_ATTEMPTS = f"""
INSERT INTO daily_attempts ({ATTEMPT_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, tier) DO UPDATE SET
    attempts = attempts + excluded.attempts,
    failures = failures + excluded.failures,
    cancelled = cancelled + excluded.cancelled,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd,
    cost_usd = (cost_nano_usd + excluded.cost_nano_usd) / 1e9,
    checked = checked + excluded.checked,
    invalid = invalid + excluded.invalid,
    invalid_cost_nano_usd = invalid_cost_nano_usd + excluded.invalid_cost_nano_usd,
    invalid_cost_usd = (invalid_cost_nano_usd + excluded.invalid_cost_nano_usd) / 1e9
"""

_UPSERT_LATENCY = """
INSERT INTO daily_latency (day, tier, metric, bucket, count) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (day, tier, metric, bucket) DO UPDATE SET count = count + excluded.count
"""

_ATTEMPT_NOT_FAILED = (AttemptOutcome.OK.value, AttemptOutcome.CANCELLED.value)


class Rollup:
    """A batch's contribution to the daily tables, summed in Python so that each batch costs
    one upsert per (day, tier, ...) group instead of one per row."""

    def __init__(self, entries: Iterable[LedgerEntry]) -> None:
        self.usage: dict[tuple[str, str, str, int], _DayUsage] = {}
        self.attempts: dict[tuple[str, str], _DayAttempts] = {}
        self.latency: dict[tuple[str, str, str, int], int] = {}
        self.endpoints = by_endpoint.EndpointRollup()
        for e in entries:
            self._add_request(e.request)
            for a in e.attempts:
                self._add_attempt(a)

    def _add_request(self, r: RequestRow) -> None:
        day, tier = r.started_at[:10], r.tier or ""
        key = (day, tier, r.route, r.paid or 0)
        s = self.usage.get(key)
        if s is None:
            s = self.usage[key] = _DayUsage()
        s.calls += 1
        s.failures += r.outcome == Outcome.ERROR.value
        s.cancelled += r.outcome == Outcome.CLIENT_CANCELLED.value
        s.fallbacks += r.tier is not None and r.attempts > 1
        s.attempts += r.attempts
        s.prompt += r.prompt_tokens or 0
        s.completion += r.completion_tokens or 0
        s.cached += r.cached_tokens or 0
        s.duration += r.duration_ms
        s.cost += r.cost_nano_usd
        s.baseline += r.baseline_nano_usd
        s.checked += r.check_result is not None
        s.check_failed += r.check_result == CheckResult.FAILED.value
        s.escalated_bad += r.escalated_for == Escalation.BAD_ANSWERS.value
        self.endpoints.add(day, r)
        if r.tier is not None:
            self._add_latency(day, tier, "duration", r.duration_ms)
            if r.ttft_ms is not None:
                self._add_latency(day, tier, "ttft", r.ttft_ms)

    def _add_latency(self, day: str, tier: str, metric: str, ms: float) -> None:
        key = (day, tier, metric, latency_bucket(ms))
        self.latency[key] = self.latency.get(key, 0) + 1

    def _add_attempt(self, a: AttemptRow) -> None:
        key = (a.started_at[:10], a.tier)
        s = self.attempts.get(key)
        if s is None:
            s = self.attempts[key] = _DayAttempts()
        s.attempts += 1
        s.failures += a.outcome not in _ATTEMPT_NOT_FAILED
        s.cancelled += a.outcome == AttemptOutcome.CANCELLED.value
        s.prompt += a.prompt_tokens or 0
        s.completion += a.completion_tokens or 0
        s.cached += a.cached_tokens or 0
        s.cost += a.cost_nano_usd
        s.checked += a.checked != 0
        if a.outcome == AttemptOutcome.INVALID_OUTPUT.value:
            s.invalid += 1
            s.invalid_cost += a.cost_nano_usd

    def usage_params(self) -> list[tuple[Any, ...]]:
        return [
            (
                *k,
                s.calls,
                s.failures,
                s.cancelled,
                s.fallbacks,
                s.attempts,
                s.prompt,
                s.completion,
                s.cached,
                s.duration,
                s.cost,
                s.baseline,
                nano_to_float(s.cost),
                nano_to_float(s.baseline),
                s.checked,
                s.check_failed,
                s.escalated_bad,
            )
            for k, s in self.usage.items()
        ]

    def attempt_params(self) -> list[tuple[Any, ...]]:
        return [
            (
                *k,
                s.attempts,
                s.failures,
                s.cancelled,
                s.prompt,
                s.completion,
                s.cached,
                s.cost,
                nano_to_float(s.cost),
                s.checked,
                s.invalid,
                s.invalid_cost,
                nano_to_float(s.invalid_cost),
            )
            for k, s in self.attempts.items()
        ]

    def latency_params(self) -> list[tuple[Any, ...]]:
        return [(*k, n) for k, n in self.latency.items()]


# Column for column what `Rollup` adds up; test_ledger checks that the two agree.
_REBUILD = f"""
DELETE FROM daily_usage;
DELETE FROM daily_attempts;
DELETE FROM daily_latency;
INSERT INTO daily_usage ({USAGE_COLUMNS})
SELECT substr(started_at, 1, 10), coalesce(tier, ''), route, coalesce(paid, 0), count(*),
       sum(outcome = 'error'), sum(outcome = 'client_cancelled'), sum(tier IS NOT NULL AND attempts > 1),
       sum(attempts), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(cached_tokens), 0), total(duration_ms), sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(cost_nano_usd) / 1e9, sum(baseline_nano_usd) / 1e9,
       sum(check_result IS NOT NULL), sum(check_result IS 'failed'), sum(escalated_for IS 'bad_answers')
FROM requests GROUP BY 1, 2, 3, 4;
INSERT INTO daily_attempts ({ATTEMPT_COLUMNS})
SELECT substr(started_at, 1, 10), tier, count(*), sum(outcome NOT IN ('ok', 'cancelled')),
       sum(outcome = 'cancelled'), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(cached_tokens), 0), sum(cost_nano_usd), sum(cost_nano_usd) / 1e9,
       sum(checked != 0), sum(outcome = 'invalid_output'),
       coalesce(sum(CASE WHEN outcome = 'invalid_output' THEN cost_nano_usd END), 0),
       coalesce(sum(CASE WHEN outcome = 'invalid_output' THEN cost_nano_usd END), 0) / 1e9
FROM attempts GROUP BY 1, 2;
INSERT INTO daily_latency
SELECT substr(started_at, 1, 10), tier, 'duration', ledger_bucket(duration_ms), count(*)
FROM requests WHERE tier IS NOT NULL GROUP BY 1, 2, 4;
INSERT INTO daily_latency
SELECT substr(started_at, 1, 10), tier, 'ttft', ledger_bucket(ttft_ms), count(*)
FROM requests WHERE tier IS NOT NULL AND ttft_ms IS NOT NULL GROUP BY 1, 2, 4;
{by_endpoint.REBUILD}"""


async def rebuild_rollups(conn: aiosqlite.Connection) -> None:
    """Recompute the daily tables from the raw rows, in one transaction.

    For rows inserted by hand or by bulk tools that bypass the Ledger, and for a future
    migration that adds a rollup column.
    """
    await conn.create_function("ledger_bucket", 1, latency_bucket, deterministic=True)
    await conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in (s for s in _REBUILD.split(";") if s.strip()):
            await conn.execute(stmt)
        await conn.execute("COMMIT")
    except sqlite3.Error:
        await rollback(conn)
        raise


async def rollback(conn: aiosqlite.Connection) -> None:
    # After some errors (SQLITE_FULL, IOERR) SQLite has already rolled back.
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")


def insert_rollups(conn: sqlite3.Connection, entries: Sequence[LedgerEntry]) -> None:
    """Add `entries` to the daily rollups, inside the caller's transaction (blocking)."""
    rollup = Rollup(entries)
    conn.executemany(_UPSERT_USAGE, rollup.usage_params())
    if rollup.attempts:
        conn.executemany(_UPSERT_ATTEMPTS, rollup.attempt_params())
    if rollup.latency:
        conn.executemany(_UPSERT_LATENCY, rollup.latency_params())
    conn.executemany(by_endpoint.UPSERT, rollup.endpoints.params())
