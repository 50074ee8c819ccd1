"""Many rows per SQLite statement, for the writer's batches.

Each row of an `executemany` is one `sqlite3_step`, and Python's sqlite3 lets go of the GIL
around every step. On a busy event loop the writer's thread then waits up to the
interpreter's switch interval (5 ms) to get it back, once per row: a batch of 500 rows took
seconds, and the queue grew faster than it drained. Here a batch goes in as ONE parameter, a
JSON array of rows, unpacked by SQLite's `json_each`: one statement and one step per table,
and the same SQL text whatever the batch size, so it is prepared once (a VALUES list per
batch size would be a new statement, and a cached one, for every size).

Small batches still use `executemany`: they come when the loop is not busy, where a step per
row costs little, and it is cheaper than building and unpacking JSON for a row or two.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import aiosqlite
import orjson

# Below this many rows a batch is an executemany (see above).
JSON_FROM_ROWS = 32


@functools.lru_cache(maxsize=16)
def from_json_rows(sql: str) -> str:
    """`INSERT ... VALUES (?, ...) [ON CONFLICT ...]` as `INSERT ... SELECT ... FROM json_each(?)`."""
    head, sep, rest = sql.partition("VALUES (")
    group, close, tail = rest.partition(")")
    if not sep or not close:
        raise ValueError(f"not a one-row INSERT ... VALUES (...): {sql[:80]!r}")
    columns = ", ".join(f"value ->> {i}" for i in range(group.count("?")))
    # WHERE true: without it SQLite would read ON CONFLICT as part of the SELECT's join.
    return f"{head}SELECT {columns} FROM json_each(?) WHERE true{tail}"


async def execute_rows(conn: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """Run the one-row statement `sql` for every row, as one statement. JSON keeps what the
    columns need: integers as integers (nano-dollars), floats exactly (shortest round-trip
    form), NULL, text."""
    if len(rows) >= JSON_FROM_ROWS:
        await conn.execute(from_json_rows(sql), (orjson.dumps([tuple(r) for r in rows]),))
    elif rows:
        await conn.executemany(sql, rows)
