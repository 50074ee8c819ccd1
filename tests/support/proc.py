"""`proxy serve` as a real subprocess, for lifecycle tests."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.sim import SimSettings, SimStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Running:
    """A `proxy serve` process; its stderr goes to a file, so a chatty log never blocks it."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path
    config: Path

    def log_text(self) -> str:
        return self.log.read_text()

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        return await asyncio.wait_for(self.proc.wait(), 15)


@dataclass
class Served:
    run: Running
    db: Path
    stats: SimStats
    settings: SimSettings

    @property
    def proc(self) -> asyncio.subprocess.Process:
        return self.run.proc

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


async def start_proxy(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None, *args: str) -> Running:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp_path / "proxy.log"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            if proc.returncode is not None:
                break
            try:
                async with s.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        return Running(proc, url, log, cfg)
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"proxy did not start: rc={proc.returncode}\n{log.read_text()}")
