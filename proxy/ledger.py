"""The cost ledger: every client request and upstream attempt, written to SQLite in batches.

`Ledger.submit` is called on the request path and only appends to an in-memory queue; one
background task writes whatever has queued in a single transaction per batch, and keeps the
daily rollup tables current in that same transaction. When SQLite keeps failing, rows go to a
JSON-lines spill file next to the database and are imported back on the next start.
Schema and queries: docs/ledger.md. The pieces: ledger_rows.py (rows and their costs),
rollups.py (daily rollup tables), ledger_db.py (SQLite access), spill.py (the spill file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

import aiosqlite

from proxy.budget import SpendSource
from proxy.config import Config
from proxy.ledger_db import open_db, spend_since, write_entries
from proxy.ledger_rows import Entry, Pricer, iso_utc
from proxy.pricing import (
    from_nano,
)
from proxy.records import CallRecord
from proxy.rollups import rebuild_rollups
from proxy.spill import append_spill, import_spill, spill_path

# Re-exported: the ledger's public surface for the app, the CLI and the tests.
__all__ = [
    "CostListener",
    "Entry",
    "Ledger",
    "LedgerStats",
    "Pricer",
    "iso_utc",
    "open_db",
    "rebuild_rollups",
    "spill_path",
]

log = logging.getLogger("proxy.ledger")

DEFAULT_RETRY_DELAYS = (0.05, 0.25)
# When neither the database nor the spill file can be written, rows wait in memory (up to this
# many) and are retried every HOLD_RETRY_SECONDS: a full or read-only disk usually comes back.
MAX_HELD_ROWS = 100_000
LINGER_SECONDS = 0.05  # how long the writer waits for a batch to fill
HOLD_RETRY_SECONDS = 1.0


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
