"""The spill file: JSON lines beside the database when the store cannot be written, imported back
later (at the next start, or by `proxy ledger import`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config, load_config
from proxy.ledger.engine import store_for
from proxy.ledger.rows import LedgerEntry
from proxy.ledger.store import Store, StoreError

log = logging.getLogger("proxy.ledger")


def append_spill(path: Path, entries: Sequence[LedgerEntry]) -> None:
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


def _claimed_files(spill: Path) -> list[Path]:
    prefix = spill.name + ".importing-"
    try:
        return sorted(p for p in spill.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def has_spill(spill: Path) -> bool:
    """Is there anything for `import_spill` to do?"""
    return spill.exists() or bool(_claimed_files(spill))


def _claim_spill_files(spill: Path) -> list[Path]:
    """Rename the spill file aside before reading it, so lines a running proxy appends
    meanwhile go to a fresh file instead of being deleted with this one. Files claimed
    by an import that died half way are picked up again."""
    prefix = spill.name + ".importing-"
    claimed = _claimed_files(spill)
    if spill.exists():
        target = spill.with_name(f"{prefix}{os.getpid()}-{time.time_ns()}")
        spill.rename(target)
        claimed.append(target)
    return claimed


def rejected_path(spill: Path) -> Path:
    """Where unreadable spill lines are kept: `<db>.spill.rejected.jsonl`."""
    return spill.with_name(spill.name.removesuffix(".jsonl") + ".rejected.jsonl")


def _read_spill(path: Path, spill: Path) -> tuple[list[LedgerEntry], int]:
    entries: list[LedgerEntry] = []
    bad: list[bytes] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json(line))
        except ValueError:
            bad.append(line)
    if bad:
        rejected = rejected_path(spill)
        with open(rejected, "ab") as f:
            f.write(b"".join(b + b"\n" for b in bad))
        log.error("ledger: %d unreadable line(s) in %s were moved to %s", len(bad), path, rejected)
    return entries, len(bad)


async def import_spill(store: Store, *, batch_size: int = 500) -> ImportResult:
    """Import the store's spill file (and half-imported leftovers) idempotently, then delete them.

    A request id already in the store is skipped, so running this twice, or after a crash
    between the commit and the delete, imports nothing twice. Raises StoreError or OSError.
    """
    spill = store.spill_path
    imported = skipped = rejected = 0
    files = _claim_spill_files(spill)
    for path in files:
        entries, bad = _read_spill(path, spill)
        rejected += bad
        for i in range(0, len(entries), batch_size):
            chunk = entries[i : i + batch_size]
            n = await store.write(chunk, keep_duplicates=False)
            imported += n
            skipped += len(chunk) - n
        path.unlink()
    if files:
        log.info(
            "ledger: imported %d spilled request(s) from %d file(s), %d already present", imported, len(files), skipped
        )
    return ImportResult(imported, skipped, rejected, tuple(str(p) for p in files))


async def import_ledger(db: str | Path | None, config: Config | None = None) -> tuple[int, str]:
    """`proxy ledger import` inside an event loop: (exit code, text). `db` is a file or a
    postgresql:// URL; None: the config's ledger."""
    store = store_for(config or load_config(None), db)
    db = store.location
    if not has_spill(store.spill_path):
        return 0, f"nothing to import: no spill file {store.spill_path}"
    try:
        await store.open()
        result = await import_spill(store)
    except (StoreError, OSError) as e:
        return 1, f"cannot import into {db}: {e}"
    finally:
        await store.close()
    text = f"imported {result.imported} request(s) from {len(result.files)} spill file(s) into {db}"
    if result.skipped:
        text += f"; {result.skipped} were already there"
    if result.rejected:
        text += f"; {result.rejected} unreadable line(s) kept in {rejected_path(store.spill_path)}"
    return 0, text


def import_main(db: str | None, config: Config | None = None) -> tuple[int, str]:
    """`proxy ledger import`: load `<db>.spill.jsonl` back into the database (idempotent)."""
    return asyncio.run(import_ledger(db, config))
