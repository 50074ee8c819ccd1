"""The cost ledger: every client request and upstream attempt, written to a store in batches.

`Ledger.submit` is called on the request path: it appends the entry to the journal (one
`os.write`, so a `kill -9` loses nothing the client was answered for: journal.py) and to an
in-memory queue; one background task writes whatever has queued in a single transaction per
batch, and the store keeps the daily rollup tables current in that same transaction. When the
store keeps failing, rows go to a JSON-lines spill file next to it and are imported back on
the next start.
Schema and queries: docs/ledger.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from proxy.config import Config
from proxy.ledger.engine import store_for
from proxy.ledger.journal import Journal, journal_base
from proxy.ledger.pricing import from_nano
from proxy.ledger.replay import replay_segment
from proxy.ledger.rows import LedgerEntry, Pricer
from proxy.ledger.spill import append_spill
from proxy.ledger.startup import import_at_start, open_store, replay_at_start
from proxy.ledger.store import RowsRejected, Store, StoreError
from proxy.records import CallRecord

log = logging.getLogger("proxy.ledger")

DEFAULT_RETRY_DELAYS = (0.05, 0.25)
# `proxy serve` waits this long in all for a locked ledger before refusing to start.
START_RETRY_DELAYS = (0.1, 0.3, 0.6, 1.0)
# When neither the database nor the spill file can be written, rows wait in memory (up to this
# many) and are retried every HOLD_RETRY_SECONDS: a full or read-only disk usually comes back.
MAX_HELD_ROWS = 100_000
LINGER_SECONDS = 0.05  # how long the writer waits for a batch to fill
# Past this many queued rows (~1 kB each) a new row is kept only in the journal, and the writer
# reads it back from there once it has caught up: memory stays bounded when it falls behind.
MAX_QUEUED_ROWS = 20_000
HOLD_RETRY_SECONDS = 1.0

# Told the exact cost of every priced request as it is submitted (budgets, client caps, metrics).
CostListener = Callable[[Decimal, CallRecord], None]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    written: int  # requests committed to the store
    spilled: int  # requests appended to the spill file instead
    imported: int  # requests imported from a spill file or replayed from the journal at start
    queue_depth: int  # requests waiting for the writer
    failed: int  # requests lost: neither written nor spilled (each one was logged)


class Ledger:
    """A RecordSink that writes to a store from one background task: the SQLite file at `path`
    (default `ledger.path`), or PostgreSQL when `path` is a postgresql:// URL or the config sets
    `ledger.url` (engine.py).

    Call `submit` from the event loop thread only (it wakes the writer with an asyncio.Event).
    """

    def __init__(
        self,
        config: Config,
        path: str | Path | None = None,
        *,
        store: Store | None = None,
        on_cost: CostListener | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        start_retry_delays: Sequence[float] = START_RETRY_DELAYS,
        busy_timeout_ms: int = 2000,
        hold_retry_seconds: float = HOLD_RETRY_SECONDS,
        linger: float = LINGER_SECONDS,
        max_queued: int = MAX_QUEUED_ROWS,
    ) -> None:
        if store is None:
            store = store_for(config, path, busy_timeout_ms=busy_timeout_ms)
        self.store = store
        self.spill_path = store.spill_path
        self.journal_path = journal_base(store.spill_path)
        self._journal: Journal | None = None  # opened by start()
        self._pricer = Pricer(config)
        self._batch_size = config.ledger.batch_size
        self._on_cost = on_cost
        self._retry_delays = tuple(retry_delays)
        self._start_retry_delays = tuple(start_retry_delays)
        self._queue: deque[LedgerEntry] = deque()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._written = self._spilled = self._imported = self._failed = 0
        self._holding = False
        self._requeued = 0  # entries put back at the queue's head, still owed by the journal
        self._hold_retry_seconds = hold_retry_seconds
        self._linger = linger
        self._max_queued = max_queued

    # -- request path

    def submit(self, record: CallRecord) -> None:
        try:
            entry = self._pricer.entry(record)
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
            # A malformed record is a bug upstream; losing its row beats failing the request.
            self._failed += 1
            log.error("ledger: cannot record request %r: %s", getattr(record, "request_id", "?"), e)
            return
        if entry.request.cost_nano_usd and self._on_cost is not None:
            self._on_cost(from_nano(entry.request.cost_nano_usd), record)
        if self._closed:
            self._spill_now([entry])
            return
        # Journaled before the answer is released (the caller has not built it yet): what the
        # client was answered for is on disk even if the process dies in the next instant.
        if self._journal is None or self._journal.append(entry.to_json(), queue=len(self._queue) < self._max_queued):
            self._queue.append(entry)
        self._drained.clear()
        self._wakeup.set()

    # -- lifecycle

    async def start(self, *, required: bool = False) -> None:
        """Open and migrate the store, replay the journal of an unclean stop, import any spill
        file, then open a fresh journal and start the writer.

        A store that cannot be opened is logged, not raised: the proxy serves anyway and
        the writer keeps retrying, spilling meanwhile. With `required` (`proxy serve`) it is
        raised instead, since budgets would count from zero: a busy or locked store is retried
        for `start_retry_delays` first, one that no retry fixes (StoreUnusable) is not.
        """
        if self._task is not None:
            return
        try:
            await open_store(self.store, self._start_retry_delays if required else ())
        except StoreError as e:
            if required:
                raise
            log.error("ledger: cannot open %s: %s; requests will be spilled until it can be", self.store.location, e)
        else:
            self._imported += await replay_at_start(self.store, self.journal_path, self._batch_size, required=required)
            self._imported += await import_at_start(self.store, self._batch_size)
        self._journal = Journal(self.journal_path)
        self._journal.open()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        self._task.add_done_callback(_log_crash)

    async def flush(self) -> None:
        """Wait until everything submitted so far is written (or spilled)."""
        if self._task is None or self._task.done():
            return
        await self._drained.wait()

    async def close(self) -> None:
        """Write everything still queued, stop the writer, close the store."""
        self._closing = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
            # A record submitted between the writer's exit and here (or with no writer at all).
            await self._drain()
            await self._read_back()
        finally:
            self._closed = True
            if self._journal is not None:
                self._journal.close()
            await self.store.close()

    def reconfigure(self, config: Config) -> None:
        """After a config reload: new prices for records submitted from now on."""
        self._pricer = Pricer(config)

    @property
    def stats(self) -> LedgerStats:
        backlog = self._journal.backlog if self._journal is not None else 0
        return LedgerStats(self._written, self._spilled, self._imported, len(self._queue) + backlog, self._failed)

    async def spend_since(self, day: str) -> Decimal:
        """Raises StoreError."""
        return await self.store.spend_since(day)

    async def client_spend_since(self, day: str) -> dict[str, Decimal]:
        """Raises StoreError."""
        return await self.store.client_spend_since(day)

    # -- writer

    async def _run(self) -> None:
        while True:
            if 0 < len(self._queue) < self._batch_size and not self._closing:
                # Let a few more records arrive: one transaction for many rows costs far less
                # CPU than many small ones, and nobody waits on the ledger. Between batches too:
                # without it, the few rows that came in while a batch was written went next, on
                # their own (a PostgreSQL batch costs ~1 ms of CPU however few its rows).
                await asyncio.sleep(self._linger)
            if not self._queue and await self._read_back():
                continue
            if not self._queue:
                self._drained.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._drain(lingering=True)

    async def _read_back(self) -> bool:
        """Caught up: store what the journal alone holds (a full queue left it there). False when
        there is nothing to do, or it cannot be done now (retried after the next batch)."""
        if self._journal is None:
            return False
        progressed = False
        for path in self._journal.backlog_ready():
            try:
                result = await replay_segment(self.store, path, batch_size=self._batch_size, backlog_only=True)
            except (StoreError, OSError) as e:
                log.warning("ledger: cannot store the journal's backlog %s yet: %s", path, e)
                return False
            self._written += result.replayed
            self._journal.replayed(path)
            progressed = True
        return progressed

    async def _drain(self, *, lingering: bool = False) -> None:
        """Write what is queued, batch after batch. `lingering` (the writer task): stop once less
        than a batch is left, so that the next batch waits for more rows first."""
        while self._queue:
            if self._journal is not None:
                self._journal.rotate()
            n = min(len(self._queue), self._batch_size)
            requeued = self._requeued
            ok = await self._write_batch([self._queue.popleft() for _ in range(n)])
            if self._journal is not None:
                # Written, spilled or dropped as unstorable: no segment needs to keep those.
                self._journal.committed(n - (self._requeued - requeued))
            if not ok:
                if self._closing:
                    return
                await asyncio.sleep(self._hold_retry_seconds)
            if lingering and len(self._queue) < self._batch_size and not self._closing:
                return

    async def _write_batch(self, batch: list[LedgerEntry]) -> bool:
        """Write (or spill) the batch; False when it could only be held in memory."""
        error: StoreError | None = None
        for delay in (*self._retry_delays, None):
            try:
                self._written += await self.store.write(batch)
                self._recovered()
                return True
            except RowsRejected:
                # Bad data, not a bad disk: retrying the same batch would fail forever.
                await self._write_one_by_one(batch)
                return True
            except StoreError as e:
                error = e
            if delay is not None:
                await asyncio.sleep(delay)
        log.warning("ledger: writing %d request(s) to %s failed (%s); spilling", len(batch), self.store.location, error)
        return await self._spill(batch)

    async def _write_one_by_one(self, batch: list[LedgerEntry]) -> None:
        for entry in batch:
            try:
                self._written += await self.store.write([entry])
            except RowsRejected as e:
                self._failed += 1
                log.error("ledger: request %s cannot be stored (%s); dropped", entry.request.id, e)
            except StoreError:
                await self._spill([entry])

    async def _spill(self, batch: list[LedgerEntry]) -> bool:
        try:
            await asyncio.to_thread(append_spill, self.spill_path, batch)
        except OSError as e:
            return self._hold(batch, e)
        self._spilled += len(batch)
        return True

    def _hold(self, batch: list[LedgerEntry], error: OSError) -> bool:
        """Keep rows in memory for a later retry, unless shutting down or past the cap."""
        if self._closing or len(self._queue) + len(batch) > MAX_HELD_ROWS:
            self._lost(len(batch), error)
            return True
        if not self._holding:
            log.error(
                "ledger: cannot write %s nor the spill file %s (%s); holding rows in memory and retrying",
                self.store.location,
                self.spill_path,
                error,
            )
        self._holding = True
        self._queue.extendleft(reversed(batch))
        self._requeued += len(batch)
        return False

    def _spill_now(self, batch: list[LedgerEntry]) -> None:
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
            log.warning("ledger: %s is writable again; held rows are being written", self.store.location)

    def _lost(self, n: int, error: OSError) -> None:
        self._failed += n
        if self._journal is not None:
            self._journal.keep()
        log.error(
            "ledger: LOST %d request record(s): database %s and spill file %s both failed (%s)",
            n,
            self.store.location,
            self.spill_path,
            error,
        )


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ledger: the writer task died; records are no longer written", exc_info=task.exception())
