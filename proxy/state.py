"""What the running app holds: one object behind one AppKey, swapped parts on reload."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
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
from proxy.upstream import Target


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
    targets: dict[str, Target] = field(default_factory=dict)  # tier -> where its attempts go
    config_path: str | None = None  # reloaded on SIGHUP when set
    metrics: Metrics | None = None
    # Request ids: a random per-process prefix and a counter; as unique as uuid4, without a
    # getrandom() system call per request.
    id_prefix: str = field(default_factory=lambda: os.urandom(8).hex())
    id_counter: Iterator[int] = field(default_factory=itertools.count)

    def new_request_id(self) -> str:
        return f"{self.id_prefix}{next(self.id_counter):016x}"

    @classmethod
    def build(cls, config: Config, rng: random.Random | None = None) -> ProxyState:
        routing = config.routing
        breakers = BreakerBoard(
            threshold=routing.escalate_after_failures,
            cooldown=routing.breaker_cooldown_seconds,
            successes_to_close=routing.recovery_threshold,
        )
        failover = Failover(retries=config.retries, breakers=breakers, rng=rng or random.Random())
        return cls(config=config, breakers=breakers, failover=failover, budget=BudgetTracker(config.budgets))

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("the upstream HTTP session is not open (app not started)")
        return self.session

    def build_targets(self) -> None:
        """One Target per tier, for the open session and the current config."""
        session = self.http()
        limit = self.config.server.max_response_bytes
        old = self.targets
        self.targets = {t.id: Target.build(session, t, limit, old.get(t.id)) for t in self.config.tiers}


STATE = web.AppKey("proxy_state", ProxyState)
# request-scoped: the ClientKey that authenticated the request
CLIENT_KEY = web.RequestKey("proxy_client_key", ClientKey)
