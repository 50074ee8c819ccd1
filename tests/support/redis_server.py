"""A real redis-server (Debian's `redis-server` package) on a free loopback port, in a temporary
directory, with no persistence: a restart comes back empty, as a crashed Redis without AOF does.

Without the binary the tests that need it are skipped, or fail with the install command when
PROXY_REQUIRE_REDIS=1 (.ci/run sets it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.proc import free_port

REQUIRE = "PROXY_REQUIRE_REDIS"
INSTALL = "apt-get install -y redis-server"


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found is None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"redis-server is not installed ({REQUIRE}=1): {INSTALL}")
        pytest.skip(f"redis-server is not installed: {INSTALL}")
    return found


@dataclass
class RedisServer:
    binary: str
    workdir: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_in(cls, workdir: Path) -> RedisServer:
        server = cls(redis_binary(), workdir, free_port())
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"]
        with (self.workdir / "redis.log").open("ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.01)
        raise AssertionError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: its data is gone (no persistence)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (the tests' view of what is stored)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(payload.encode())
            time.sleep(0.02)
            return s.recv(65536)
