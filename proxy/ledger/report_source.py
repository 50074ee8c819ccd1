"""Where a report's rows come from: one small interface, one implementation per engine.

`ReportSource.run(queries)` runs the report's read-only statements (report_sql.py) in one
snapshot and returns each one's rows, in order. SQLite reads the file read-only in one
transaction; PostgreSQL reads in one `REPEATABLE READ READ ONLY` transaction, through the
running store's pool (`GET /proxy/report`) or one connection of its own (`proxy report --db`).

Errors are OSError (FileNotFoundError when there is no ledger there), so callers say "cannot be
read" without knowing the engine; no message carries a password.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg

from proxy.config.urls import redact
from proxy.ledger import pg_migrations
from proxy.ledger.migrations import pending
from proxy.ledger.postgres import CONNECT_TIMEOUT, PostgresStore, is_postgres_url, read_snapshot, store_error
from proxy.ledger.report_sql import Query, for_sqlite
from proxy.ledger.sqlite import SqliteStore, open_db
from proxy.ledger.store import Store, StoreError

Rows = list[Sequence[Any]]
Target = str | Path | Store  # a file, a postgresql:// URL, or the store a running proxy writes to


class ReportSource(Protocol):
    @property
    def location(self) -> str:
        """Where the rows come from, for messages (never with a password)."""
        ...

    async def run(self, queries: Sequence[Query]) -> list[Rows]:
        """Each query's rows, all from one snapshot. Raises OSError."""
        ...


class SqliteSource:
    """A ledger file, opened read-only (an old schema is upgraded in place first)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def location(self) -> str:
        return str(self.path)

    async def run(self, queries: Sequence[Query]) -> list[Rows]:
        if not self.path.exists():
            raise FileNotFoundError(f"no ledger database at {self.path}")
        conn = await _open_for_report(self.path)
        try:
            await conn.execute("BEGIN")  # one snapshot: a batch committed meanwhile is in all figures or none
            return [list(await conn.execute_fetchall(for_sqlite(q.sql), q.args)) for q in queries]
        finally:
            await conn.close()


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


class PostgresStoreSource:
    """The PostgreSQL store a running proxy writes to: its pool, its password."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    @property
    def location(self) -> str:
        return self.store.location

    async def run(self, queries: Sequence[Query]) -> list[Rows]:
        try:
            return await self.store.read_snapshot([(q.sql, q.args) for q in queries])
        except StoreError as e:
            raise OSError(str(e)) from e


class PostgresUrlSource:
    """A PostgreSQL ledger named by URL (`proxy report --db postgresql://...`): one connection;
    the password from the URL, `password`, PGPASSWORD or ~/.pgpass, as for psql."""

    def __init__(self, url: str, password: str | None = None) -> None:
        self.url = url
        self._password = password

    @property
    def location(self) -> str:
        return redact(self.url)

    async def run(self, queries: Sequence[Query]) -> list[Rows]:
        try:
            conn = await asyncpg.connect(self.url, password=self._password, timeout=CONNECT_TIMEOUT)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise OSError(str(store_error(e))) from e
        try:
            todo = await pg_migrations.pending(conn)
            if len(todo) == len(pg_migrations.PG_MIGRATIONS):
                raise FileNotFoundError(f"no ledger tables in {self.location}")
            if todo:
                await pg_migrations.migrate(conn)  # an older schema, upgraded in place as for a file
            return await read_snapshot(conn, [(q.sql, q.args) for q in queries])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise OSError(str(store_error(e))) from e
        finally:
            await conn.close()


def source_for(target: Target) -> ReportSource:
    """The engine's source for a report target."""
    if isinstance(target, PostgresStore):
        return PostgresStoreSource(target)
    if isinstance(target, SqliteStore):
        return SqliteSource(target.path)
    if isinstance(target, str | Path):
        if is_postgres_url(target):
            return PostgresUrlSource(str(target))
        return SqliteSource(Path(target))
    return SqliteSource(Path(target.location))
