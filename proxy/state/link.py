"""The connection to Redis (or Valkey): every call bounded by `state.timeout_ms`, and one
background task that keeps this process's heartbeat and reconnects.

While Redis answers, the link is `up` and the shared rules run there. The first call that
fails or times out marks it down: that is logged once, loudly, and from then on no call
touches Redis (nothing waits on a dead server); the background task pings it every
`state.reconnect_seconds` and, once it answers, runs the `on_rejoin` steps (the spend recorded
meanwhile, pushed or re-seeded) before the link is up again.

The heartbeat (`{prefix}:procs`, a sorted set of process ids by last-seen time) tells each process
how many share the state: while degraded, each takes only its share of what is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.config import StateSpec
from proxy.config.urls import redact

log = logging.getLogger("proxy.state")

Step = Callable[[], Awaitable[None]]


class Down(Exception):
    """Redis is not answering: use this process's own state."""


FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class RedisLink:
    def __init__(self, spec: StateSpec) -> None:
        assert spec.url is not None
        self.spec = spec
        self.url = spec.url
        self.ns = "{" + spec.prefix + "}"  # a hash tag: every key in one cluster slot, so scripts may take several
        self.proc_id = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self.timeout = spec.timeout_ms / 1000.0
        self.client = aioredis.Redis.from_url(
            spec.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: a failure falls back at once
            health_check_interval=0,
        )
        self.up = False
        self.since = time.time()  # when `up` last changed
        self.error: str | None = "not connected yet"
        self.fallbacks = 0  # times the shared state was lost
        self.peers = 1  # processes seen sharing the state (this one included)
        self.on_down: list[Callable[[], None]] = []
        self.on_rejoin: list[Step] = []
        self.on_tick: list[Step] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rejoining = False
        self._closing = False

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def script(self, source: str) -> AsyncScript:
        return self.client.register_script(source)

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's answer; Down (after logging, once) when Redis does not give one in time."""
        if not self.up:
            raise Down(self.error)
        try:
            async with asyncio.timeout(self.timeout):
                return await script(keys=list(keys), args=list(args))
        except FAILURES as e:
            self.lost(e)
            raise Down(str(e)) from e

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Any other command, with the same timeout and fallback as `run`."""
        if not self.up:
            raise Down(self.error)
        try:
            async with asyncio.timeout(self.timeout):
                return await fn()
        except FAILURES as e:
            self.lost(e)
            raise Down(str(e)) from e

    def lost(self, e: BaseException) -> None:
        if not self.up:
            return
        if self._rejoining:  # still down: the rejoin is retried, nothing new to say
            self.up, self.error = False, _describe(e)
            return
        self.up, self.since, self.error = False, time.time(), _describe(e)
        self.fallbacks += 1
        log.error(
            "state: Redis at %s is unreachable (%s): this process now keeps breakers, budgets and client "
            "limits itself until Redis answers; retrying every %gs",
            redact(self.url),
            self.error,
            self.spec.reconnect_seconds,
        )
        for step in self.on_down:
            step()
        self._wake.set()

    async def start(self) -> None:
        """Connect (a Redis that does not answer is not fatal: the process starts degraded)."""
        await self._connect()
        if not self.up:
            log.error(
                "state: Redis at %s is unreachable at start (%s): serving with this process's own state "
                "until it answers",
                redact(self.url),
                self.error,
            )
            self.fallbacks += 1
            for step in self.on_down:
                step()
        self._task = asyncio.create_task(self._background(), name="proxy-state-link")

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True  # the loop ends on it (a cancel landing in redis-py may be swallowed)
            self._wake.set()
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        if self.up:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.client.zrem(self.key("procs"), self.proc_id)
            except FAILURES:
                pass
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.client.aclose()
        except FAILURES as e:
            log.warning("state: closing the Redis connections: %s", _describe(e))
        log.info("state: Redis link closed")

    async def _connect(self) -> None:
        """Ping; when it answers, the rejoin steps, then up."""
        try:
            async with asyncio.timeout(self.timeout):
                # Connections to a server that went away are dead even if it is back: start afresh.
                await self.client.connection_pool.disconnect()
                await self.client.ping()
                await self._heartbeat()
            self.up = self._rejoining = True  # the rejoin steps run their scripts through the link
            for step in self.on_rejoin:
                await step()
        except (RedisError, OSError, TimeoutError, Down) as e:
            self.up, self.error = False, _describe(e)
            return
        finally:
            self._rejoining = False
        if not self.up:
            return
        self.error, self.since = None, time.time()

    async def _background(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self.spec.reconnect_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._closing:
                return
            if not self.up:
                await self._connect()
                if self.up:
                    log.warning("state: Redis at %s answers again: shared state rejoined", redact(self.url))
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    await self._heartbeat()
                for step in self.on_tick:
                    await step()
            except FAILURES as e:
                self.lost(e)
            except Down:
                pass

    async def _heartbeat(self) -> None:
        now_ms = int(time.time() * 1000)
        stale = now_ms - int(self.spec.reconnect_seconds * 3000) - 1000
        key = self.key("procs")
        async with self.client.pipeline(transaction=True) as p:
            p.zadd(key, {self.proc_id: now_ms})
            p.zremrangebyscore(key, "-inf", stale)
            p.zcard(key)
            p.expire(key, max(int(self.spec.reconnect_seconds * 10), 60))
            replies = await p.execute()
        self.peers = max(int(replies[2]), 1)


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError) and not str(e):
        return "no answer within state.timeout_ms"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
