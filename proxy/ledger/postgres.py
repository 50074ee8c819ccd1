"""The PostgreSQL engine (`ledger.url: postgresql://...`): a small asyncpg pool, one transaction
per batch, the same tables as SQLite (pg_migrations.py); its errors become StoreError.

Why asyncpg: it is the asyncio-native driver (no thread hop per batch), speaks PostgreSQL's
binary protocol with prepared statements, and is the most used and maintained async driver.

The spill file and the journal stay local files beside `spill_base` (`ledger.path`): when the
database is unreachable, rows wait there and are replayed, as for SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from proxy.config.urls import redact
from proxy.ledger import pg_sql
from proxy.ledger.pg_migrations import Conn, migrate
from proxy.ledger.pricing import from_nano
from proxy.ledger.rollups import Rollup
from proxy.ledger.rows import (
    LOG_GROWTH,
    MAX_LATENCY_MS,
    AttemptRow,
    LedgerEntry,
    RequestRow,
    renamed,
    without_taken,
)
from proxy.ledger.store import RowsRejected, StoreError, StoreUnusable

log = logging.getLogger("proxy.ledger")

CONNECT_TIMEOUT = 5.0  # seconds to reach the server before a write counts as failed (and spills)
COMMAND_TIMEOUT = 30.0  # seconds for one statement
SPILL_SUFFIX = ".spill.jsonl"
_URL_SCHEMES = ("postgresql", "postgres")

# What no retry fixes: wrong user or password, no such database, no permission on the tables.
_UNUSABLE = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InsufficientPrivilegeError,
)
# The rows themselves were refused (a constraint, a value the column cannot hold).
_REJECTED = (asyncpg.exceptions.IntegrityConstraintViolationError, asyncpg.exceptions.DataError)
# Everything that means "not now": the server is down, restarting, unreachable or slow.
_TRANSIENT = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.split(":", 1)[0].lower() in _URL_SCHEMES


def store_error(e: BaseException) -> StoreError:
    """asyncpg's and the socket's exceptions as the ledger's: the one place they are mapped."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, _UNUSABLE):
        return StoreUnusable(text)
    if isinstance(e, _REJECTED):
        return RowsRejected(text)
    return StoreError(text)


class PostgresStore:
    """One PostgreSQL database, through a pool of a few connections (the writer uses one; budget
    reads and imports may take another). The pool is made on first use, so a server that is down
    at start is retried on every batch until it answers."""

    def __init__(
        self, url: str, *, spill_base: str | Path, password: str | None = None, max_connections: int = 4
    ) -> None:
        self.url = url
        self._password = password
        self._spill_base = Path(spill_base)
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        self._checked = False  # the schema is known to be migrated

    @property
    def location(self) -> str:
        return redact(self.url)

    @property
    def spill_path(self) -> Path:
        return Path(f"{self._spill_base}{SPILL_SUFFIX}")

    async def open(self) -> None:
        await self._ready()

    async def write(self, entries: Sequence[LedgerEntry], *, keep_duplicates: bool = True) -> int:
        pool = await self._ready()
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await _write_batch(conn, entries, keep_duplicates)
        except _TRANSIENT as e:
            if isinstance(e, asyncpg.exceptions.UndefinedTableError):
                self._checked = False  # someone dropped the tables: migrate again on the next batch
            raise store_error(e) from e

    async def spend_since(self, day: str) -> Decimal:
        rows = await self._fetch(pg_sql.SPEND_SINCE, day)
        return from_nano(int(rows[0][0] or 0))

    async def client_spend_since(self, day: str) -> dict[str, Decimal]:
        rows = await self._fetch(pg_sql.CLIENT_SPEND_SINCE, day)
        return {str(r[0]): from_nano(int(r[1] or 0)) for r in rows}

    async def fetch(self, sql: str, *args: object) -> list[Any]:
        """Rows of a read-only query (reports, tests). Raises StoreError."""
        return await self._fetch(sql, *args)

    async def read_snapshot(self, queries: Sequence[tuple[str, Sequence[object]]]) -> list[list[Any]]:
        """Rows of several read-only queries from one snapshot (the report). Raises StoreError."""
        pool = await self._ready()
        try:
            async with pool.acquire() as conn:
                return await read_snapshot(conn, queries)
        except _TRANSIENT as e:
            raise store_error(e) from e

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=CONNECT_TIMEOUT)
            except _TRANSIENT:
                pool.terminate()

    async def _fetch(self, sql: str, *args: object) -> list[Any]:
        pool = await self._ready()
        try:
            return list(await pool.fetch(sql, *args))
        except _TRANSIENT as e:
            raise store_error(e) from e

    async def _ready(self) -> asyncpg.Pool:
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.url,
                    password=self._password,
                    min_size=0,  # no background reconnects (and their tracebacks) while it is down
                    max_size=self._max,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=COMMAND_TIMEOUT,
                    server_settings={"application_name": "proxy-ledger"},
                    reset=_keep,
                )
            if not self._checked:
                async with self._pool.acquire() as conn:
                    applied = await migrate(conn)
                if applied:
                    log.info("ledger: applied migration(s) %s to %s", ", ".join(applied), self.location)
                self._checked = True
        except _TRANSIENT as e:
            await self.close()
            raise store_error(e) from e
        return self._pool


async def _keep(conn: asyncpg.Connection) -> None:
    """A connection back in the pool needs no reset (asyncpg's default: one more round trip per
    batch): the store opens no cursor, LISTENs to nothing, takes no advisory lock, and sets
    nothing outside its transactions."""


async def rebuild_rollups(conn: Conn) -> None:
    """The daily tables recomputed from the raw rows, in one transaction (pg_sql.py has the SQL).

    Writers may keep running: the four tables are locked EXCLUSIVE first (reads go on), so a
    batch that committed before is in the sums and one still open waits, then adds its own rows;
    without the lock, a batch committed between the DELETE and the INSERT of a new day's group
    made the rebuild fail on the duplicate key."""
    async with conn.transaction():
        await conn.execute(f"LOCK TABLE {', '.join(pg_sql.REBUILD_TABLES)} IN EXCLUSIVE MODE")
        for table in pg_sql.REBUILD_TABLES:
            await conn.execute(f"DELETE FROM {table}")
        await conn.execute(pg_sql.REBUILD_USAGE)
        await conn.execute(pg_sql.REBUILD_ATTEMPTS)
        await conn.execute(pg_sql.REBUILD_LATENCY, LOG_GROWTH, MAX_LATENCY_MS)
        await conn.execute(pg_sql.REBUILD_ENDPOINTS)


async def read_snapshot(conn: Conn, queries: Sequence[tuple[str, Sequence[object]]]) -> list[list[Any]]:
    """Each query's rows, in one REPEATABLE READ READ ONLY transaction: one consistent snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return [list(await conn.fetch(sql, *args)) for sql, args in queries]


def _json_rows(rows: Iterable[tuple[Any, ...]], fields: tuple[str, ...], free_text: tuple[int, ...]) -> str:
    """Rows as a JSON array of objects (what `json_to_recordset` takes), with NUL taken out of
    free text: PostgreSQL's text cannot hold it (nor json a \\u0000 cast to text)."""
    out = []
    for row in rows:
        obj = dict(zip(fields, row, strict=True))
        for i in free_text:
            v = row[i]
            if isinstance(v, str) and "\x00" in v:
                obj[fields[i]] = v.replace("\x00", "\ufffd")
        out.append(obj)
    return orjson.dumps(out).decode()


async def _insert_requests(conn: Conn, entries: Sequence[LedgerEntry], keep_duplicates: bool) -> list[LedgerEntry]:
    """Insert the request rows; an id already stored (by this process, another replica, or an
    earlier import) is renamed and inserted again, or dropped for imports. Returns what went in."""
    done: list[LedgerEntry] = []
    todo = without_taken(entries, set(), keep_duplicates=keep_duplicates)
    while todo:
        rows = _json_rows((e.request for e in todo), RequestRow._fields, pg_sql.FREE_TEXT_REQUEST)
        inserted = {str(r[0]) for r in await conn.fetch(pg_sql.INSERT_REQUESTS, rows)}
        done.extend(e for e in todo if e.request.id in inserted)
        todo = [renamed(e) for e in todo if e.request.id not in inserted] if keep_duplicates else []
    return done


async def _write_batch(conn: Conn, entries: Sequence[LedgerEntry], keep_duplicates: bool) -> int:
    """Rows and rollups of one batch, inside the caller's transaction."""
    todo = await _insert_requests(conn, entries, keep_duplicates)
    if not todo:
        return 0
    attempts = [a for e in todo for a in e.attempts]
    if attempts:
        rows = _json_rows(attempts, AttemptRow._fields, pg_sql.FREE_TEXT_ATTEMPT)
        await conn.execute(pg_sql.INSERT_ATTEMPTS, rows)
    rollup = Rollup(todo)
    await conn.executemany(pg_sql.UPSERT_USAGE, rollup.usage_params())
    if rollup.attempts:
        await conn.executemany(pg_sql.UPSERT_ATTEMPTS, rollup.attempt_params())
    if rollup.latency:
        await conn.executemany(pg_sql.UPSERT_LATENCY, rollup.latency_params())
    await conn.executemany(pg_sql.UPSERT_ENDPOINTS, rollup.endpoints.params())
    return len(todo)
