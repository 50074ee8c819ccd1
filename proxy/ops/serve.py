"""`proxy serve`: run the app on a real socket with the production event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
from collections.abc import Callable

from aiohttp import web

from proxy.app import LedgerUnavailable, create_app
from proxy.config import Config
from proxy.ops.logs import flush_logs_periodically, setup_logging
from proxy.ops.runner import run_until_stopped
from proxy.ops.worker_metrics import Worker, serve_worker_metrics

log = logging.getLogger("proxy")

# Descriptors the proxy needs besides client and upstream connections: the ledger (database,
# WAL, shared memory, spill file), the loop's own, logging, Python's imports and threads.
FIXED_DESCRIPTORS = 64


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); the stdlib loop works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    config: Config,
    *,
    host: str | None,
    port: int | None,
    db: str | None,
    log_level: str,
    log_format: str = "text",
    workers: int = 1,
) -> int:
    # The supervisor of several workers logs each line at once; a worker buffers (see logs.py).
    setup_logging(log_level, log_format, buffered=workers == 1)
    for w in config.warnings:
        log.warning("%s", w)
    _check_open_files(config, raise_open_files_limit())
    host = _listen_host(config, host)
    port = config.server.port if port is None else port
    if workers > 1:
        from proxy.ops.workers import supervise

        def worker(cfg: Config, which: Worker, bound: int, ready: Callable[[], None]) -> int:
            setup_logging(log_level, log_format, buffered=True)
            return _run(cfg, host, bound, db, worker=which, ready=ready)

        return supervise(config, workers, host, port, worker)
    return _run(config, host, port, db)


def _run(
    config: Config,
    host: str,
    port: int,
    db: str | None,
    *,
    worker: Worker | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    config_path = None if config.source.startswith("<") else config.source
    app = create_app(config, db_path=db, config_path=config_path, require_ledger=True)
    app.cleanup_ctx.append(flush_logs_periodically)
    if worker is not None:
        app.on_response_prepare.append(_worker_header)
        serve_worker_metrics(app, worker)
    try:
        loop = _new_loop()
        run_until_stopped(app, host, port, config.server, loop, reuse_port=worker is not None, on_listening=ready)
    except LedgerUnavailable as e:
        log.error("%s", e)
        # 2, like a config error, tells a supervisor (systemd's RestartPreventExitStatus=2) that
        # restarting will not help; a ledger still locked after the retries may be free later.
        return 2 if e.lasting else 1
    return 0


async def _worker_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Which of `--workers N` answered (its pid): /readyz is per worker."""
    response.headers["X-Proxy-Worker"] = str(os.getpid())


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


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one: the soft limit is often 1,024, which a
    thousand idle clients use up, and then no connection, upstream or ledger file can be opened.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        # Linux never reports an infinite hard limit for NOFILE; elsewhere "infinite" cannot be
        # set as a soft limit, and the current one is as good as a guess.
        log.info("open files limit: %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("open files limit stays %d: cannot raise it to the hard limit %d: %s", soft, hard, e)
        return soft
    log.info("open files limit: %d (raised from %d to the hard limit)", hard, soft)
    return hard


def _check_open_files(config: Config, limit: int) -> None:
    upstream = sum(t.max_connections for t in config.usable_tiers)
    room = limit - upstream - FIXED_DESCRIPTORS
    if config.server.max_connections <= room:
        return
    log.warning(
        "the open files limit (%d) leaves room for about %d client connections next to the tiers' "
        "max_connections (%d) and the ledger, but server.max_connections is %d: past that, new clients "
        "wait or upstream calls fail. Raise the limit (systemd LimitNOFILE=, docker --ulimit nofile=, "
        "ulimit -Hn) or lower server.max_connections",
        limit,
        max(room, 0),
        upstream,
        config.server.max_connections,
    )
