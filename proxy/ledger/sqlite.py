"""The SQLite engine: one file, WAL, one transaction per batch; its errors become StoreError."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from proxy.ledger.migrations import migrate
from proxy.ledger.pricing import ZERO, from_nano
from proxy.ledger.rollups import insert_rollups
from proxy.ledger.rows import INSERT_ATTEMPT, INSERT_REQUEST, LedgerEntry, placeholders, without_taken
from proxy.ledger.store import RowsRejected, StoreError, StoreUnusable

log = logging.getLogger("proxy.ledger")

SPILL_SUFFIX = ".spill.jsonl"
_T = TypeVar("_T")
_IN_CHUNK = 500  # ids per `IN (...)` lookup, far below SQLite's variable limit


def spill_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}{SPILL_SUFFIX}")


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


class SqliteStore:
    """A ledger file, written through one stdlib connection on a thread of its own: a batch is
    one hop to that thread (its whole transaction runs there), not a round trip per statement.
    The connection is reopened when the file is deleted or replaced under it: writes to an
    unlinked file would succeed and vanish."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 2000) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def spill_path(self) -> Path:
        return spill_path(self.path)

    async def open(self) -> None:
        try:
            await self._connection()
        except StoreError:
            await self.close()
            raise

    async def write(self, entries: Sequence[LedgerEntry], *, keep_duplicates: bool = True) -> int:
        conn = await self._connection()
        try:
            return await self._run(write_batch, conn, entries, keep_duplicates)
        except sqlite3.IntegrityError as e:
            raise RowsRejected(str(e)) from e
        except (sqlite3.Error, OSError) as e:
            raise StoreError(str(e)) from e

    async def spend_since(self, day: str) -> Decimal:
        rows = await self._read("SELECT coalesce(sum(cost_nano_usd), 0) FROM daily_usage WHERE day >= ?", (day,))
        return from_nano(int(rows[0][0])) if rows else ZERO

    async def client_spend_since(self, day: str) -> dict[str, Decimal]:
        rows = await self._read(
            "SELECT client, sum(cost_nano_usd) FROM requests"
            " WHERE started_at >= ? AND client IS NOT NULL GROUP BY client",
            (day,),
        )
        return {str(client): from_nano(int(nano or 0)) for client, nano in rows}

    async def close(self) -> None:
        conn, self._conn, self._file_id = self._conn, None, None
        thread, self._thread = self._thread, None
        if conn is not None and thread is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        if thread is not None:
            thread.shutdown(wait=False)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        assert self._thread is not None  # set with the connection
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _read(self, sql: str, params: tuple[str, ...]) -> list[Any]:
        if self._conn is None:
            raise StoreError(f"ledger database {self.path} is not open")
        conn = self._conn
        try:
            return await self._run(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    async def _connection(self) -> sqlite3.Connection:
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:  # gone, or a path that cannot exist: opening it says which
            current = None
        if self._conn is not None and current != self._file_id:
            log.warning("ledger: %s was moved or deleted; reopening it", self.path)
            await self.close()
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                await (await open_db(self.path, busy_timeout_ms=self._busy_timeout_ms)).close()  # migrates
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
                self._conn = await self._run(_connect, self.path, self._busy_timeout_ms)
                st = os.stat(self.path)
            except (sqlite3.Error, OSError) as e:
                await self.close()
                raise (StoreUnusable if _unusable(e) else StoreError)(str(e)) from e
            self._file_id = (st.st_dev, st.st_ino)
        return self._conn


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    # check_same_thread off: the connection is made and used on the store's one thread only.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


# What no retry fixes: the file is not a ledger database, or this process may not open it.
# Busy, locked, read-only, full and I/O errors may pass and are retried or spilled instead.
_UNUSABLE_SQLITE = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"})


def _unusable(e: BaseException) -> bool:
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorname", "") in _UNUSABLE_SQLITE
    return isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError))


def _existing_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        rows = conn.execute(f"SELECT id FROM requests WHERE id IN ({placeholders(chunk)})", chunk).fetchall()
        found.update(str(r[0]) for r in rows)
    return found


def _dedupe(conn: sqlite3.Connection, entries: Sequence[LedgerEntry], *, keep_duplicates: bool) -> list[LedgerEntry]:
    taken = _existing_ids(conn, [e.request.id for e in entries])
    return without_taken(entries, taken, keep_duplicates=keep_duplicates)


def write_batch(conn: sqlite3.Connection, entries: Sequence[LedgerEntry], keep_duplicates: bool = True) -> int:
    """Insert entries and their rollups in ONE transaction; returns the requests inserted.
    Blocking: runs on the store's thread."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        todo = _dedupe(conn, entries, keep_duplicates=keep_duplicates)
        if todo:
            conn.executemany(INSERT_REQUEST, [e.request for e in todo])
            attempt_rows = [a for e in todo for a in e.attempts]
            if attempt_rows:
                conn.executemany(INSERT_ATTEMPT, attempt_rows)
            insert_rollups(conn, todo)
        conn.execute("COMMIT")
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):  # after SQLITE_FULL or IOERR it is rolled back already
            conn.execute("ROLLBACK")
        raise
    return len(todo)
