"""What the running app holds: one object behind one AppKey, swapped parts on reload."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.breaker import BreakerBoard
from proxy.budget import BudgetTracker
from proxy.clients import ClientLimits
from proxy.config import ClientKey, Config
from proxy.failover import Failover
from proxy.metrics import Metrics
from proxy.records import NullSink, RecordSink


@dataclass(slots=True)
class ProxyState:
    config: Config
    breakers: BreakerBoard
    failover: Failover
    budget: BudgetTracker
    sink: RecordSink = field(default_factory=NullSink)
    session: aiohttp.ClientSession | None = None
    ledger_path: str | None = None  # None: no ledger (records go to `sink` only)
    limits: ClientLimits = field(default_factory=ClientLimits)
    gates: dict[str, asyncio.Semaphore] = field(default_factory=dict)  # tier -> max connections
    config_path: str | None = None  # reloaded on SIGHUP when set
    metrics: Metrics | None = None

    @classmethod
    def build(cls, config: Config, rng: random.Random | None = None) -> ProxyState:
        routing = config.routing
        breakers = BreakerBoard(
            threshold=routing.escalate_after_failures,
            cooldown=routing.breaker_cooldown_seconds,
            successes_to_close=routing.recovery_threshold,
        )
        failover = Failover(retries=config.retries, breakers=breakers, rng=rng or random.Random())
        state = cls(config=config, breakers=breakers, failover=failover, budget=BudgetTracker(config.budgets))
        state.gates = tier_gates(config)
        return state

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("the upstream HTTP session is not open (app not started)")
        return self.session


def tier_gates(config: Config) -> dict[str, asyncio.Semaphore]:
    return {t.id: asyncio.Semaphore(t.max_connections) for t in config.tiers}


STATE = web.AppKey("proxy_state", ProxyState)
# request-scoped: the ClientKey that authenticated the request
CLIENT_KEY = web.RequestKey("proxy_client_key", ClientKey)
