"""A real `proxy serve` on a PostgreSQL ledger: PostgreSQL stopped in the middle of a load and
restarted, no failed call, every row in the database after the next start (spill replayed),
and the password nowhere in the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg

from tests.support.faults import SimThread, proxy_config
from tests.support.postgres import PostgresServer
from tests.support.proc import ProxyProc, start_proxy

PW_ENV = "PROXY_TEST_LEDGER_PASSWORD"


async def load(proxy: ProxyProc, n: int, start: int, concurrency: int = 8) -> list[int]:
    sem = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, i: int) -> int:
        async with sem:
            body = {"model": "auto", "messages": [{"role": "user", "content": f"hi {i}"}]}
            headers = {"X-Request-Id": f"load-{i}"}
            async with session.post(proxy.chat_url, json=body, headers=headers) as r:
                await r.read()
                return r.status

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, i) for i in range(start, start + n))))


async def test_postgres_stopped_mid_load_no_row_lost(sims: SimThread, pg: PostgresServer, tmp_path: Path) -> None:
    sims.reset()
    db_url = pg.new_database()
    dsn = pg.url(db_url.rsplit("/", 1)[1], with_password=False)
    urls = {n: s.url for n, s in sims.sims.items()}
    config = proxy_config(urls, tmp_path / "ledger", ledger={"url": dsn, "password_env": PW_ENV})
    env = {PW_ENV: pg.password, "TEST_KIMI_KEY": "k"}
    proxy = await start_proxy(tmp_path, config, env)
    try:
        statuses = await load(proxy, 60, 0)
        await asyncio.to_thread(pg.stop, "immediate")
        statuses += await load(proxy, 60, 60)
        await asyncio.sleep(1.0)  # past the writer's retries (0.05 s, 0.25 s): those rows are spilled
        await asyncio.to_thread(pg.start)
        statuses += await load(proxy, 60, 120)
        assert await proxy.stop() == 0
    finally:
        proxy.kill()
    assert statuses == [200] * 180, "a database outage never fails a call"
    log = proxy.log_text()
    assert "spilling" in log and "Traceback" not in log
    # The next start imports the spill file before it serves.
    again = await start_proxy(tmp_path, config, env)
    assert await again.stop() == 0
    assert pg.password not in log + again.log_text()
    conn = await asyncpg.connect(db_url)
    try:
        ids = {r[0] for r in await conn.fetch("SELECT id FROM requests")}
        calls = await conn.fetchval("SELECT sum(calls) FROM daily_usage")
        attempts = await conn.fetchval("SELECT count(*) FROM attempts")
        hits = await conn.fetchval("SELECT sum(attempts) FROM daily_attempts")
    finally:
        await conn.close()
    assert ids == {f"load-{i}" for i in range(180)}
    assert calls == 180 and attempts == hits == sum(sims.hits().values())
    assert not (tmp_path / "ledger.spill.jsonl").exists()
