"""`proxy report`: calls, cost and savings per tier over a window, from the ledger file.

Counts and sums come from the daily rollup tables (a handful of rows per day however busy
the proxy is); only the part of the window that starts mid-day is read from raw rows, via
the started_at index. Latency percentiles come from per-day histograms (5% buckets).
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from proxy.ledger_db import open_db
from proxy.ledger_rows import bucket_ms, iso_utc, latency_bucket
from proxy.migrations import pending
from proxy.pricing import from_nano, round_micro
from proxy.spill import has_spill, import_spill, spill_path

ALLOWED_SINCE = "24h, 7d, 30d, all, or a whole number of hours or days such as 12h or 90d"
_SINCE_RE = re.compile(r"^\s*(\d{1,6})\s*([hd])\s*$", re.IGNORECASE)
_NO_TIER = ""


_MAX_SINCE_HOURS = 36500 * 24


def parse_since(since: str, now: float) -> float | None:
    """The window start as unix seconds, None for `all`; ValueError names the allowed values."""
    if since.strip().lower() == "all":
        return None
    m = _SINCE_RE.match(since)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"invalid --since {since!r}: expected {ALLOWED_SINCE}")
    hours = int(m.group(1)) * (24 if m.group(2).lower() == "d" else 1)
    if hours > _MAX_SINCE_HOURS:
        raise ValueError(f"invalid --since {since!r}: at most 100 years (36500d); use 'all' for everything")
    return now - hours * 3600.0


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class TierReport:
    tier: str
    paid: bool
    calls: int  # requests this tier answered
    fallbacks: int  # ... of which needed more than one attempt
    fallback_rate: float | None  # fallbacks / calls
    attempts: int  # upstream attempts sent to this tier
    failures: int  # attempts that failed (timeout, connect, http, bad response)
    cancelled: int  # attempts abandoned because the client went away
    failure_rate: float | None  # failures / attempts
    latency_p50_ms: float | None  # request duration, requests this tier answered
    latency_p95_ms: float | None
    ttft_p50_ms: float | None  # time to first token, streamed requests it answered
    ttft_p95_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal  # cost of the requests it answered
    baseline_cost_usd: Decimal  # what the baseline paid tier would have charged for them


@dataclass(frozen=True, slots=True)
class Report:
    since: str
    window_start: str | None  # ISO-8601 UTC; None for `all`
    generated_at: str
    requests: int
    answered: int
    errors: int  # outcome = error
    client_cancelled: int
    calls: dict[str, int]  # answering tier -> requests
    cost_usd: Decimal  # everything spent (free tiers cost 0)
    savings_usd: Decimal  # sum(baseline - cost) over requests answered by free tiers
    free_calls: int
    free_call_pct: float | None  # share of answered requests a free tier answered
    tiers: tuple[TierReport, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "window_start": self.window_start,
            "generated_at": self.generated_at,
            "requests": self.requests,
            "answered": self.answered,
            "errors": self.errors,
            "client_cancelled": self.client_cancelled,
            "calls": dict(self.calls),
            "cost_usd": _money(self.cost_usd),
            "savings_usd": _money(self.savings_usd),
            "free_calls": self.free_calls,
            "free_call_pct": self.free_call_pct,
            "exact": {"cost_usd": str(self.cost_usd), "savings_usd": str(self.savings_usd)},
            "tiers": [_tier_json(t) for t in self.tiers],
        }


def _money(usd: Decimal) -> float:
    return float(round_micro(usd))


def _tier_json(t: TierReport) -> dict[str, Any]:
    return {
        "tier": t.tier,
        "paid": t.paid,
        "calls": t.calls,
        "fallbacks": t.fallbacks,
        "fallback_rate": t.fallback_rate,
        "attempts": t.attempts,
        "failures": t.failures,
        "cancelled": t.cancelled,
        "failure_rate": t.failure_rate,
        "latency_p50_ms": t.latency_p50_ms,
        "latency_p95_ms": t.latency_p95_ms,
        "ttft_p50_ms": t.ttft_p50_ms,
        "ttft_p95_ms": t.ttft_p95_ms,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cached_tokens": t.cached_tokens,
        "cost_usd": _money(t.cost_usd),
        "baseline_cost_usd": _money(t.baseline_cost_usd),
        "exact": {"cost_usd": str(t.cost_usd), "baseline_cost_usd": str(t.baseline_cost_usd)},
    }


# ---------------------------------------------------------------------------- reading the file


@dataclass(frozen=True, slots=True)
class _Window:
    """The report window split into whole days (rollup) and a leading partial day (raw rows)."""

    first_full_day: str | None  # None: every day in the rollup
    raw_from: str | None  # ISO bounds of the partial day; None when the window starts at midnight
    raw_to: str | None

    @classmethod
    def of(cls, cutoff: float | None) -> _Window:
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

    def add(self, row: Sequence[Any]) -> None:
        self.calls += int(row[0])
        self.errors += int(row[1])
        self.cancelled += int(row[2])
        self.fallbacks += int(row[3])
        self.prompt += int(row[4])
        self.completion += int(row[5])
        self.cached += int(row[6])
        self.cost += int(row[7])
        self.baseline += int(row[8])


@dataclass(slots=True)
class _AttemptSums:
    attempts: int = 0
    failures: int = 0
    cancelled: int = 0


_ROLLUP_REQUESTS = """
SELECT tier, paid, sum(calls), sum(failures), sum(cancelled), sum(fallbacks), sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), sum(cost_nano_usd), sum(baseline_nano_usd)
FROM daily_usage WHERE day >= :day GROUP BY tier, paid
"""
_RAW_REQUESTS = """
SELECT coalesce(tier, ''), coalesce(paid, 0), count(*), sum(outcome = 'error'),
       sum(outcome = 'client_cancelled'), sum(tier IS NOT NULL AND attempts > 1),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       sum(cost_nano_usd), sum(baseline_nano_usd)
FROM requests WHERE started_at >= :lo AND started_at < :hi GROUP BY 1, 2
"""
_ROLLUP_ATTEMPTS = """
SELECT tier, sum(attempts), sum(failures), sum(cancelled) FROM daily_attempts WHERE day >= :day GROUP BY tier
"""
_RAW_ATTEMPTS = """
SELECT tier, count(*), sum(outcome NOT IN ('ok', 'cancelled')), sum(outcome = 'cancelled')
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

    def __init__(self, conn: aiosqlite.Connection, window: _Window) -> None:
        self.conn = conn
        self.window = window

    async def rows(self, rollup_sql: str, raw_sql: str) -> list[sqlite3.Row]:
        w = self.window
        out = list(await self.conn.execute_fetchall(rollup_sql, {"day": w.first_full_day or ""}))
        if w.raw_from is not None:
            out += await self.conn.execute_fetchall(raw_sql, {"lo": w.raw_from, "hi": w.raw_to})
        return out

    async def requests(self) -> dict[tuple[str, bool], _Sums]:
        sums: dict[tuple[str, bool], _Sums] = {}
        for r in await self.rows(_ROLLUP_REQUESTS, _RAW_REQUESTS):
            sums.setdefault((str(r[0]), bool(r[1])), _Sums()).add(r[2:])
        return sums

    async def attempts(self) -> dict[str, _AttemptSums]:
        sums: dict[str, _AttemptSums] = {}
        for r in await self.rows(_ROLLUP_ATTEMPTS, _RAW_ATTEMPTS):
            s = sums.setdefault(str(r[0]), _AttemptSums())
            s.attempts += int(r[1])
            s.failures += int(r[2])
            s.cancelled += int(r[3])
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
    path = Path(db_path)
    if not path.exists():
        raise FileNotFoundError(f"no ledger database at {path}")
    conn = await _open_for_report(path)
    try:
        reader = _Reader(conn, _Window.of(cutoff))
        requests = await reader.requests()
        attempts = await reader.attempts()
        hist = await reader.histograms()
    finally:
        await conn.close()
    window_start = None if cutoff is None else iso_utc(cutoff)
    return _assemble(since, window_start, iso_utc(now), requests, attempts, hist)


def _assemble(
    since: str,
    window_start: str | None,
    generated_at: str,
    requests: dict[tuple[str, bool], _Sums],
    attempts: dict[str, _AttemptSums],
    hist: dict[tuple[str, str], dict[int, int]],
) -> Report:
    total = _Sums()
    answered = free = savings = 0
    for (tier, paid), s in requests.items():
        _merge(total, s)
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
        free_call_pct=round(100.0 * free / answered, 2) if answered else None,
        tiers=tiers,
    )


def _merge(into: _Sums, s: _Sums) -> None:
    into.add((s.calls, s.errors, s.cancelled, s.fallbacks, s.prompt, s.completion, s.cached, s.cost, s.baseline))


def _tier_reports(
    requests: dict[tuple[str, bool], _Sums],
    attempts: dict[str, _AttemptSums],
    hist: dict[tuple[str, str], dict[int, int]],
) -> tuple[TierReport, ...]:
    by_tier: dict[str, _Sums] = {}
    paid: dict[str, bool] = {}
    for (tier, is_paid), s in requests.items():
        if tier != _NO_TIER:
            _merge(by_tier.setdefault(tier, _Sums()), s)
            paid[tier] = paid.get(tier, False) or is_paid
    names = sorted(set(by_tier) | set(attempts), key=lambda t: (-by_tier.get(t, _Sums()).calls, t))
    return tuple(
        _tier_report(t, paid.get(t, False), by_tier.get(t, _Sums()), attempts.get(t, _AttemptSums()), hist)
        for t in names
    )


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _tier_report(
    tier: str, paid: bool, s: _Sums, a: _AttemptSums, hist: dict[tuple[str, str], dict[int, int]]
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
    )


# ---------------------------------------------------------------------------- text


def _usd(d: Decimal) -> str:
    return f"${round_micro(d):f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


_COLUMNS = (
    "tier",
    "paid",
    "calls",
    "fallback",
    "attempts",
    "failed",
    "p50 ms",
    "p95 ms",
    "ttft p50",
    "ttft p95",
    "prompt tok",
    "compl tok",
    "cost",
)


def _table(rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [_COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def render_table(report: Report) -> str:
    window = "all time" if report.window_start is None else f"since {report.window_start}"
    free = "-" if report.free_call_pct is None else f"{report.free_call_pct:.1f}%"
    lines = [
        f"Cost report, {report.since} ({window})",
        f"Requests: {report.requests}  answered: {report.answered}  errors: {report.errors}  "
        f"client cancelled: {report.client_cancelled}",
        f"Paid cost: {_usd(report.cost_usd)}  Estimated savings: {_usd(report.savings_usd)}  Free calls: {free}",
        "",
    ]
    if not report.tiers:
        return "\n".join([*lines, "No requests in this window."])
    rows = [
        (
            t.tier,
            "yes" if t.paid else "no",
            str(t.calls),
            _pct(t.fallback_rate),
            str(t.attempts),
            str(t.failures),
            _ms(t.latency_p50_ms),
            _ms(t.latency_p95_ms),
            _ms(t.ttft_p50_ms),
            _ms(t.ttft_p95_ms),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            _usd(t.cost_usd),
        )
        for t in report.tiers
    ]
    return "\n".join([*lines, *_table(rows)])


# ---------------------------------------------------------------------------- CLI entry points


async def report_text(db: str | Path, since: str, as_json: bool, *, now: float | None = None) -> tuple[int, str]:
    """`report_main` for callers already inside an event loop."""
    try:
        parse_since(since, time.time())
    except ValueError as e:
        return 2, str(e)
    try:
        report = await build_report(db, since, now=now)
    except FileNotFoundError as e:
        return 1, str(e)
    except (sqlite3.Error, OSError) as e:
        return 1, f"cannot read ledger {db}: {e}"
    if as_json:
        return 0, orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode()
    return 0, render_table(report)


def report_main(db: str, since: str, as_json: bool) -> tuple[int, str]:
    """`proxy report`: (exit code, text). 2 for a bad --since, 1 when the file cannot be read."""
    return asyncio.run(report_text(db, since, as_json))


async def _import(db: Path) -> str:
    conn = await open_db(db)
    try:
        result = await import_spill(conn, db)
    finally:
        await conn.close()
    text = f"imported {result.imported} request(s) from {len(result.files)} spill file(s) into {db}"
    if result.skipped:
        text += f"; {result.skipped} were already there"
    if result.rejected:
        text += f"; {result.rejected} unreadable line(s) kept in {db}.spill.rejected.jsonl"
    return text


async def import_ledger(db: str | Path) -> tuple[int, str]:
    """`import_main` for callers already inside an event loop."""
    path = Path(db)
    if not has_spill(path):
        return 0, f"nothing to import: no spill file {spill_path(path)}"
    try:
        return 0, await _import(path)
    except (sqlite3.Error, OSError) as e:
        return 1, f"cannot import into {db}: {e}"


def import_main(db: str) -> tuple[int, str]:
    """`proxy ledger import`: load `<db>.spill.jsonl` back into the database (idempotent)."""
    return asyncio.run(import_ledger(db))
