"""The cost ledger: every client request and upstream attempt, written to SQLite in batches.

`Ledger.submit` is called on the request path and only appends to an in-memory queue; one
background task writes whatever has queued in a single transaction per batch, and keeps the
daily rollup tables current in that same transaction. When SQLite keeps failing, rows go to a
JSON-lines spill file next to the database and are imported back on the next start.
Schema and queries: docs/ledger.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiosqlite
import orjson

from proxy.budget import SpendSource
from proxy.config import Config, Price
from proxy.migrations import migrate
from proxy.pricing import (
    FREE,
    ZERO,
    attempt_cost_usd,
    baseline_cost_usd,
    baseline_price,
    cost_usd,
    from_nano,
    nano_to_float,
    to_nano,
)
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Outcome, Usage, UsageSource

log = logging.getLogger("proxy.ledger")

SPILL_SUFFIX = ".spill.jsonl"
SPILL_VERSION = 1
DEFAULT_RETRY_DELAYS = (0.05, 0.25)
# When neither the database nor the spill file can be written, rows wait in memory (up to this
# many) and are retried every HOLD_RETRY_SECONDS: a full or read-only disk usually comes back.
MAX_HELD_ROWS = 100_000
LINGER_SECONDS = 0.05  # how long the writer waits for a batch to fill
HOLD_RETRY_SECONDS = 1.0
_LATENCY_GROWTH = 1.05
_LOG_GROWTH = math.log(_LATENCY_GROWTH)
_MAX_MS = 1e9  # keeps log() finite for absurd or infinite durations
_IN_CHUNK = 500  # ids per `IN (...)` lookup, far below SQLite's variable limit


# ---------------------------------------------------------------------------- rows


class RequestRow(NamedTuple):
    """One row of `requests`, in column order (a tuple, so executemany takes it as is)."""

    id: str
    started_at: str
    duration_ms: float
    route: str
    stream: int
    requested_model: str | None
    tier: str | None
    paid: int | None
    model: str | None
    status: int
    outcome: str
    attempts: int
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    usage_source: str
    cost_usd: float
    baseline_cost_usd: float
    cost_nano_usd: int
    baseline_nano_usd: int
    client: str | None
    error: str | None
    request_text: str | None
    response_text: str | None


class AttemptRow(NamedTuple):
    request_id: str
    n: int
    tier: str
    model: str
    started_at: str
    duration_ms: float
    ttft_ms: float | None
    http_status: int | None
    outcome: str
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    cost_usd: float
    cost_nano_usd: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One client request ready to write: its `requests` row and its `attempts` rows."""

    request: RequestRow
    attempts: tuple[AttemptRow, ...]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": SPILL_VERSION,
                "request": self.request._asdict(),
                "attempts": [a._asdict() for a in self.attempts],
            }
        )

    @classmethod
    def from_json(cls, line: bytes) -> Entry:
        """Raises ValueError for anything that is not a spill line this version wrote."""
        try:
            obj = orjson.loads(line)
            if obj.get("v") != SPILL_VERSION:
                raise ValueError(f"unknown spill line version {obj.get('v')!r}")
            return cls(RequestRow(**obj["request"]), tuple(AttemptRow(**a) for a in obj["attempts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a ledger spill line: {e}") from e


def _placeholders(fields: Sequence[str]) -> str:
    return ", ".join("?" for _ in fields)


INSERT_REQUEST = f"INSERT INTO requests ({', '.join(RequestRow._fields)}) VALUES ({_placeholders(RequestRow._fields)})"
INSERT_ATTEMPT = f"INSERT INTO attempts ({', '.join(AttemptRow._fields)}) VALUES ({_placeholders(AttemptRow._fields)})"


def iso_utc(ts: float) -> str:
    """Unix seconds -> 2026-11-26T15:04:05.123Z (fixed width, so text order is time order)."""
    sec, milli = divmod(math.floor(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{milli:03d}Z"


def latency_bucket(ms: float) -> int:
    """Histogram bucket for a latency: 0 holds <= 1 ms, then buckets 5% wide."""
    if not ms > 1.0:  # also catches NaN
        return 0
    return 1 + int(math.log(min(ms, _MAX_MS)) / _LOG_GROWTH)


def bucket_ms(bucket: int) -> float:
    """A representative latency for a bucket: its geometric middle (within 2.5% of any member)."""
    if bucket <= 0:
        return 0.5
    return float(_LATENCY_GROWTH ** (bucket - 0.5))


def _usage_columns(usage: Usage | None) -> tuple[int | None, int | None, int | None, str]:
    if usage is None:
        return None, None, None, UsageSource.NONE.value
    if usage.source == UsageSource.NONE:
        return None, None, None, str(usage.source)
    return usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, str(usage.source)


def _text(body: bytes | None) -> str | None:
    return None if body is None else body.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- pricing a record


class Pricer:
    """Turns a CallRecord into rows with exact costs, using the config's tier prices."""

    def __init__(self, config: Config) -> None:
        self._prices = {t.id: t.price for t in config.tiers}
        self._paid = {t.id: t.paid for t in config.tiers}
        self._baseline = baseline_price(config)
        self._store_text = config.ledger.store_text
        self._unknown: set[str] = set()

    def price(self, tier: str) -> Price:
        price = self._prices.get(tier)
        if price is None:
            # A record can name a tier that a config reload removed; it is not worth a crash.
            if tier not in self._unknown:
                self._unknown.add(tier)
                log.warning("ledger: tier %r is not in the config; its calls are recorded at cost 0", tier)
            return FREE
        return price

    def entry(self, rec: CallRecord) -> Entry:
        attempts = _unique_attempts(rec)
        attempt_nanos = [to_nano(attempt_cost_usd(a, self.price(a.tier))) for a in attempts]
        cost, baseline = self._request_costs(rec, attempts, attempt_nanos)
        return Entry(
            self._request_row(rec, len(attempts), cost, baseline),
            tuple(_attempt_row(rec.request_id, a, n) for a, n in zip(attempts, attempt_nanos, strict=True)),
        )

    def _request_costs(
        self, rec: CallRecord, attempts: Sequence[AttemptRecord], attempt_nanos: Sequence[int]
    ) -> tuple[int, int]:
        """(cost, baseline) in nano-dollars.

        The answer (the last attempt, on the answering tier: also a stream cut or abandoned
        midway) is priced from the record's own usage; earlier attempts add whatever they were
        billed, so the request row carries everything this request cost, each attempt once.
        """
        if rec.tier is None:
            return sum(attempt_nanos), 0
        answered_last = bool(attempts) and attempts[-1].tier == rec.tier
        earlier = attempt_nanos[:-1] if answered_last else attempt_nanos
        answer = to_nano(cost_usd(rec.usage, self.price(rec.tier)))
        return answer + sum(earlier), to_nano(baseline_cost_usd(rec.usage, self._baseline))

    def _request_row(self, rec: CallRecord, n_attempts: int, cost: int, baseline: int) -> RequestRow:
        prompt, completion, cached, source = _usage_columns(rec.usage)
        keep = self._store_text
        return RequestRow(
            id=rec.request_id,
            started_at=iso_utc(rec.started_at),
            duration_ms=float(rec.duration_ms),
            route=str(rec.route),
            stream=1 if rec.stream else 0,
            requested_model=rec.requested_model,
            tier=rec.tier,
            paid=None if rec.tier is None else int(self._paid.get(rec.tier, False)),
            model=rec.model,
            status=int(rec.status),
            outcome=str(rec.outcome),
            attempts=n_attempts,
            ttft_ms=rec.ttft_ms,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            usage_source=source,
            cost_usd=nano_to_float(cost),
            baseline_cost_usd=nano_to_float(baseline),
            cost_nano_usd=cost,
            baseline_nano_usd=baseline,
            client=rec.client,
            error=rec.error,
            request_text=_text(rec.request_body) if keep else None,
            response_text=_text(rec.response_body) if keep else None,
        )


def _unique_attempts(rec: CallRecord) -> list[AttemptRecord]:
    """Attempts with distinct `n`: a duplicate would break the primary key and, with it,
    every retry of the batch, so it is dropped here with a warning instead."""
    seen: set[int] = set()
    out: list[AttemptRecord] = []
    for a in rec.attempts:
        if a.n in seen:
            log.warning("ledger: request %s has two attempts numbered %d; keeping the first", rec.request_id, a.n)
            continue
        seen.add(a.n)
        out.append(a)
    return out


def _attempt_row(request_id: str, a: AttemptRecord, nano: int) -> AttemptRow:
    prompt, completion, cached, _ = _usage_columns(a.usage)
    return AttemptRow(
        request_id=request_id,
        n=a.n,
        tier=a.tier,
        model=a.model,
        started_at=iso_utc(a.started_at),
        duration_ms=float(a.duration_ms),
        ttft_ms=a.ttft_ms,
        http_status=a.http_status,
        outcome=str(a.outcome),
        error=a.error,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cost_usd=nano_to_float(nano),
        cost_nano_usd=nano,
    )


# ---------------------------------------------------------------------------- rollups


@dataclass(slots=True)
class _UsageSums:
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


@dataclass(slots=True)
class _AttemptSums:
    attempts: int = 0
    failures: int = 0
    cancelled: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cost: int = 0


_UPSERT_USAGE = """
INSERT INTO daily_usage (day, tier, route, paid, calls, failures, cancelled, fallbacks, attempts,
    prompt_tokens, completion_tokens, cached_tokens, duration_ms, cost_nano_usd, baseline_nano_usd,
    cost_usd, baseline_cost_usd)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    baseline_cost_usd = (baseline_nano_usd + excluded.baseline_nano_usd) / 1e9
"""

_UPSERT_ATTEMPTS = """
INSERT INTO daily_attempts (day, tier, attempts, failures, cancelled, prompt_tokens, completion_tokens,
    cached_tokens, cost_nano_usd, cost_usd)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, tier) DO UPDATE SET
    attempts = attempts + excluded.attempts,
    failures = failures + excluded.failures,
    cancelled = cancelled + excluded.cancelled,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd,
    cost_usd = (cost_nano_usd + excluded.cost_nano_usd) / 1e9
"""

_UPSERT_LATENCY = """
INSERT INTO daily_latency (day, tier, metric, bucket, count) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (day, tier, metric, bucket) DO UPDATE SET count = count + excluded.count
"""

_ATTEMPT_NOT_FAILED = (AttemptOutcome.OK.value, AttemptOutcome.CANCELLED.value)


class Rollup:
    """A batch's contribution to the daily tables, summed in Python so that each batch costs
    one upsert per (day, tier, ...) group instead of one per row."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.usage: dict[tuple[str, str, str, int], _UsageSums] = {}
        self.attempts: dict[tuple[str, str], _AttemptSums] = {}
        self.latency: dict[tuple[str, str, str, int], int] = {}
        for e in entries:
            self._add_request(e.request)
            for a in e.attempts:
                self._add_attempt(a)

    def _add_request(self, r: RequestRow) -> None:
        day, tier = r.started_at[:10], r.tier or ""
        key = (day, tier, r.route, r.paid or 0)
        s = self.usage.get(key)
        if s is None:
            s = self.usage[key] = _UsageSums()
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
            s = self.attempts[key] = _AttemptSums()
        s.attempts += 1
        s.failures += a.outcome not in _ATTEMPT_NOT_FAILED
        s.cancelled += a.outcome == AttemptOutcome.CANCELLED.value
        s.prompt += a.prompt_tokens or 0
        s.completion += a.completion_tokens or 0
        s.cached += a.cached_tokens or 0
        s.cost += a.cost_nano_usd

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
            )
            for k, s in self.usage.items()
        ]

    def attempt_params(self) -> list[tuple[Any, ...]]:
        return [
            (*k, s.attempts, s.failures, s.cancelled, s.prompt, s.completion, s.cached, s.cost, nano_to_float(s.cost))
            for k, s in self.attempts.items()
        ]

    def latency_params(self) -> list[tuple[Any, ...]]:
        return [(*k, n) for k, n in self.latency.items()]


_REBUILD = """
DELETE FROM daily_usage;
DELETE FROM daily_attempts;
DELETE FROM daily_latency;
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
INSERT INTO daily_latency
SELECT substr(started_at, 1, 10), tier, 'ttft', ledger_bucket(ttft_ms), count(*)
FROM requests WHERE tier IS NOT NULL AND ttft_ms IS NOT NULL GROUP BY 1, 2, 4;
"""


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
        await _rollback(conn)
        raise


# ---------------------------------------------------------------------------- database access


async def open_db(path: str | Path, *, busy_timeout_ms: int = 2000) -> aiosqlite.Connection:
    """Open (creating it if needed) and migrate a ledger file; autocommit, WAL, synchronous=NORMAL."""
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await migrate(conn)
    except sqlite3.Error:
        await conn.close()
        raise
    return conn


async def _rollback(conn: aiosqlite.Connection) -> None:
    # After some errors (SQLITE_FULL, IOERR) SQLite has already rolled back.
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")


async def _existing_ids(conn: aiosqlite.Connection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        rows = await conn.execute_fetchall(f"SELECT id FROM requests WHERE id IN ({_placeholders(chunk)})", chunk)
        found.update(str(r[0]) for r in rows)
    return found


def _renamed(entry: Entry) -> Entry:
    new_id = f"{entry.request.id}~{uuid.uuid4().hex[:12]}"
    log.warning("ledger: request id %s was already recorded; storing this one as %s", entry.request.id, new_id)
    return Entry(
        entry.request._replace(id=new_id),
        tuple(a._replace(request_id=new_id) for a in entry.attempts),
    )


async def _dedupe(conn: aiosqlite.Connection, entries: Sequence[Entry], *, keep_duplicates: bool) -> list[Entry]:
    """Live writes keep a reused request id under a new id (a client may reuse X-Request-Id);
    imports drop it, because there a known id means the row was already imported."""
    taken = await _existing_ids(conn, [e.request.id for e in entries])
    out: list[Entry] = []
    for e in entries:
        if e.request.id in taken:
            if not keep_duplicates:
                continue
            e = _renamed(e)
        taken.add(e.request.id)
        out.append(e)
    return out


async def write_entries(conn: aiosqlite.Connection, entries: Sequence[Entry], *, keep_duplicates: bool = True) -> int:
    """Insert entries and their rollups in ONE transaction; returns the requests inserted."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        todo = await _dedupe(conn, entries, keep_duplicates=keep_duplicates)
        if todo:
            await _insert(conn, todo)
        await conn.execute("COMMIT")
    except sqlite3.Error:
        await _rollback(conn)
        raise
    return len(todo)


async def _insert(conn: aiosqlite.Connection, entries: Sequence[Entry]) -> None:
    await conn.executemany(INSERT_REQUEST, [e.request for e in entries])
    attempt_rows = [a for e in entries for a in e.attempts]
    if attempt_rows:
        await conn.executemany(INSERT_ATTEMPT, attempt_rows)
    rollup = Rollup(entries)
    await conn.executemany(_UPSERT_USAGE, rollup.usage_params())
    if rollup.attempts:
        await conn.executemany(_UPSERT_ATTEMPTS, rollup.attempt_params())
    if rollup.latency:
        await conn.executemany(_UPSERT_LATENCY, rollup.latency_params())


async def spend_since(conn: aiosqlite.Connection, day: str) -> Decimal:
    """Exact spend of every request started on or after `day` (YYYY-MM-DD, UTC), from the rollup."""
    rows = list(
        await conn.execute_fetchall("SELECT coalesce(sum(cost_nano_usd), 0) FROM daily_usage WHERE day >= ?", (day,))
    )
    return from_nano(int(rows[0][0])) if rows else ZERO


# ---------------------------------------------------------------------------- spill files


def spill_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}{SPILL_SUFFIX}")


def append_spill(path: Path, entries: Sequence[Entry]) -> None:
    """Append whole lines or nothing: a write cut short (disk full) is truncated away, so the
    retry that follows does not glue its first line onto half a line."""
    data = memoryview(b"".join(e.to_json() + b"\n" for e in entries))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int  # requests inserted
    skipped: int  # requests already in the database (an earlier import got that far)
    rejected: int  # lines that could not be read, copied to <db>.spill.rejected.jsonl
    files: tuple[str, ...]  # spill files consumed


def _claimed_files(db_path: Path) -> list[Path]:
    spill = spill_path(db_path)
    prefix = spill.name + ".importing-"
    try:
        return sorted(p for p in spill.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def has_spill(db_path: str | Path) -> bool:
    """Is there anything for `import_spill` to do?"""
    return spill_path(db_path).exists() or bool(_claimed_files(Path(db_path)))


def _claim_spill_files(db_path: Path) -> list[Path]:
    """Rename the spill file aside before reading it, so lines a running proxy appends
    meanwhile go to a fresh file instead of being deleted with this one. Files claimed
    by an import that died half way are picked up again."""
    spill = spill_path(db_path)
    prefix = spill.name + ".importing-"
    claimed = _claimed_files(db_path)
    if spill.exists():
        target = spill.with_name(f"{prefix}{os.getpid()}-{time.time_ns()}")
        spill.rename(target)
        claimed.append(target)
    return claimed


def _read_spill(path: Path, db_path: Path) -> tuple[list[Entry], int]:
    entries: list[Entry] = []
    bad: list[bytes] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            entries.append(Entry.from_json(line))
        except ValueError:
            bad.append(line)
    if bad:
        rejected = Path(f"{db_path}.spill.rejected.jsonl")
        with open(rejected, "ab") as f:
            f.write(b"".join(b + b"\n" for b in bad))
        log.error("ledger: %d unreadable line(s) in %s were moved to %s", len(bad), path, rejected)
    return entries, len(bad)


async def import_spill(conn: aiosqlite.Connection, db_path: str | Path, *, batch_size: int = 500) -> ImportResult:
    """Import `<db>.spill.jsonl` (and half-imported leftovers) idempotently, then delete them.

    A request id already in the database is skipped, so running this twice, or after a
    crash between the commit and the delete, imports nothing twice.
    """
    db_path = Path(db_path)
    imported = skipped = rejected = 0
    files = _claim_spill_files(db_path)
    for path in files:
        entries, bad = _read_spill(path, db_path)
        rejected += bad
        for i in range(0, len(entries), batch_size):
            chunk = entries[i : i + batch_size]
            n = await write_entries(conn, chunk, keep_duplicates=False)
            imported += n
            skipped += len(chunk) - n
        path.unlink()
    if files:
        log.info(
            "ledger: imported %d spilled request(s) from %d file(s), %d already present", imported, len(files), skipped
        )
    return ImportResult(imported, skipped, rejected, tuple(str(p) for p in files))


# ---------------------------------------------------------------------------- the ledger


@dataclass(frozen=True, slots=True)
class LedgerStats:
    written: int  # requests committed to SQLite
    spilled: int  # requests appended to the spill file instead
    imported: int  # requests imported from a spill file at start
    queue_depth: int  # requests waiting for the writer
    failed: int  # requests lost: neither written nor spilled (each one was logged)


class CostListener(Protocol):
    """What the ledger tells a budget: loaded once at start, then every priced request."""

    async def load(self, source: SpendSource) -> None: ...

    def record(self, cost: Decimal, at: float) -> None: ...


class Ledger:
    """A RecordSink that writes to SQLite from one background task.

    Call `submit` from the event loop thread only (it wakes the writer with an asyncio.Event).
    """

    def __init__(
        self,
        config: Config,
        path: str | Path | None = None,
        *,
        budget: CostListener | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        busy_timeout_ms: int = 2000,
        hold_retry_seconds: float = HOLD_RETRY_SECONDS,
        on_cost: Sequence[Callable[[Decimal, CallRecord], None]] = (),
        linger: float = LINGER_SECONDS,
    ) -> None:
        self.path = Path(path if path is not None else config.ledger.path)
        self.spill_path = spill_path(self.path)
        self._pricer = Pricer(config)
        self._batch_size = config.ledger.batch_size
        self._budget = budget
        self._retry_delays = tuple(retry_delays)
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: deque[Entry] = deque()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._conn: aiosqlite.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._written = self._spilled = self._imported = self._failed = 0
        self._holding = False
        self._hold_retry_seconds = hold_retry_seconds
        self._linger = linger
        self._on_cost = tuple(on_cost)  # told every priced request's cost (client caps, metrics)

    # -- request path

    def submit(self, record: CallRecord) -> None:
        try:
            entry = self._pricer.entry(record)
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
            # A malformed record is a bug upstream; losing its row beats failing the request.
            self._failed += 1
            log.error("ledger: cannot record request %r: %s", getattr(record, "request_id", "?"), e)
            return
        if entry.request.cost_nano_usd:
            cost = from_nano(entry.request.cost_nano_usd)
            if self._budget is not None:
                self._budget.record(cost, record.started_at)
            for listener in self._on_cost:
                listener(cost, record)
        if self._closed:
            self._spill_now([entry])
            return
        self._queue.append(entry)
        self._drained.clear()
        self._wakeup.set()

    # -- lifecycle

    async def start(self) -> None:
        """Open and migrate the database, import any spill file, load the budget, start the writer.

        A database that cannot be opened is logged, not raised: the proxy serves anyway and
        the writer keeps retrying, spilling meanwhile.
        """
        if self._task is not None:
            return
        await self._try_open()
        if self._conn is not None:
            await self._import_at_start(self._conn)
        if self._budget is not None:
            try:
                await self._budget.load(self)
            except (sqlite3.Error, OSError) as e:
                log.error("ledger: cannot load budget spend from %s: %s; counting from 0", self.path, e)
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        self._task.add_done_callback(_log_crash)

    async def _import_at_start(self, conn: aiosqlite.Connection) -> None:
        try:
            result = await import_spill(conn, self.path, batch_size=self._batch_size)
        except (sqlite3.Error, OSError) as e:
            log.error("ledger: cannot import spill file %s yet: %s", self.spill_path, e)
            return
        self._imported += result.imported

    async def flush(self) -> None:
        """Wait until everything submitted so far is written (or spilled)."""
        if self._task is None or self._task.done():
            return
        await self._drained.wait()

    async def close(self) -> None:
        """Write everything still queued, stop the writer, close the database."""
        self._closing = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
            # A record submitted between the writer's exit and here (or with no writer at all).
            await self._drain()
        finally:
            self._closed = True
            await self._close_conn()

    def reconfigure(self, config: Config, budget: CostListener | None) -> None:
        """After a config reload: new prices for records submitted from now on."""
        self._pricer = Pricer(config)
        self._budget = budget

    @property
    def stats(self) -> LedgerStats:
        return LedgerStats(self._written, self._spilled, self._imported, len(self._queue), self._failed)

    async def spend_since(self, day: str) -> Decimal:
        if self._conn is None:
            raise sqlite3.OperationalError(f"ledger database {self.path} is not open")
        return await spend_since(self._conn, day)

    async def client_spend_since(self, day: str) -> dict[str, Decimal]:
        if self._conn is None:
            raise sqlite3.OperationalError(f"ledger database {self.path} is not open")
        async with self._conn.execute(
            "SELECT client, sum(cost_nano_usd) FROM requests"
            " WHERE started_at >= ? AND client IS NOT NULL GROUP BY client",
            (day,),
        ) as cur:
            return {client: from_nano(int(nano or 0)) async for client, nano in cur}

    # -- writer

    async def _run(self) -> None:
        while True:
            if 0 < len(self._queue) < self._batch_size and not self._closing:
                # Let a few more records arrive: one transaction for many rows costs far less
                # CPU than many small ones, and nobody waits on the ledger.
                await asyncio.sleep(self._linger)
            if not self._queue:
                self._drained.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._drain()

    async def _drain(self) -> None:
        while self._queue:
            n = min(len(self._queue), self._batch_size)
            if not await self._write_batch([self._queue.popleft() for _ in range(n)]):
                if self._closing:
                    return
                await asyncio.sleep(self._hold_retry_seconds)

    async def _write_batch(self, batch: list[Entry]) -> bool:
        """Write (or spill) the batch; False when it could only be held in memory."""
        error: Exception | None = None
        for delay in (*self._retry_delays, None):
            try:
                conn = await self._connection()
                self._written += await write_entries(conn, batch)
                self._recovered()
                return True
            except sqlite3.IntegrityError:
                # Bad data, not a bad disk: retrying the same batch would fail forever.
                await self._write_one_by_one(batch)
                return True
            except (sqlite3.Error, OSError) as e:
                error = e
            if delay is not None:
                await asyncio.sleep(delay)
        log.warning("ledger: writing %d request(s) to %s failed (%s); spilling", len(batch), self.path, error)
        return await self._spill(batch)

    async def _write_one_by_one(self, batch: list[Entry]) -> None:
        for entry in batch:
            try:
                conn = await self._connection()
                self._written += await write_entries(conn, [entry])
            except sqlite3.IntegrityError as e:
                self._failed += 1
                log.error("ledger: request %s cannot be stored (%s); dropped", entry.request.id, e)
            except (sqlite3.Error, OSError):
                await self._spill([entry])

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection, reopened when the file was deleted or replaced under us
        (writes to an unlinked file would succeed and vanish)."""
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._conn is not None and current != self._file_id:
            log.warning("ledger: %s was moved or deleted; reopening it", self.path)
            await self._close_conn()
        if self._conn is None:
            await self._open()
        assert self._conn is not None
        return self._conn

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await open_db(self.path, busy_timeout_ms=self._busy_timeout_ms)
        st = os.stat(self.path)
        self._file_id = (st.st_dev, st.st_ino)

    async def _try_open(self) -> None:
        try:
            await self._open()
        except (sqlite3.Error, OSError) as e:
            log.error("ledger: cannot open %s: %s; requests will be spilled until it can be", self.path, e)
            await self._close_conn()

    async def _close_conn(self) -> None:
        conn, self._conn, self._file_id = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await conn.close()

    async def _spill(self, batch: list[Entry]) -> bool:
        try:
            await asyncio.to_thread(append_spill, self.spill_path, batch)
        except OSError as e:
            return self._hold(batch, e)
        self._spilled += len(batch)
        return True

    def _hold(self, batch: list[Entry], error: OSError) -> bool:
        """Keep rows in memory for a later retry, unless shutting down or past the cap."""
        if self._closing or len(self._queue) + len(batch) > MAX_HELD_ROWS:
            self._lost(len(batch), error)
            return True
        if not self._holding:
            log.error(
                "ledger: cannot write %s nor the spill file %s (%s); holding rows in memory and retrying",
                self.path,
                self.spill_path,
                error,
            )
        self._holding = True
        self._queue.extendleft(reversed(batch))
        return False

    def _spill_now(self, batch: list[Entry]) -> None:
        """After close() there is no writer; a late record is appended synchronously."""
        try:
            append_spill(self.spill_path, batch)
        except OSError as e:
            self._lost(len(batch), e)
            return
        self._spilled += len(batch)

    def _recovered(self) -> None:
        if self._holding:
            self._holding = False
            log.warning("ledger: %s is writable again; held rows are being written", self.path)

    def _lost(self, n: int, error: OSError) -> None:
        self._failed += n
        log.error(
            "ledger: LOST %d request record(s): database %s and spill file %s both failed (%s)",
            n,
            self.path,
            self.spill_path,
            error,
        )


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ledger: the writer task died; records are no longer written", exc_info=task.exception())
