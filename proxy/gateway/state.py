"""What the running app holds: one object behind one AppKey, swapped parts on reload."""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.config import ClientKey, Config
from proxy.gateway.breaker import BreakerBoard
from proxy.gateway.client_keys import ClientLimits
from proxy.gateway.failover import Failover
from proxy.gateway.quality import QualityGate
from proxy.gateway.spend import SpendGate
from proxy.gateway.target import Target
from proxy.ledger import Ledger
from proxy.ledger.budget import BudgetTracker
from proxy.ops.metrics import Metrics, Snapshot
from proxy.records import CallRecord

if TYPE_CHECKING:
    from proxy.state.shared import SharedState


@dataclass(slots=True)
class ProxyState:
    config: Config
    breakers: BreakerBoard
    failover: Failover
    budget: BudgetTracker
    quality: QualityGate
    metrics: Metrics = field(init=False)
    ledger: Ledger | None = None  # None: the app was made without one, and records are dropped
    session: aiohttp.ClientSession | None = None
    limits: ClientLimits = field(default_factory=ClientLimits)
    targets: dict[str, Target] = field(default_factory=dict)  # tier -> where its attempts go
    config_path: str | None = None  # reloaded on SIGHUP when set
    shared: SharedState | None = None  # state.url: breakers, budgets and client limits in Redis (app start)
    # Request ids: a random per-process prefix and a counter; as unique as uuid4, without a
    # getrandom() system call per request.
    id_prefix: str = field(default_factory=lambda: os.urandom(8).hex())
    id_counter: Iterator[int] = field(default_factory=itertools.count)

    @classmethod
    def build(cls, config: Config, *, ledger_path: str | None, rng: random.Random | None = None) -> ProxyState:
        breakers = BreakerBoard.for_routing(config.routing)
        failover = Failover(retries=config.retries, breakers=breakers, rng=rng or random.Random())
        state = cls(
            config=config,
            breakers=breakers,
            failover=failover,
            budget=BudgetTracker(config.budgets),
            quality=QualityGate(config.quality),
        )
        state.metrics = Metrics(state.snapshot)
        if ledger_path is not None:
            state.ledger = Ledger(
                config, ledger_path, on_cost=state.count_cost, busy_timeout_ms=config.ledger.busy_timeout_ms
            )
        return state

    def new_request_id(self) -> str:
        return f"{self.id_prefix}{next(self.id_counter):016x}"

    def submit(self, rec: CallRecord) -> None:
        """A finished request: to the ledger (never waited on) and the metrics."""
        if self.ledger is not None:
            self.ledger.submit(rec)
        self.metrics.observe(rec)

    def count_cost(self, cost: Decimal, rec: CallRecord) -> None:
        """What the ledger priced: toward the budgets, the client's daily cap and the cost metric."""
        if self.shared is not None:
            self.shared.spend.record(cost, rec.client, rec.started_at)  # once, by this process
        else:
            self.budget.record(cost, rec.started_at)
            self.limits.record(rec.client, cost, rec.started_at)
        self.metrics.add_cost(rec.tier or (rec.attempts[-1].tier if rec.attempts else "none"), cost)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            breakers=self.breakers.snapshot(time.monotonic()),
            budget_remaining_usd=self.budget.remaining(time.time()),
            ledger=self.ledger.stats if self.ledger is not None else None,
            tiers=[t.id for t in self.config.tiers],
            state=self.shared.status() if self.shared is not None else None,
        )

    async def admit(self, key: ClientKey) -> None:
        """The key's requests_per_minute (the client_keys middleware)."""
        if self.shared is None:
            self.limits.admit(key, time.monotonic())
        else:
            await self.shared.admit(key)

    def spend_gate(self, key: ClientKey | None, prompt_bytes: int, output_tokens: int) -> SpendGate:
        shared = self.shared.spend if self.shared is not None else None
        return SpendGate(self.budget, self.limits, key, prompt_bytes, output_tokens, shared=shared)

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("the upstream HTTP session is not open (app not started)")
        return self.session

    def build_targets(self) -> None:
        """One Target per tier, for the open session and the current config."""
        session = self.http()
        limit = self.config.server.max_response_bytes
        old = self.targets
        redactor = self.config.redactor
        self.targets = {
            t.id: Target.build(session, t, limit, old.get(t.id), redactor=redactor) for t in self.config.tiers
        }


STATE = web.AppKey("proxy_state", ProxyState)
# request-scoped: the ClientKey that authenticated the request
CLIENT_KEY = web.RequestKey("proxy_client_key", ClientKey)
