"""Processes: tools on PATH, pinned services, readiness, and /proc accounting."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROXY_CORE = 0  # the proxy under test (and LiteLLM)
LOAD_CORE = 1  # upstream, load generator, stream clients, this orchestrator

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def ensure_apt(packages: dict[str, str]) -> None:
    """Install missing tools ({binary: debian package}) with apt-get when root; say what is missing."""
    missing = {b: p for b, p in packages.items() if shutil.which(b) is None}
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"not root or no apt-get: cannot install {', '.join(sorted(missing))}")
        return
    pkgs = sorted(set(missing.values()))
    say(f"installing {' '.join(pkgs)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *pkgs]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(cmd, env=env, capture_output=True, check=False)
    for b in missing:
        if shutil.which(b) is None:
            say(f"could not install {b}")


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if shutil.which("taskset") else argv


def pin_self(core: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A server run as our own child process, stopped by its pid only."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 60.0, health: str | None = None) -> Service:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            if ready(self.port, health):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up on port {self.port} in {timeout:.0f}s; see {self.log}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal our process (and its own group), wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop in {timeout:.0f}s after {signal.Signals(sig).name}: killing pid {self.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            return self.proc.wait(10)


def ready(port: int, health: str | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if health is None:
                return True
            s.sendall(f"GET {health} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
    except OSError:
        return False


def tree(pid: int) -> list[int]:
    """pid and all its descendants (LiteLLM may fork a worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process tree, from /proc/PID/stat."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def busy_seconds() -> tuple[float, float]:
    """(task CPU time of the whole machine, steal time), from /proc/stat. Interrupt and softirq time
    (loopback TCP is much of it) is left out: the kernel charges it to no process, ours included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system) / _CLK_TCK, steal / _CLK_TCK


def own_seconds(pids: set[int]) -> float:
    """CPU time of this process, its finished children (wrk, stream clients) and the running services."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(cpu_seconds(p) for p in pids)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) summed over the process tree, in MB."""
    out = {"rss_mb": 0.0, "peak_rss_mb": 0.0}
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    out["rss_mb"] += int(value.split()[0]) / 1024
                elif key == "VmHWM":
                    out["peak_rss_mb"] += int(value.split()[0]) / 1024
    return out


def tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0].strip() if text else None


def python_module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
