"""`proxy serve` as a real process: startup errors, warnings, SIGTERM with work in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.sim import SIM_STATS, Behaviour, SimSettings, create_sim_app
from tests.support.proc import Served, run_cli, start_proxy

MSG = {"messages": [{"role": "user", "content": "plan"}]}


@pytest.fixture
async def served(tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[Served]:
    settings = SimSettings(name="llama")
    app = create_sim_app(settings)
    upstream = await aiohttp_server(app)
    db = tmp_path / "ledger.db"
    config = {
        "tiers": {"llama": {"base_url": str(upstream.make_url("/v1")), "model": "m", "timeout_seconds": 2}},
        "ledger": {"path": str(db)},
        "server": {"shutdown_timeout_seconds": 3},
    }
    run = await start_proxy(tmp_path, config)
    yield Served(run, db, app[SIM_STATS], settings)
    await asyncio.to_thread(run.kill)


async def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except (ConnectionRefusedError, ConnectionResetError):  # reset: queued when the listener closed
        return True
    writer.close()
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_drains_in_flight_streams_and_every_row(served: Served, sig: signal.Signals) -> None:
    """The listener closes at once; the calls in flight (half of them streams) all complete, every
    row reaches the ledger, and the exit status is 0."""
    served.settings.default = Behaviour(chunk_delay=0.03, chunks=30)
    n = 100
    async with aiohttp.ClientSession() as s:

        async def call(i: int) -> bytes:
            body = {"model": "auto", "stream": i % 2 == 0, **MSG}
            async with s.post(f"{served.url}/v1/chat/completions", json=body) as r:
                return await r.read()

        tasks = [asyncio.create_task(call(i)) for i in range(n)]
        while served.stats.hits < n:  # every request is in flight upstream
            await asyncio.sleep(0.01)
        served.run.signal(sig)
        while not await _refused(served.url):
            await asyncio.sleep(0.01)
        assert not all(t.done() for t in tasks), "new connections are refused while the calls in flight go on"
        bodies = await asyncio.gather(*tasks)
    assert await served.run.wait(10) == 0
    streams = [b for i, b in enumerate(bodies) if i % 2 == 0]
    assert all(b.endswith(b"data: [DONE]\n\n") for b in streams), "streams in flight at SIGTERM complete"
    with sqlite3.connect(served.db) as conn:
        assert conn.execute("SELECT count(*) FROM requests WHERE outcome = 'ok'").fetchone()[0] == n
        assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == n
    log = served.run.log_text()
    assert "stopping: no new connections" in log
    assert f"closed: {n} requests written, 0 spilled, 0 lost" in log, log[-2000:]


async def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("routing:\n  primary: llama\n  escalate_afterr: 3\n")
    rc, _, err = await run_cli("serve", "--config", str(cfg))
    assert rc == 2
    assert str(cfg) in err and "escalate_afterr" in err


async def test_missing_key_is_a_startup_warning_naming_tier_and_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MOONSHOT_API_KEY"}
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"ledger: {{path: {tmp_path / 'l.db'}}}\n")
    rc, out, _ = await run_cli("check", "--config", str(cfg), env=env)
    assert rc == 0
    assert "tier 'kimi' is skipped: its API key variable MOONSHOT_API_KEY is not set" in out

    run = await start_proxy(tmp_path, {"ledger": {"path": str(tmp_path / "l.db")}}, env={"MOONSHOT_API_KEY": ""})
    assert await run.stop() == 0
    err = run.log_text()
    assert "tier 'kimi' is skipped" in err and "MOONSHOT_API_KEY" in err


async def test_check_names_the_ledger_and_the_shared_state_without_their_passwords(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        "ledger: {url: 'postgresql://proxy:pg-secret-pw@db:5432/proxy?password=pg-secret-pw', password_env: PGPW}\n"
        "state: {url: 'redis://:redis-secret-pw@cache:6380/2', prefix: team}\n"
    )
    rc, out, _ = await run_cli("check", "--config", str(cfg), env={**os.environ, "PGPW": "pg-secret-pw"})
    assert rc == 0, out
    assert "ledger: PostgreSQL postgresql://proxy@db:5432/proxy (password from $PGPW)" in out
    assert "shared state: Redis redis://cache:6380/2, keys {team}:*" in out
    assert "secret-pw" not in out
    cfg.write_text(f"ledger: {{path: {tmp_path / 'l.db'}}}\n")
    rc, out, _ = await run_cli("check", "--config", str(cfg))
    assert f"ledger: {tmp_path / 'l.db'} (SQLite)" in out and "shared state: none" in out
