"""Many rows per SQLite statement, for the writer's batches.

Each row of an `executemany` is one `sqlite3_step`, and Python's sqlite3 lets go of the GIL
around every step. On a busy event loop the writer's thread then waits up to the
interpreter's switch interval (5 ms) to get it back, once per row: a batch of 500 rows took
seconds, and the queue grew faster than it drained. One multi-row INSERT is one step.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Sequence

import aiosqlite


@functools.cache
def variable_limit() -> int:
    """How many `?` one statement may hold in the SQLite this Python links (32766 since 3.32)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return int(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


@functools.lru_cache(maxsize=256)
def many_rows(sql: str, n: int) -> str:
    """`sql` (one `VALUES (?, ...)` group, optionally followed by an ON CONFLICT clause) for n rows."""
    head, sep, rest = sql.partition("VALUES (")
    group, close, tail = rest.partition(")")
    if not sep or not close:
        raise ValueError(f"not a one-row INSERT ... VALUES (...): {sql[:80]!r}")
    return f"{head}VALUES {', '.join([f'({group})'] * n)}{tail}"


async def execute_rows(conn: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """Run the one-row statement `sql` for every row, as few statements as the variable limit allows."""
    if not rows:
        return
    per = max(1, variable_limit() // len(rows[0]))
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        await conn.execute(many_rows(sql, len(chunk)), [v for row in chunk for v in row])
