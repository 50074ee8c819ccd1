"""`proxy ledger copy --from ledger.db --to postgresql://...`: an existing SQLite ledger into
another store (PostgreSQL, or another file), idempotently.

The source is read, never written (opened read-only, so a running proxy may keep using it), in
chunks in rowid order; each chunk is written like a spill import (`keep_duplicates=False`), so a
request id the target has already is skipped, and a second run, or one after a crash halfway,
copies nothing twice. The target's rollups are built from the rows it inserts, in the same
transaction, as for live writes: they equal what `rebuild_rollups` would make from its raw rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config
from proxy.ledger.engine import store_for
from proxy.ledger.rows import AttemptRow, LedgerEntry, RequestRow, placeholders
from proxy.ledger.store import Store, StoreError

CHUNK = 1000


@dataclass(frozen=True, slots=True)
class CopyResult:
    read: int  # requests in the source
    copied: int  # inserted into the target
    skipped: int  # already there (an earlier copy, or the same id written live)


class _Source:
    """A SQLite ledger opened read-only. Columns a newer migration added and this file lacks take
    their RequestRow / AttemptRow defaults, so an old, never-upgraded file copies too."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise StoreError(f"no such ledger file: {path}")
        # Used from one worker thread at a time (asyncio.to_thread), never two at once.
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self.req_cols = self._columns("requests", RequestRow._fields)
        self.att_cols = self._columns("attempts", AttemptRow._fields)

    def _columns(self, table: str, fields: tuple[str, ...]) -> list[str]:
        have = {str(r[1]) for r in self.conn.execute(f"PRAGMA table_info({table})")}
        if not have:
            raise StoreError(f"not a ledger: the table {table} is missing")
        return [f for f in fields if f in have]

    def chunk(self, after: int, limit: int) -> tuple[int, list[LedgerEntry]]:
        rows = self.conn.execute(
            f"SELECT rowid, {', '.join(self.req_cols)} FROM requests WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, limit),
        ).fetchall()
        if not rows:
            return after, []
        requests = [RequestRow(**dict(zip(self.req_cols, r[1:], strict=True))) for r in rows]
        ids = [r.id for r in requests]
        attempts: dict[str, list[AttemptRow]] = {}
        sql = f"SELECT {', '.join(self.att_cols)} FROM attempts WHERE request_id IN ({placeholders(ids)}) ORDER BY n"
        for a in self.conn.execute(sql, ids):
            row = AttemptRow(**dict(zip(self.att_cols, a, strict=True)))
            attempts.setdefault(row.request_id, []).append(row)
        entries = [LedgerEntry(r, tuple(attempts.get(r.id, ()))) for r in requests]
        return int(rows[-1][0]), entries

    def close(self) -> None:
        self.conn.close()


async def copy_ledger(source: Path, target: Store, *, chunk: int = CHUNK) -> CopyResult:
    """Raises StoreError (either side) or sqlite3.Error (the source)."""
    src = await asyncio.to_thread(_Source, source)
    read = copied = 0
    after = 0
    try:
        while True:
            after, entries = await asyncio.to_thread(src.chunk, after, chunk)
            if not entries:
                break
            read += len(entries)
            copied += await target.write(entries, keep_duplicates=False)
    finally:
        await asyncio.to_thread(src.close)
    return CopyResult(read, copied, read - copied)


async def _copy(config: Config, source: str, dest: str) -> tuple[int, str]:
    if Path(source).resolve() == Path(dest).resolve():
        return 2, "--from and --to name the same ledger"
    target = store_for(config, dest)
    try:
        await target.open()
        result = await copy_ledger(Path(source), target)
    except (StoreError, sqlite3.Error, OSError) as e:
        return 1, f"cannot copy {source} to {target.location}: {e}"
    finally:
        await target.close()
    text = f"copied {result.copied} request(s) from {source} to {target.location}"
    if result.skipped:
        text += f"; {result.skipped} were there already"
    return 0, text


def copy_main(config: Config, source: str, dest: str) -> tuple[int, str]:
    """`proxy ledger copy`: (exit code, text)."""
    return asyncio.run(_copy(config, source, dest))
