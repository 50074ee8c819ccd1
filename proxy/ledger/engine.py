"""Which store a ledger target names: the SQLite file (the default) or PostgreSQL (`ledger.url`);
and `rebuild_rollups` for a connection to either."""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from proxy.config import Config
from proxy.ledger import postgres, rollups
from proxy.ledger.pg_migrations import Conn
from proxy.ledger.postgres import PostgresStore, is_postgres_url
from proxy.ledger.sqlite import SqliteStore
from proxy.ledger.store import Store


def store_for(config: Config, target: str | Path | None = None, *, busy_timeout_ms: int | None = None) -> Store:
    """The store for `target` (`--db`: a file or a postgresql:// URL), else for the config.

    With `ledger.url` set, the config's own `ledger.path` (also when passed as `target`, as the
    app does) means PostgreSQL, and names where the spill file and the journal are kept.
    The config's password (`ledger.password_env`) goes only to the config's own URL.
    """
    ledger = config.ledger
    if target is None or (ledger.url is not None and str(target) == ledger.path):
        target = ledger.url if ledger.url is not None else ledger.path
    if is_postgres_url(target):
        url = str(target)
        password = config.ledger_password if url == ledger.url else None
        return PostgresStore(url, spill_base=ledger.path, password=password)
    timeout = ledger.busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
    return SqliteStore(target, busy_timeout_ms=timeout)


async def rebuild_rollups(conn: aiosqlite.Connection | Conn) -> None:
    """Recompute the daily tables from the raw rows, in one transaction: `conn` is the file's
    (aiosqlite, `open_db`) or a PostgreSQL ledger's (asyncpg, pooled or not).

    For rows inserted or deleted by hand or by bulk tools that bypass the Ledger, and for a
    future migration that adds a rollup column.
    """
    if isinstance(conn, aiosqlite.Connection):
        await rollups.rebuild_rollups(conn)
    else:
        await postgres.rebuild_rollups(conn)
