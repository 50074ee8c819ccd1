"""Run the proxy app on a real port in a background thread, for clients that block (the sync SDK)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from proxy.app import create_app
from proxy.config import Config


@contextmanager
def running_proxy(config: Config, db_path: str) -> Iterator[str]:
    """Serve `config` on 127.0.0.1:<free port>; yields the base URL ending in /v1."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(config, db_path=db_path), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["port"] = runner.addresses[0][1]
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["runner"] = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="proxy-under-test", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the proxy did not start within 10 s")
    try:
        yield f"http://127.0.0.1:{box['port']}/v1"
    finally:
        runner = box["runner"]
        assert isinstance(runner, web.AppRunner)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
