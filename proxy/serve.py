"""`proxy serve`: run the app on a real socket with the production event loop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.app import create_app
from proxy.config import Config

log = logging.getLogger("proxy")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); the stdlib loop works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(config: Config, *, host: str | None, port: int | None, db: str | None, log_level: str) -> int:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for w in config.warnings:
        log.warning("%s", w)
    host = host or config.server.host
    port = config.server.port if port is None else port
    app = create_app(config, db_path=db)
    usable = ", ".join(t.id for t in config.usable_tiers) or "none"
    log.info("proxy listening on http://%s:%d/v1 (config %s; usable tiers: %s)", host, port, config.source, usable)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=config.server.shutdown_timeout_seconds,
        print=None,
        loop=_new_loop(),
    )
    return 0
