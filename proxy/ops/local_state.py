"""The workers' shared state when no `state.url` is configured: a private redis-server (or
valkey-server) started by `proxy serve --workers N` and given to its workers as `state.url`.

Why a private Redis rather than a new mechanism: the rules that must hold across processes
(budget reservations, each client key's rate and daily cap, breakers with one probe) already
run atomically in Redis (proxy/state/), tested across replicas; a second implementation over
the SQLite file or a pipe to the supervisor would be a second set of rules to get right.

- It listens on a Unix socket only (`--port 0`), in a directory only this user can enter
  (mode 0700, the socket 0700): nothing on the network reaches it.
- No persistence: the counters are seeded from the ledger when missing, as after any Redis
  restart (proxy/state/spend.py), so nothing is lost if it dies; the supervisor restarts it
  and the workers rejoin (meanwhile each keeps its share, 1/N, of what was left).
- It dies with the supervisor (PR_SET_PDEATHSIG on Linux), so a `kill -9` leaves no orphan.
- Cost: one more process (a few MB of memory) and one round trip over the Unix socket (tens of
  microseconds) per paid attempt's reservation and per rate-limited request.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("proxy")

START_SECONDS = 5.0
INSTALL_HINT = "install redis-server (apt-get install redis-server) or valkey-server, or set state.url"


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """In a child before exec (or right after fork): get `sig` when the parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


class PrivateRedis:
    def __init__(self, binary: str, before_exec: Callable[[], None] | None = None) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="proxy-state-"))  # mode 0700
        self.socket = self.dir / "redis.sock"
        self.popen: subprocess.Popen[bytes] | None = None
        self._before_exec = before_exec

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def start(self) -> None:
        argv = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        argv += ["--loglevel", "warning", "--logfile", str(self.dir / "redis.log")]

        def child() -> None:
            if self._before_exec is not None:
                self._before_exec()
            die_with_parent()

        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child
        )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            if self.ping():
                log.info("workers: private state in %s (pid %d, Unix socket only)", self.binary, self.popen.pid)
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.binary} did not start: {self.log_tail() or 'no log'}")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.2)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-1000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen is not None and self.popen.returncode is None:
            self.popen.terminate()
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(3)
        self.popen = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
