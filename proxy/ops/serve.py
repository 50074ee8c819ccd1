"""`proxy serve`: run the app on a real socket with the production event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from proxy.app import create_app
from proxy.config import Config
from proxy.ops.logs import flush_logs_periodically, setup_logging
from proxy.ops.runner import run_until_stopped

log = logging.getLogger("proxy")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); the stdlib loop works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    config: Config, *, host: str | None, port: int | None, db: str | None, log_level: str, log_format: str = "text"
) -> int:
    setup_logging(log_level, log_format, buffered=True)
    for w in config.warnings:
        log.warning("%s", w)
    host = _listen_host(config, host)
    port = config.server.port if port is None else port
    config_path = None if config.source.startswith("<") else config.source
    app = create_app(config, db_path=db, config_path=config_path)
    app.cleanup_ctx.append(flush_logs_periodically)
    usable = ", ".join(t.id for t in config.usable_tiers) or "none"
    log.info("proxy listening on http://%s:%d/v1 (config %s; usable tiers: %s)", host, port, config.source, usable)
    run_until_stopped(app, host, port, config.server, _new_loop())
    return 0


def _listen_host(config: Config, given: str | None) -> str:
    """Without client keys anyone who reaches the port spends the paid tiers' money: stay on
    loopback unless the operator says --host explicitly."""
    if config.auth_required:
        return given or config.server.host
    if given is not None:
        if not _loopback(given):
            log.warning("no client keys configured (auth.keys): anyone who can reach %s can use this proxy", given)
        return given
    if not _loopback(config.server.host):
        log.warning(
            "no client keys configured (auth.keys): listening on 127.0.0.1 only, not on server.host %s; "
            "configure auth.keys, or pass --host to listen there anyway",
            config.server.host,
        )
        return "127.0.0.1"
    log.info("no client keys configured: listening on loopback only")
    return config.server.host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
