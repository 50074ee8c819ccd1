"""Limits that hold at the OS level, through the real `proxy serve` process: the open-files limit
(raised, exhaustion logged and survived), `server.max_connections` (refused cleanly past it), and
a ledger that cannot be used stopping the start instead of counting budgets from $0."""

from __future__ import annotations

import asyncio
import re
import resource
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.sim import SimSettings, create_sim_app
from tests.support.proc import ProxyProc, run_cli, start_proxy

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def upstream_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    server = await aiohttp_server(create_sim_app(SimSettings(name="llama")))
    return str(server.make_url("/v1"))


def config(tmp_path: Path, upstream_url: str, **server: Any) -> dict[str, Any]:
    return {
        "tiers": {"llama": {"base_url": upstream_url, "model": "m", "timeout_seconds": 2, "max_connections": 8}},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "server": {"shutdown_timeout_seconds": 2, **server},
    }


@pytest.fixture
async def procs() -> AsyncIterator[list[ProxyProc]]:
    started: list[ProxyProc] = []
    yield started
    for p in started:
        await asyncio.to_thread(p.kill)


def nofile(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return set_limit


async def connect(url: str) -> Conn:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def get(conn: Conn, path: str, timeout: float = 3) -> tuple[int, bytes]:
    """One keep-alive GET on an open connection: (status, body)."""
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        return int(head.split()[1]), await reader.readexactly(length)


async def wait_for_log(proc: ProxyProc, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proc.log_text()
        if text in log:
            return log
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} not logged within {timeout} s:\n{proc.log_text()[-3000:]}")


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


async def test_out_of_descriptors_is_logged_once_per_burst_and_survived(
    tmp_path: Path, upstream_url: str, procs: list[ProxyProc]
) -> None:
    """Hard limit 128: 200 idle clients use every descriptor. The proxy says so (once, not per
    failed accept), new clients wait in the backlog, and once the idle ones leave they are served."""
    proc = await start_proxy(tmp_path, config(tmp_path, upstream_url), preexec_fn=nofile(128))
    procs.append(proc)
    log = proc.log_text()
    assert "open files limit: 128" in log
    assert "leaves room for about" in log and "server.max_connections is 10000" in log  # the start warns
    # ~110 are accepted, the rest wait in the backlog (128): more would make connect() itself
    # wait for SYN retries, seconds each.
    idle = [await connect(proc.url) for _ in range(200)]
    try:
        log = await wait_for_log(proc, "cannot accept connections: out of file descriptors")
        await asyncio.sleep(0.5)  # five paused accept rounds at least
        log = proc.log_text()
        assert log.count("out of file descriptors") == 1, "one line per burst, not one per failed accept"
        assert "Raise the open-files limit" in log
        assert proc.fd_count() >= 120, "the descriptors really ran out"
        assert proc.alive()
    finally:
        close_all(idle)
    fresh = await connect(proc.url)
    assert (await get(fresh, "/healthz", timeout=5))[0] == 200
    metrics = (await get(fresh, "/metrics"))[1].decode()
    refused = re.search(r'proxy_connections_refused_total\{reason="out_of_descriptors"\} (\S+)', metrics)
    assert refused is not None and float(refused.group(1)) >= 1, metrics[:2000]
    close_all([fresh])
    assert await proc.stop() == 0


async def test_connections_past_max_connections_get_a_503_and_are_closed(
    tmp_path: Path, upstream_url: str, procs: list[ProxyProc]
) -> None:
    """server.max_connections: 20 and 40 clients: 20 are served (and keep being served), the other
    20 get a 503 in OpenAI's format and EOF at once, and the refusals are counted and logged once."""
    proc = await start_proxy(tmp_path, config(tmp_path, upstream_url, max_connections=20))
    procs.append(proc)
    first = [await connect(proc.url) for _ in range(20)]
    for conn in first:
        assert (await get(conn, "/healthz"))[0] == 200
    extra = [await connect(proc.url) for _ in range(20)]
    started = time.monotonic()
    for reader, _ in extra:
        async with asyncio.timeout(2):
            answer = await reader.read()  # to EOF: the proxy closed the connection
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"Connection: close" in answer and b'"code": "too_many_connections"' in answer
        assert b"server.max_connections" in answer
    assert time.monotonic() - started < 1, "refused at once, not after a timeout"
    for conn in first:
        assert (await get(conn, "/healthz"))[0] == 200, "the first 20 are still served"
    log = await wait_for_log(proc, "refusing connections: server.max_connections reached")
    assert log.count("refusing connections") == 1
    close_all(extra)
    status, metrics = await get(first[0], "/metrics")
    assert status == 200
    assert 'proxy_connections_refused_total{reason="max_connections"} 20.0' in metrics.decode()
    close_all(first)
    assert await proc.stop() == 0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a SQLite database, it is a note\n" * 100), id="not-sqlite"),
        pytest.param(lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4080), id="corrupt-header"),
        pytest.param(lambda p: p.mkdir(), id="a-directory"),
    ],
)
async def test_an_unusable_ledger_stops_the_start(tmp_path: Path, make: Callable[[Path], object]) -> None:
    db = tmp_path / "ledger.db"
    make(db)
    before = sorted(tmp_path.iterdir())
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"ledger: {{path: {db}}}\nbudgets: {{daily_usd: 1}}\n")
    started = time.monotonic()
    rc, _, err = await run_cli("serve", "--config", str(cfg), "--port", "0")
    assert rc == 2, err  # what no restart fixes, like a config error (systemd: RestartPreventExitStatus=2)
    assert time.monotonic() - started < 10
    assert f"the ledger {db} cannot be opened" in err
    assert "Not starting: the budgets and client spend caps would count from $0" in err
    assert f"mv {db} {db}.broken" in err
    assert "proxy listening" not in err
    assert "Traceback" not in err
    if db.is_file():
        assert sorted(tmp_path.iterdir()) == [*before, cfg], "the broken file is left as it was, nothing spilled"


async def test_a_missing_ledger_is_created(tmp_path: Path, upstream_url: str, procs: list[ProxyProc]) -> None:
    cfg = config(tmp_path, upstream_url)
    cfg["ledger"]["path"] = str(tmp_path / "new" / "dir" / "ledger.db")
    proc = await start_proxy(tmp_path, cfg)
    procs.append(proc)
    assert Path(cfg["ledger"]["path"]).is_file()
    assert await proc.stop() == 0


async def test_a_ledger_locked_for_good_stops_the_start_with_exit_1(tmp_path: Path) -> None:
    """Another process holds the file locked through every retry (~2 s): exit 1, which systemd's
    Restart=on-failure retries later, unlike the 2 of a file no retry fixes."""
    db = tmp_path / "ledger.db"
    blocker = sqlite3.connect(db, timeout=0, isolation_level=None)
    blocker.execute("CREATE TABLE other (x)")
    blocker.execute("BEGIN EXCLUSIVE")
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"ledger: {{path: {db}, busy_timeout_ms: 20}}\n")
    try:
        rc, _, err = await run_cli("serve", "--config", str(cfg), "--port", "0")
    finally:
        blocker.close()
    assert rc == 1, err
    assert "database is locked; retrying in" in err
    assert f"the ledger {db} cannot be opened: database is locked. Not starting" in err
