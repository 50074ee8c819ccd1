"""`proxy serve --workers N`: a supervisor process and N forked workers serving one port.

- **One port, SO_REUSEPORT.** Each worker binds its own listening socket with SO_REUSEPORT and
  the kernel spreads new connections evenly over them (by a hash of the connection): no
  thundering herd, no worker that happens to wake first taking a whole burst, as with one
  pre-forked socket that every worker polls. The supervisor holds the port with a socket that is
  bound but does not listen (never given a connection): port 0 resolves once, and a restarting
  worker finds the port still ours. Connections waiting in the backlog of a worker that crashes
  are reset; a graceful stop loses none (each worker drains what it accepted).
- **Shared state.** With `state.url` the workers share that Redis. Without it the supervisor
  starts a private redis-server on a Unix socket (proxy/ops/local_state.py) and hands it to the
  workers as `state.url`, so budgets, client keys' rates and daily caps, and breakers hold across
  them exactly as across replicas. Either way each worker is told N (`state.processes` raised to
  at least N): if Redis stops answering before its heartbeat saw the others (worker 0 starts
  alone), it still takes only its 1/N share of the budgets (proxy/state/spend.py). The ledger
  is shared as it is: the same SQLite file in WAL mode (several writers, each waiting up to
  ledger.busy_timeout_ms for the lock; each with its own journal segments) or PostgreSQL.
- **Signals.** SIGTERM/SIGINT: sent to every worker, which stops gracefully (requests in flight
  finish, the ledger drains); the supervisor exits when all have, 0 if all exited 0. Workers
  still running `shutdown_timeout_seconds` + 10 s later are killed. SIGHUP: sent to every worker
  (each reloads the config file). Workers get SIGTERM if the supervisor dies (Linux).
- **A worker that dies is restarted**, logged as an error, unless it exited with status 2 (the
  config or the ledger is unusable: restarting will not help; the supervisor stops all and exits
  2) or more than RESTARTS_ALLOWED restarts happened within RESTART_WINDOW seconds (it exits 1).
- **Metrics cover every worker**: each serves its own on a Unix socket in a directory of the
  supervisor's (mode 0700, removed at exit), and the one that answers /metrics merges them all,
  labelled `worker="<index>"` (proxy/ops/worker_metrics.py). /readyz and /proxy/report are
  answered by whichever worker accepted the connection; every response carries
  `X-Proxy-Worker: <pid>`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import msgspec

from proxy.config import Config
from proxy.ops.affinity import pin, worker_cpus
from proxy.ops.listener import bind
from proxy.ops.local_state import INSTALL_HINT, PrivateRedis, die_with_parent, redis_binary
from proxy.ops.worker_metrics import Worker

log = logging.getLogger("proxy")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESTARTS_ALLOWED = 5
RESTART_WINDOW = 60.0
KILL_GRACE_SECONDS = 10.0
PRIVATE_TIMEOUT_MS = 2000  # state.timeout_ms for the private state, at least

READY_SECONDS = 60.0  # the first worker's start (it replays what a crash left in the journal)

# Runs one worker to its exit status: (config, which worker, port, call once listening) -> status.
RunWorker = Callable[[Config, Worker, int, Callable[[], None]], int]


def supervise(config: Config, n: int, host: str, port: int, run_worker: RunWorker) -> int:
    binary = None
    if config.state.url is None:
        binary = redis_binary()
        if binary is None:
            log.error(
                "--workers %d without state.url: the workers need a shared state for budgets and client limits "
                "to hold across them, and no redis-server was found: %s",
                n,
                INSTALL_HINT,
            )
            return 2
    try:
        hold = bind(host, port, 0, reuse_port=True, listen=False)
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", host, port, e)
        return 1
    port = hold[0].getsockname()[1]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def unblock() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    redis = None if binary is None else PrivateRedis(binary, before_exec=unblock)
    sockets = Path(tempfile.mkdtemp(prefix="proxy-workers-"))  # mode 0700: the workers' metrics sockets
    try:
        # N processes share the state at least: a worker that loses Redis before its heartbeat
        # saw the others (worker 0 starts alone) must still count them.
        state = msgspec.structs.replace(config.state, processes=max(config.state.processes, n))
        config = dataclasses.replace(config, state=state)
        if redis is not None:
            redis.start()
            # A local Redis that died refuses at once; one that is slow to answer is this machine's
            # loop busy under a burst, where the default 250 ms would fall back for nothing.
            timeout = max(config.state.timeout_ms, PRIVATE_TIMEOUT_MS)
            state = msgspec.structs.replace(config.state, url=redis.url, timeout_ms=timeout)
            config = dataclasses.replace(config, state=state)
        return Supervisor(config, n, port, run_worker, hold, old_mask, redis, sockets).run()
    except RuntimeError as e:
        log.error("workers: %s", e)
        return 1
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        if redis is not None:
            redis.remove()
        for s in hold:
            s.close()
        unblock()


class Supervisor:
    def __init__(
        self,
        config: Config,
        n: int,
        port: int,
        run_worker: RunWorker,
        hold: list[socket.socket],
        mask: set[int | signal.Signals],
        redis: PrivateRedis | None,
        sockets: Path,
    ) -> None:
        self.config, self.n, self.port = config, n, port
        self.sockets = sockets
        self.run_worker = run_worker
        self.hold, self.mask, self.redis = hold, mask, redis
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.restarts: deque[float] = deque()
        self.stopping = False
        self.code = 0
        self.kill_at = float("inf")
        self.pid = os.getpid()
        self.cpus = worker_cpus(config.server.worker_affinity, n)

    def run(self) -> int:
        # The first worker alone, until it listens: it replays the journal an unclean stop left,
        # which several processes starting at once would race over.
        self._spawn(0, wait=True)
        for i in range(1, self.n):
            self._spawn(i)
        if self.cpus is not None:
            where = ", ".join(f"worker {i} on CPU {c}" for i, c in enumerate(self.cpus))
            log.info("workers: each runs on its own CPU: %s (server.worker_affinity: off lets them move)", where)
        log.info(
            "workers: %d serving port %d (supervisor pid %d; metrics sockets in %s)",
            self.n,
            self.port,
            self.pid,
            self.sockets,
        )
        while True:
            info = signal.sigtimedwait(SIGNALS, 0.5)
            if info is not None:
                self._on_signal(info.si_signo)
            self._reap()
            if self.stopping:
                if not self.workers:
                    log.info("workers: all stopped")
                    return self.code
                if time.monotonic() > self.kill_at:
                    self._kill_left()
            else:
                self._check_redis()

    def _on_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            log.info("workers: %s: stopping all %d workers", signal.Signals(sig).name, len(self.workers))
            self._stop(0)
        elif sig == signal.SIGHUP:
            log.info("workers: SIGHUP: each of the %d workers reloads the config", len(self.workers))
            self._send(signal.SIGHUP)

    def _send(self, sig: signal.Signals) -> None:
        for pid in self.workers:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop(self, code: int) -> None:
        self.stopping, self.code = True, code
        self.kill_at = time.monotonic() + self.config.server.shutdown_timeout_seconds + KILL_GRACE_SECONDS
        self._send(signal.SIGTERM)

    def _kill_left(self) -> None:
        log.error("workers: %d did not stop in time: killed (pids %s)", len(self.workers), sorted(self.workers))
        self._send(signal.SIGKILL)
        self.kill_at = float("inf")
        self.code = self.code or 1

    def _reap(self) -> None:
        for pid in list(self.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            index = self.workers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    log.error("workers: worker %d (pid %d) exited with status %d", index, pid, code)
                    self.code = self.code or 1
                continue
            self._died(index, pid, code)

    def _died(self, index: int, pid: int, code: int) -> None:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        if code == 2:
            log.error("workers: worker %d (pid %d) %s (config or ledger unusable): stopping all", index, pid, how)
            self._stop(2)
            return
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= RESTARTS_ALLOWED:
            log.error(
                "workers: worker %d (pid %d) %s; %d restarts within %gs already: stopping all",
                index,
                pid,
                how,
                len(self.restarts),
                RESTART_WINDOW,
            )
            self._stop(1)
            return
        self.restarts.append(now)
        log.error("workers: worker %d (pid %d) %s: restarting it", index, pid, how)
        self._spawn(index)

    def _check_redis(self) -> None:
        redis = self.redis
        if redis is None or redis.popen is None or redis.popen.poll() is None:
            return
        log.error(
            "workers: the private state (pid %d) exited with status %s: restarting it; meanwhile each worker "
            "keeps its share of the budgets and limits. %s",
            redis.popen.pid,
            redis.popen.returncode,
            redis.log_tail(),
        )
        try:
            redis.start()
        except RuntimeError as e:
            log.error("workers: %s: stopping all", e)
            self._stop(1)

    def _spawn(self, index: int, *, wait: bool = False) -> None:
        for h in logging.getLogger().handlers:
            h.flush()  # nothing buffered is inherited, to be written twice
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            self._child(index, w)
        os.close(w)
        self.workers[pid] = index
        log.info("workers: worker %d started (pid %d)", index, pid)
        try:
            if wait:  # a byte once it listens; end of file if it dies first
                ready, _, _ = select.select([r], [], [], READY_SECONDS)
                if ready:
                    os.read(r, 1)
        finally:
            os.close(r)

    def _child(self, index: int, ready_fd: int) -> None:
        code = 70
        try:
            for s in self.hold:
                s.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            die_with_parent()
            if os.getppid() != self.pid:  # the supervisor died before the line above
                code = 1
                return
            if self.cpus is not None:
                pin(self.cpus[index])

            def ready() -> None:
                with suppress(OSError):
                    os.write(ready_fd, b"1")
                    os.close(ready_fd)

            code = self.run_worker(self.config, Worker(index, self.n, self.sockets), self.port, ready)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("workers: worker %d failed", index)
        finally:
            with suppress(Exception):
                logging.shutdown()
            os._exit(code)
