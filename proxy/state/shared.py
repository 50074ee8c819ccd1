"""The shared state as the app holds it: the link, the shared spend and breakers, and each
client key's request rate (a token bucket in `{ns}:rate:<client>`, kept two minutes)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy.config import ClientKey, Config
from proxy.gateway.breaker import BreakerBoard
from proxy.gateway.client_keys import ClientLimits, rate_limited
from proxy.ledger.budget import BudgetTracker
from proxy.state import scripts
from proxy.state.breakers import SharedBreakers
from proxy.state.link import Down, RedisLink
from proxy.state.spend import Ledgerish, SharedSpend


@dataclass(frozen=True, slots=True)
class StateStatus:
    """What /readyz and /metrics say about the shared state."""

    backend: str  # "redis"
    shared: bool  # False: Redis is lost and this process uses its own state
    since: float  # when `shared` last changed (Unix time)
    error: str | None  # why it is not shared
    fallbacks: int  # times the shared state was lost since start
    processes: int  # processes seen sharing it at the last heartbeat


class SharedState:
    def __init__(self, config: Config, budget: BudgetTracker, limits: ClientLimits, board: BreakerBoard) -> None:
        self.link = RedisLink(config.state)
        self.limits = limits
        self.spend = SharedSpend(self.link, budget, limits)
        lease = config.retries.request_deadline_seconds + 1.0
        self.breakers = SharedBreakers(self.link, board, lease)
        self._admit = self.link.script(scripts.ADMIT)

    async def start(self, source: Ledgerish | None) -> None:
        self.spend.source = source
        await self.link.start()
        self.spend.start()

    async def close(self) -> None:
        await self.spend.close()
        await self.breakers.close()
        await self.link.close()

    async def admit(self, key: ClientKey) -> None:
        """One request from the key's rate, across processes; 429 saying when to come back."""
        rpm = key.requests_per_minute
        if rpm is None:
            return
        if self.link.up:
            try:
                wait_ms = int(await self.link.run(self._admit, [self.link.key("rate", key.name)], [rpm]))
            except Down:
                pass
            else:
                if wait_ms > 0:
                    raise rate_limited(key, max((wait_ms + 999) // 1000, 1))
                return
        self.limits.admit(key, time.monotonic())

    def status(self) -> StateStatus:
        link = self.link
        return StateStatus("redis", link.up, link.since, link.error, link.fallbacks, link.peers)
