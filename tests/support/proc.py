"""`proxy` as a real subprocess: `ProxyProc` for `proxy serve` (lifecycle, fault matrix, soak,
fuzzing), `run_cli` for the other subcommands, and the loopback ports they need."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.sim import SimSettings, SimStats

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connection refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


@dataclass
class ProxyProc:
    """A `proxy serve` subprocess; its stderr goes to a file, so a chatty log never blocks it.
    Its RSS and open file descriptors are read from /proc."""

    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    config_path: Path
    ledger_path: str | None

    @classmethod
    def start(
        cls,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        *args: str,
        timeout: float = 15.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> ProxyProc:
        """Write `config` to workdir/proxy.yaml, serve it on a free port with `args` added, and
        return once /healthz answers 200. `env` is added to this process' environment;
        `preexec_fn` runs in the child before it starts (e.g. to set its resource limits)."""
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "proxy.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))  # tier order is chain order
        log = workdir / "proxy.log"
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), "--port", str(port), *args]
        with log.open("ab") as err:  # appended: a restart in the same workdir keeps the first run's log
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                preexec_fn=preexec_fn,
            )
        proc = cls(popen, f"http://127.0.0.1:{port}", log, cfg, config.get("ledger", {}).get("path"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{proc.url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.02)
        proc.kill()
        raise AssertionError(f"proxy did not start (rc={popen.returncode}):\n{proc.log_text()}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def db(self) -> Path:
        assert self.ledger_path is not None, "started without ledger.path"
        return Path(self.ledger_path)

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def terminate(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    async def wait(self, timeout: float) -> int:
        """The exit status, waited for off the event loop (which may be serving the upstreams)."""
        return await asyncio.to_thread(self.popen.wait, timeout)

    async def stop(self) -> int:
        """SIGTERM, then the exit status."""
        return await asyncio.to_thread(self.terminate)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds_by_peer(self, ports: Iterable[int]) -> tuple[int, int]:
        """(open fds, of which TCP sockets connected to one of `ports`: the upstream keep-alive pool)."""
        peers = _socket_peer_ports()
        wanted = set(ports)
        total = upstream = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            total += 1
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:[") and peers.get(int(target[8:-1])) in wanted:
                upstream += 1
        return total, upstream


def _socket_peer_ports() -> dict[int, int]:
    """socket inode -> remote port, for this network namespace's TCP sockets."""
    out: dict[int, int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            out[int(cols[9])] = int(cols[2].rsplit(":", 1)[1], 16)
    return out


async def start_proxy(
    tmp_path: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    *args: str,
    preexec_fn: Callable[[], None] | None = None,
) -> ProxyProc:
    """ProxyProc.start from a test's event loop, which keeps serving (e.g. the upstreams) meanwhile."""
    return await asyncio.to_thread(
        functools.partial(ProxyProc.start, tmp_path, config, env, *args, preexec_fn=preexec_fn)
    )


@dataclass
class Served:
    run: ProxyProc
    db: Path
    stats: SimStats
    settings: SimSettings

    @property
    def url(self) -> str:
        return self.run.url


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> tuple[int, str, str]:
    """`proxy ARGS...` to completion: (exit status, stdout, stderr). `env` replaces the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_proxies(
    tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None, n: int, *, together: bool = True
) -> list[ProxyProc]:
    """`n` replicas of one config (workdirs tmp_path/r0, r1, ...), started at once or one after
    the other. If one does not start, those that did are killed before its error is raised, so
    none outlives the test (a bare gather left them running)."""
    results: list[ProxyProc | BaseException] = []
    if together:
        starts = (start_proxy(tmp_path / f"r{i}", config, env) for i in range(n))
        results.extend(await asyncio.gather(*starts, return_exceptions=True))
    else:
        for i in range(n):
            try:
                results.append(await start_proxy(tmp_path / f"r{i}", config, env))
            except AssertionError as e:  # what ProxyProc.start raises
                results.append(e)
                break
    procs = [r for r in results if isinstance(r, ProxyProc)]
    failed = [r for r in results if not isinstance(r, ProxyProc)]
    if failed:
        for p in procs:
            p.kill()
        raise failed[0]
    return procs
