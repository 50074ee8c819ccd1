"""The journal: every ledger entry appended to a file beside the database the moment it is
submitted, so that a call whose answer reached the client survives a `kill -9` of the proxy.

`Ledger.submit` appends the entry's JSON line with one `os.write` to an O_APPEND file, before
the request path releases the answer. That costs a few microseconds and no fsync: the data is
in the kernel's page cache as soon as `write` returns, and killing the process does not lose
the page cache (a power cut or kernel crash can: that is the database's `synchronous=NORMAL`
guarantee too). The files are read back at the next start, where the entries the database
does not have yet are inserted (`replay.py`).

The journal is a series of segments, `<db>.journal.<run>.<n>`. When the writer takes a batch
from the queue it starts a new segment if the current one has grown past ROTATE_BYTES, and it
deletes a segment once every entry in it is committed to the store (or spilled, which is
fsynced), so the files stay about as small as the writer's backlog. (Not a segment per batch:
the first writes to a fresh file cost a hundred times more than appends to one.)

When the writer falls far behind, entries past the queue's cap are kept only
here: their segments are pinned, and the writer reads them back once it has caught up
(`backlog_ready`), so memory stays bounded and nothing waits for a restart.

Each segment holds its owner's exclusive flock from before it appears under its name until it
is deleted: a replay skips a segment that another running proxy still owns (several replicas or
workers may share one ledger path), and the kernel drops the lock when its owner dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("proxy.ledger")

_SPILL_SUFFIX = ".spill.jsonl"
NOT_JOURNALED = -1  # the segment number of entries the journal could not write
ROTATE_BYTES = 1 << 20  # ~1,200 entries per segment
# Starts the line of an entry that is only in the journal (the queue was full): reading the
# backlog back takes just those, so it needs no guess from request ids about what was stored.
BACKLOG = b"~"


def journal_base(spill: Path) -> Path:
    """`<db>.journal`, beside the store's spill file `<db>.spill.jsonl`."""
    return spill.with_name(spill.name.removesuffix(_SPILL_SUFFIX) + ".journal")


def segments(base: Path) -> list[Path]:
    prefix = base.name + "."
    try:
        return sorted(p for p in base.parent.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".jsonl"))
    except FileNotFoundError:
        return []


class Journal:
    """The segments of one running ledger. Not thread-safe: the event loop's thread only.

    `append` must be called once for every entry the writer queues, in queue order, and
    `committed(n)` once the first n of them are durable elsewhere: the journal keeps, per
    segment, how many queued entries it holds, and deletes a segment when that reaches 0.
    """

    def __init__(self, base: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.base = base
        self._rotate_bytes = rotate_bytes
        self._run = time.time_ns()
        self._seq = 0
        self._fd = -1  # the current segment's
        self._fds: dict[int, int] = {}  # every segment not yet deleted -> its descriptor, holding its lock
        self._size = 0  # bytes in the current segment, to cut a short write back to whole lines
        self._paths: dict[int, Path] = {}  # segments of this run not yet deleted
        self._runs: deque[list[int]] = deque()  # [segment, queued entries] in queue order
        self._failing = False
        self._keep = False  # something was lost elsewhere: keep every segment for the next start
        self._pinned: dict[int, int] = {}  # segment -> entries in it that are only on disk

    @property
    def segment_count(self) -> int:
        return len(self._paths)

    def open(self) -> None:
        self._open_next()

    def append(self, line: bytes, *, queue: bool = True) -> bool:
        """Write one entry's line (one `os.write` unless the kernel takes it in parts). Returns
        whether the caller must queue the entry: unless `queue` is False and the line was written
        (the queue is full: the writer reads it back from here later)."""
        data = line + b"\n" if queue else BACKLOG + line + b"\n"
        seg = self._write(data) if self._fd >= 0 else NOT_JOURNALED
        if not queue and seg != NOT_JOURNALED:
            self._pinned[seg] = self._pinned.get(seg, 0) + 1
            return False
        runs = self._runs
        if runs and runs[-1][0] == seg:
            runs[-1][1] += 1
        else:
            runs.append([seg, 1])
        return True

    def _write(self, data: bytes) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no half line for the next one to glue onto
            self._failed(f"cannot append to {self._paths.get(self._seq)}: {e}")
            return NOT_JOURNALED
        self._size += len(data)
        if self._failing:
            self._failing = False
            log.warning("ledger: the journal is writable again")
        return self._seq

    def rotate(self, *, force: bool = False) -> None:
        """Once the current segment is large enough (or `force`), new entries go to a fresh one, so
        the current one can be deleted once the entries in it are committed."""
        if self._fd < 0 or (self._size >= self._rotate_bytes or (force and self._size > 0)):
            self._open_next()

    def committed(self, n: int) -> None:
        """The first `n` queued entries are durable in the store or the spill file."""
        runs = self._runs
        while n > 0 and runs:
            take = min(n, runs[0][1])
            runs[0][1] -= take
            n -= take
            if runs[0][1] == 0:
                runs.popleft()
        self._release()

    @property
    def backlog(self) -> int:
        """Entries only on disk, not in the writer's queue."""
        return sum(self._pinned.values())

    def backlog_ready(self) -> list[Path]:
        """Pinned segments the queue no longer needs: the writer reads their entries back (those
        already stored are skipped) and calls `replayed` for each."""
        if not self._pinned:
            return []
        if self._seq in self._pinned:
            self.rotate(force=True)
        needed = {seg for seg, count in self._runs if count}
        return [self._paths[s] for s in sorted(self._pinned) if s not in needed and s != self._seq]

    def replayed(self, path: Path) -> None:
        """`path` (from backlog_ready) was read back into the store and deleted."""
        seg = next(s for s, p in self._paths.items() if p == path)
        self._pinned.pop(seg, None)
        del self._paths[seg]
        self._unlock(seg)

    def keep(self) -> None:
        """Entries were lost by the store and the spill file: leave every segment for a replay."""
        if not self._keep:
            self._keep = True
            log.error("ledger: the journal %s.* is kept for the next start to replay", self.base)

    def close(self) -> None:
        """After the last batch: delete what is committed, keep the rest (unlocked) for the next start."""
        self._release(final=True)
        self._close_fds()

    def _release(self, *, final: bool = False) -> None:
        if self._keep:
            return
        needed = {seg for seg, count in self._runs if count}.union(self._pinned)
        for seg in [s for s in self._paths if s not in needed and (final or s != self._seq)]:
            with contextlib.suppress(FileNotFoundError):
                self._paths[seg].unlink()
            del self._paths[seg]
            self._unlock(seg)  # after the unlink: never there and unlocked while this process lives

    def _open_next(self) -> None:
        path = self.base.with_name(f"{self.base.name}.{self._run}.{self._seq + 1}")
        # Created and locked under a name no replay lists, then linked into place: a replay by
        # another process starting on this ledger that saw it unlocked would delete it as a dead run's.
        fresh = self.base.with_name(f"{self.base.name}-new.{self._run}.{self._seq + 1}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            self._failed(f"cannot create {path}: {e}")  # the current segment, if any, goes on
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows the name yet
            os.link(fresh, path)  # not rename: fails rather than replace an existing segment
        except OSError as e:
            os.close(fd)
            self._failed(f"cannot create {path}: {e}")
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(fresh)
        self._seq += 1
        self._fd, self._size = fd, 0
        self._paths[self._seq], self._fds[self._seq] = path, fd
        self._release()  # the previous segment keeps its lock until it is deleted

    def _unlock(self, seg: int) -> None:
        fd = self._fds.pop(seg, -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if fd == self._fd:
            self._fd = -1

    def _close_fds(self) -> None:
        """Every descriptor, and with them the locks (as when the process dies)."""
        for seg in list(self._fds):
            self._unlock(seg)

    def _failed(self, why: str) -> None:
        if not self._failing:
            self._failing = True
            log.error("ledger: journal: %s; rows are still queued, but a crash now would lose them", why)
