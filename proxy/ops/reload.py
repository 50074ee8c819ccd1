"""SIGHUP: re-read proxy.yaml and swap it in without dropping a connection.

Requests already running finish with the config they started with; new ones get the new one.
An invalid file is rejected with the reason logged, and the old config stays.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.config import Config, ConfigError, load_config
from proxy.gateway.state import STATE, ProxyState

log = logging.getLogger("proxy.reload")


async def apply_config(state: ProxyState, config: Config) -> None:
    """Swap in a validated config; breaker, rate-limit and spend state carry over: the budget
    keeps what was spent (written to the ledger or not) and what calls in flight hold."""
    if state.ledger is not None:
        state.ledger.reconfigure(config)
    state.budget.reconfigure(config.budgets)
    state.breakers.reconfigure(config.routing)
    state.failover.retries = config.retries
    state.quality.reconfigure(config.quality)
    state.config = config
    if state.session is not None:
        state.build_targets()


async def reload_from_file(state: ProxyState) -> bool:
    if state.config_path is None:
        return False
    try:
        config = load_config(state.config_path)
    except ConfigError as e:
        log.error("reload rejected, keeping the running config: %s", e)
        return False
    await apply_config(state, config)
    for w in config.warnings:
        log.warning("%s", w)
    usable = ", ".join(t.id for t in config.usable_tiers) or "none"
    log.info("reloaded %s (usable tiers: %s)", config.source, usable)
    return True


async def sighup_reloads(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: reload on SIGHUP while the app runs (only where signals exist)."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_from_file(state))
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(running):
            await task
