"""The spill file: JSON lines beside the database when SQLite cannot be written, imported back later."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from proxy.ledger_db import write_entries
from proxy.ledger_rows import Entry

log = logging.getLogger("proxy.ledger")

SPILL_SUFFIX = ".spill.jsonl"


def spill_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}{SPILL_SUFFIX}")


def append_spill(path: Path, entries: Sequence[Entry]) -> None:
    """Append whole lines or nothing: a write cut short (disk full) is truncated away, so the
    retry that follows does not glue its first line onto half a line."""
    data = memoryview(b"".join(e.to_json() + b"\n" for e in entries))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int  # requests inserted
    skipped: int  # requests already in the database (an earlier import got that far)
    rejected: int  # lines that could not be read, copied to <db>.spill.rejected.jsonl
    files: tuple[str, ...]  # spill files consumed


def _claimed_files(db_path: Path) -> list[Path]:
    spill = spill_path(db_path)
    prefix = spill.name + ".importing-"
    try:
        return sorted(p for p in spill.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def has_spill(db_path: str | Path) -> bool:
    """Is there anything for `import_spill` to do?"""
    return spill_path(db_path).exists() or bool(_claimed_files(Path(db_path)))


def _claim_spill_files(db_path: Path) -> list[Path]:
    """Rename the spill file aside before reading it, so lines a running proxy appends
    meanwhile go to a fresh file instead of being deleted with this one. Files claimed
    by an import that died half way are picked up again."""
    spill = spill_path(db_path)
    prefix = spill.name + ".importing-"
    claimed = _claimed_files(db_path)
    if spill.exists():
        target = spill.with_name(f"{prefix}{os.getpid()}-{time.time_ns()}")
        spill.rename(target)
        claimed.append(target)
    return claimed


def _read_spill(path: Path, db_path: Path) -> tuple[list[Entry], int]:
    entries: list[Entry] = []
    bad: list[bytes] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            entries.append(Entry.from_json(line))
        except ValueError:
            bad.append(line)
    if bad:
        rejected = Path(f"{db_path}.spill.rejected.jsonl")
        with open(rejected, "ab") as f:
            f.write(b"".join(b + b"\n" for b in bad))
        log.error("ledger: %d unreadable line(s) in %s were moved to %s", len(bad), path, rejected)
    return entries, len(bad)


async def import_spill(conn: aiosqlite.Connection, db_path: str | Path, *, batch_size: int = 500) -> ImportResult:
    """Import `<db>.spill.jsonl` (and half-imported leftovers) idempotently, then delete them.

    A request id already in the database is skipped, so running this twice, or after a
    crash between the commit and the delete, imports nothing twice.
    """
    db_path = Path(db_path)
    imported = skipped = rejected = 0
    files = _claim_spill_files(db_path)
    for path in files:
        entries, bad = _read_spill(path, db_path)
        rejected += bad
        for i in range(0, len(entries), batch_size):
            chunk = entries[i : i + batch_size]
            n = await write_entries(conn, chunk, keep_duplicates=False)
            imported += n
            skipped += len(chunk) - n
        path.unlink()
    if files:
        log.info(
            "ledger: imported %d spilled request(s) from %d file(s), %d already present", imported, len(files), skipped
        )
    return ImportResult(imported, skipped, rejected, tuple(str(p) for p in files))
