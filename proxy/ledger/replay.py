"""Reading the journal back (journal.py): at start, what an unclean stop left (`replay`), and
while running, the entries that were only ever in the journal because the queue was full
(`replay_segment(backlog_only=True)`). A segment is locked for its replay and deleted only
after all its entries are committed, so a replay interrupted anywhere inserts nothing twice."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from proxy.ledger.journal import BACKLOG, segments
from proxy.ledger.rows import LedgerEntry
from proxy.ledger.store import RowsRejected, Store

log = logging.getLogger("proxy.ledger")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int  # requests inserted from the journal
    skipped: int  # requests the store had already (committed before the crash)
    torn: int  # lines cut short by the crash (their write never returned: never acknowledged)
    segments: int  # segment files read and deleted


def _read_segment(path: Path, backlog_only: bool) -> tuple[list[LedgerEntry], int, list[bytes]]:
    """(entries, torn last lines, unreadable other lines)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else a write the crash cut short
    entries: list[LedgerEntry] = []
    bad: list[bytes] = []
    for line in lines:
        if line.startswith(BACKLOG):
            line = line[1:]
        elif backlog_only:
            continue
        if line.strip():
            try:
                entries.append(LedgerEntry.from_json(line))
            except ValueError:
                bad.append(line)
    return entries, int(bool(tail.strip())), bad


def _claim(path: Path) -> int | None:
    """Lock a segment for its replay: its descriptor, or None when a running process holds it
    (another proxy on the same ledger, or one replaying it right now) or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


async def _write_skipping_rejected(store: Store, chunk: list[LedgerEntry], keep_duplicates: bool) -> int:
    try:
        return await store.write(chunk, keep_duplicates=keep_duplicates)
    except RowsRejected:
        pass
    n = 0
    for entry in chunk:  # the store refuses one of them: a replay must not fail at every start for it
        try:
            n += await store.write([entry], keep_duplicates=keep_duplicates)
        except RowsRejected as e:
            log.error("ledger: journaled request %s cannot be stored (%s); dropped", entry.request.id, e)
    return n


async def replay_segment(
    store: Store, path: Path, *, batch_size: int = 500, backlog_only: bool = False
) -> ReplayResult:
    """Insert the entries of one segment that the store lacks, then delete it. Raises StoreError
    or OSError (the segment stays).

    After a crash (`backlog_only=False`) any entry may be stored already, so known request ids
    are skipped. A running writer reads back only the entries that never were in its queue
    (`backlog_only`): none is stored yet, and a reused request id is kept as a live write keeps it;
    they go in one transaction, so a failure halfway leaves nothing to write twice at the retry.
    """
    entries, torn, bad = await asyncio.to_thread(_read_segment, path, backlog_only)
    replayed = skipped = 0
    step = max(len(entries), 1) if backlog_only else batch_size
    for i in range(0, len(entries), step):
        chunk = entries[i : i + step]
        n = await _write_skipping_rejected(store, chunk, keep_duplicates=backlog_only)
        replayed += n
        skipped += len(chunk) - n
    if bad:
        rejected = path.with_name(path.name.split(".journal.", 1)[0] + ".journal.rejected.jsonl")
        with open(rejected, "ab") as f:
            f.write(b"".join(b + b"\n" for b in bad))
        log.error("ledger: %d unreadable journal line(s) of %s were moved to %s", len(bad), path, rejected)
    path.unlink()
    return ReplayResult(replayed, skipped, torn, 1)


async def replay(store: Store, base: Path, *, batch_size: int = 500) -> ReplayResult:
    """Insert what a previous run journaled and the store lacks, then delete those segments.

    Idempotent: an id already stored is skipped, so a crash during the replay (or between a
    commit and the deletion) inserts nothing twice. Raises StoreError or OSError; a segment
    is deleted only after all its entries are committed.
    """
    replayed = skipped = torn = done = 0
    for path in segments(base):
        # Held for the whole replay: two processes starting at once on one ledger (replicas,
        # `--workers`) must not both replay a segment and trip over its deletion.
        fd = _claim(path)
        if fd is None:
            continue
        try:
            r = await replay_segment(store, path, batch_size=batch_size)
        except FileNotFoundError:
            continue  # replayed and deleted by the other process between its lock and ours
        finally:
            os.close(fd)
        replayed, skipped, torn, done = replayed + r.replayed, skipped + r.skipped, torn + r.torn, done + 1
    if done:
        log.warning(
            "ledger: replayed the journal of an unclean stop: %d request(s) recovered, %d already stored, "
            "%d torn line(s) ignored, from %d segment(s)",
            replayed,
            skipped,
            torn,
            done,
        )
    return ReplayResult(replayed, skipped, torn, done)
