"""The ledger's journal's own rules (idempotent replay, a torn last line, rotation, live segments);
that an answered call survives `kill -9` of a real `proxy serve` under load is in
tests/test_adversarial.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

from proxy.ledger import Ledger, LedgerEntry, Pricer, SqliteStore
from proxy.ledger.journal import Journal, journal_base
from proxy.ledger.replay import replay
from tests.test_ledger import call, make_config

TIERS = ("llama", "ollama", "kimi")


def segments(db: Path) -> list[Path]:
    base = journal_base(Path(f"{db}.spill.jsonl"))
    return sorted(p for p in db.parent.iterdir() if p.name.startswith(base.name + ".") and "rejected" not in p.name)


def entries(n: int, prefix: str = "r") -> list[LedgerEntry]:
    pricer = Pricer(make_config())
    return [pricer.entry(call(f"{prefix}-{i}")) for i in range(n)]


def ids(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM requests")}


async def stored(db: Path, es: list[LedgerEntry]) -> None:
    store = SqliteStore(db)
    await store.open()
    try:
        await store.write(es)
    finally:
        await store.close()


async def replayed(db: Path) -> tuple[int, int, int, int]:
    store = SqliteStore(db)
    await store.open()
    try:
        r = await replay(store, journal_base(store.spill_path))
    finally:
        await store.close()
    return r.replayed, r.skipped, r.torn, r.segments


def journal_of(db: Path, es: list[LedgerEntry], rotate_bytes: int = 1 << 20) -> Journal:
    j = Journal(journal_base(Path(f"{db}.spill.jsonl")), rotate_bytes=rotate_bytes)
    j.open()
    for e in es:
        j.append(e.to_json())
    return j


def release(j: Journal) -> None:
    """The journal of a process that died: its fd (and with it the flock) is gone."""
    j._close_fds()


# ---------------------------------------------------------------------------- the journal's rules


async def test_replay_inserts_what_is_missing_once(tmp_path: Path) -> None:
    """A crash after 3 of 5 journaled entries were committed: the replay adds the other 2 (with their
    attempt rows), deletes the segment, and a second replay (or one that re-reads it) adds nothing."""
    db = tmp_path / "ledger.db"
    es = entries(5)
    await stored(db, es[:3])
    j = journal_of(db, es)
    release(j)
    seg, kept = segments(db)[0], tmp_path / "copy"
    shutil.copy(seg, kept)
    assert await replayed(db) == (2, 3, 0, 1)
    assert ids(db) == {f"r-{i}" for i in range(5)} and segments(db) == []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 5
        assert conn.execute("SELECT sum(calls) FROM daily_usage").fetchone()[0] == 5
    assert await replayed(db) == (0, 0, 0, 0)
    shutil.copy(kept, seg)  # as if the last replay died between its commit and the unlink
    assert await replayed(db) == (0, 5, 0, 1)
    assert len(ids(db)) == 5


async def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    """kill -9 in the middle of a write: the half line was never acknowledged; the lines before it are
    replayed and nothing goes to the rejected file. A broken line in the middle is kept aside."""
    db = tmp_path / "ledger.db"
    es = entries(3)
    j = journal_of(db, es)
    release(j)
    seg = segments(db)[0]
    whole = es[2].to_json()
    with open(seg, "ab") as f:
        f.write(whole[: len(whole) // 2])
    assert await replayed(db) == (3, 0, 1, 1)
    assert not list(tmp_path.glob("*.rejected.jsonl"))
    j = journal_of(db, entries(1, "late"))
    release(j)
    with open(segments(db)[0], "r+b") as f:
        good = f.read()
        f.seek(0)
        f.write(b"{not json\n" + good)
    assert await replayed(db) == (1, 0, 0, 1)
    assert Path(f"{db}.journal.rejected.jsonl").read_bytes() == b"{not json\n"


async def test_rotation_deletes_a_segment_once_all_its_entries_are_committed(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    j = journal_of(db, entries(3, "a"), rotate_bytes=2000)
    first = segments(db)
    j.rotate()  # the writer takes its batch of 3; the segment is past 2000 bytes
    for e in entries(2, "b"):
        j.append(e.to_json())
    assert len(segments(db)) == 2
    j.committed(2)
    assert segments(db)[0] == first[0], "one entry of the first segment is not committed yet"
    j.committed(1)
    assert first[0] not in segments(db) and len(segments(db)) == 1
    j.rotate()  # 2 entries, not past 2000 bytes yet: the segment goes on
    assert len(segments(db)) == 1
    j.append(entries(1, "c")[0].to_json())
    j.rotate()
    j.rotate(force=True)  # nothing appended since: no empty segment is made
    assert len(segments(db)) == 2
    j.committed(3)
    assert len(segments(db)) == 1, "the current segment stays open for the next entry"
    j.close()
    assert segments(db) == []


async def test_close_keeps_what_is_not_committed_and_a_live_segment_is_not_replayed(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    j = journal_of(db, entries(2))
    assert await replayed(db) == (0, 0, 0, 0), "another running process holds the segment"
    assert len(segments(db)) == 1
    j.committed(1)
    j.close()
    assert len(segments(db)) == 1
    assert await replayed(db) == (2, 0, 0, 1)


async def test_ledger_killed_before_its_writer_ran_recovers_every_row(tmp_path: Path) -> None:
    """The writer never got to the queue (a long linger, then the process "dies": its task is
    cancelled and nothing is closed); the next start has every row before it serves."""
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(), db, linger=60)
    await ledger.start()
    for i in range(50):
        ledger.submit(call(f"k-{i}"))
    assert ledger.stats.written == 0
    assert ledger._task is not None and ledger._journal is not None
    ledger._task.cancel()
    release(ledger._journal)
    await ledger.store.close()
    again = Ledger(make_config(), db)
    await again.start()
    try:
        assert ids(db) == {f"k-{i}" for i in range(50)}
        assert again.stats.imported == 50
    finally:
        await again.close()
    assert segments(db) == [], "a clean close leaves no journal"


async def test_a_clean_close_and_a_busy_writer_keep_the_journal_small(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(batch_size=50), db, linger=0.001)
    await ledger.start()
    for round_ in range(20):
        for i in range(50):
            ledger.submit(call(f"b-{round_}-{i}"))
        await ledger.flush()
        assert len(segments(db)) <= 2, "committed segments are deleted as the writer goes"
    await ledger.close()
    assert segments(db) == [] and len(ids(db)) == 1000


# ---------------------------------------------------------------------------- kill -9 under load


async def test_past_the_queue_cap_rows_wait_in_the_journal_and_are_all_stored(tmp_path: Path) -> None:
    """The writer is far behind (cap 10): the queue stays at 10, the rest is journaled only and counted
    in queue_depth; once the writer catches up every row is stored once (a reused request id too, as
    a live write keeps it) and the journal is gone."""
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(batch_size=10), db, linger=0.001, max_queued=10)
    await ledger.start()
    for i in range(100):
        ledger.submit(call(f"c-{i}"))
    ledger.submit(call("c-0"))  # a client reusing an X-Request-Id
    assert len(ledger._queue) == 10 and ledger.stats.queue_depth == 101
    await ledger.flush()
    assert ledger.stats.queue_depth == 0 and ledger.stats.written == 101
    got = ids(db)
    assert len(got) == 101 and {f"c-{i}" for i in range(100)} <= got
    await ledger.close()
    assert segments(db) == []


async def test_rows_only_in_the_journal_survive_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = Ledger(make_config(), db, linger=60, max_queued=5)
    await ledger.start()
    for i in range(40):
        ledger.submit(call(f"j-{i}"))
    assert ledger._task is not None and ledger._journal is not None
    ledger._task.cancel()
    release(ledger._journal)
    await ledger.store.close()
    again = Ledger(make_config(), db)
    await again.start()
    await again.close()
    assert ids(db) == {f"j-{i}" for i in range(40)}


async def test_a_replay_never_takes_a_segment_another_process_is_creating(tmp_path: Path) -> None:
    """Replicas (or a restarted worker) starting on a ledger whose journal another running process
    rotates: every segment of a live process is locked from before it appears to its deletion.
    A fresh one seen unlocked before its flock was claimed by the replay and deleted: the running
    process then failed to start (its flock refused) or appended to a deleted file, lost at its
    next crash; a rotated-away one (unlocked) with entries not yet written was replayed, and the
    writer then stored them again, renamed."""
    db = tmp_path / "ledger.db"
    base = journal_base(Path(f"{db}.spill.jsonl"))
    line = entries(1, "live")[0].to_json()
    live = Journal(base, rotate_bytes=1)  # a new segment after every entry
    stop = threading.Event()
    problems: list[str] = []

    def rotate_all_the_time() -> None:
        appended = 0
        while not stop.is_set():
            try:
                live.rotate()
            except OSError as e:  # BlockingIOError: the replay held the lock of the fresh file
                problems.append(f"rotate: {e!r}")
                return
            live.append(line)
            appended += 1
            if appended > 3:  # a writer 3 entries behind: rotated-away segments still hold some
                live.committed(1)
            current = live._paths[live._seq]
            if not current.exists() or os.stat(current).st_ino != os.fstat(live._fd).st_ino:
                problems.append(f"{current.name} was deleted while in use")
                return

    store = SqliteStore(db)
    await store.open()
    rotating = threading.Thread(target=rotate_all_the_time)
    rotating.start()
    try:
        for _ in range(400):
            await replay(store, base)
            if problems:
                break
    finally:
        stop.set()
        rotating.join(5)
        await store.close()
    assert problems == []
    assert live.segment_count >= 1 and ids(db) == set(), "no live entry was taken for a dead run's"
