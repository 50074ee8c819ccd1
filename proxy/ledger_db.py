"""SQLite access for the ledger: open and migrate, write a batch in one transaction, spend queries."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import aiosqlite

from proxy.ledger_rows import INSERT_ATTEMPT, INSERT_REQUEST, Entry, placeholders
from proxy.migrations import migrate
from proxy.pricing import (
    ZERO,
    from_nano,
)
from proxy.rollups import insert_rollups, rollback

log = logging.getLogger("proxy.ledger")

_IN_CHUNK = 500  # ids per `IN (...)` lookup, far below SQLite's variable limit


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


async def _existing_ids(conn: aiosqlite.Connection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        rows = await conn.execute_fetchall(f"SELECT id FROM requests WHERE id IN ({placeholders(chunk)})", chunk)
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
        await rollback(conn)
        raise
    return len(todo)


async def _insert(conn: aiosqlite.Connection, entries: Sequence[Entry]) -> None:
    await conn.executemany(INSERT_REQUEST, [e.request for e in entries])
    attempt_rows = [a for e in entries for a in e.attempts]
    if attempt_rows:
        await conn.executemany(INSERT_ATTEMPT, attempt_rows)
    await insert_rollups(conn, entries)


async def spend_since(conn: aiosqlite.Connection, day: str) -> Decimal:
    """Exact spend of every request started on or after `day` (YYYY-MM-DD, UTC), from the rollup."""
    rows = list(
        await conn.execute_fetchall("SELECT coalesce(sum(cost_nano_usd), 0) FROM daily_usage WHERE day >= ?", (day,))
    )
    return from_nano(int(rows[0][0])) if rows else ZERO
