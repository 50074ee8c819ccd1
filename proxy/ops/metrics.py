"""Prometheus metrics: per-request counters and histograms, plus gauges read at scrape time.

Every `Metrics` owns its `CollectorRegistry`, so several apps in one process (tests) never
share a value. `observe` runs once per finished request on the event loop; it only touches
pre-bound label children cached in dicts, because `.labels()` itself costs a lock, a tuple
of strings and a dict lookup on every call. Labels are bounded: tier ids from the config,
routes and outcomes from enums. Request ids, client names, models and text never become labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from proxy.gateway.breaker import BreakerState
from proxy.ledger import LedgerStats
from proxy.records import AttemptOutcome, CallRecord, Outcome, Route

if TYPE_CHECKING:
    from proxy.state.shared import StateStatus

NO_TIER = "none"  # the tier label of a request no tier answered

# Upstream LLM calls: a cached local answer in tens of ms, a long completion in minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# The proxy's own work per request should be well under a millisecond; resolve that range.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

BREAKER_VALUES: Mapping[BreakerState, float] = {
    BreakerState.CLOSED: 0.0,
    BreakerState.HALF_OPEN: 1.0,
    BreakerState.OPEN: 2.0,
}

_MS = 0.001
REFUSAL_REASONS = ("max_connections", "out_of_descriptors")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the app reports at scrape time (read once per scrape, never per request)."""

    breakers: Mapping[str, BreakerState]  # tier -> state; tiers never used yet may be missing
    budget_remaining_usd: Decimal | None  # None: no budget configured
    ledger: LedgerStats | None  # None: no ledger
    tiers: Sequence[str]  # every configured tier, so its gauges exist before its first request
    state: StateStatus | None = None  # None: state.url is not set (state in the process)


@dataclass(frozen=True, slots=True)
class _TierChildren:
    """One tier's pre-bound children, so an attempt costs one dict lookup, not three."""

    latency: Histogram
    ttft: Histogram
    attempts: Mapping[AttemptOutcome, Counter]


_RequestKey = tuple[str | None, Route, Outcome]


class Metrics:
    """One app's metrics. observe/add_cost/render are meant for the event loop thread."""

    def __init__(self, snapshot: Callable[[], Snapshot], *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "proxy_requests",
            "Client requests finished, by the tier that answered (none: no tier did), route and outcome.",
            ["tier", "route", "outcome"],
            registry=self.registry,
        )
        self._attempts = Counter(
            "proxy_attempts",
            "Upstream attempts, by tier and outcome.",
            ["tier", "outcome"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "proxy_upstream_latency_seconds",
            "Duration of upstream attempts (whole answer or whole stream); client-cancelled attempts excluded.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "proxy_upstream_ttft_seconds",
            "Streamed attempts: time from sending to the first data event.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._added = Histogram(
            "proxy_added_latency_seconds",
            "The proxy's own overhead: request duration minus its attempt's, for single-attempt requests only.",
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        connections = Counter(
            "proxy_connections_refused",
            "Client connections refused: max_connections (server.max_connections reached, answered 503) "
            "or out_of_descriptors (accept failed for lack of file descriptors).",
            ["reason"],
            registry=self.registry,
        )
        self._refused = {r: connections.labels(r) for r in REFUSAL_REASONS}
        self._cost: dict[str, Decimal] = {}
        self._by_request: dict[_RequestKey, Counter] = {}
        self._by_tier: dict[str, _TierChildren] = {}
        self.registry.register(_SnapshotCollector(snapshot, self._cost))
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def observe(self, rec: CallRecord) -> None:
        """Count one finished request and its attempts. Hot path: no `.labels()` after warm-up."""
        key = (rec.tier, rec.route, rec.outcome)
        child = self._by_request.get(key)
        if child is None:
            child = self._bind_request(key)
        child.inc()
        attempts = rec.attempts
        by_tier = self._by_tier
        for a in attempts:
            tier = by_tier.get(a.tier)
            if tier is None:
                tier = self._bind_tier(a.tier)
            tier.attempts[a.outcome].inc()
            if a.outcome is not AttemptOutcome.CANCELLED:  # the client's patience, not the upstream's speed
                tier.latency.observe(a.duration_ms * _MS)
            if a.ttft_ms is not None:
                tier.ttft.observe(a.ttft_ms * _MS)
        # With retries the difference would include backoff sleeps, which are not overhead.
        if len(attempts) == 1:
            overhead = rec.duration_ms - attempts[0].duration_ms
            self._added.observe(overhead * _MS if overhead > 0.0 else 0.0)

    def connection_refused(self, reason: str) -> None:
        """One client connection the listener refused (see proxy/ops/listener.py)."""
        self._refused[reason].inc()

    def add_cost(self, tier: str, cost_usd: Decimal) -> None:
        """Add a priced request's cost. Summed as Decimal so the exported total is exact."""
        if cost_usd < 0:
            raise ValueError(f"a cost cannot be negative: {cost_usd}")
        self._cost[tier] = self._cost.get(tier, Decimal(0)) + cost_usd

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _bind_request(self, key: _RequestKey) -> Counter:
        tier, route, outcome = key
        child = self._requests.labels(tier if tier is not None else NO_TIER, route.value, outcome.value)
        self._by_request[key] = child
        return child

    def _bind_tier(self, tier: str) -> _TierChildren:
        # Every outcome is bound up front: series that exist at 0 make rate() and alerts work
        # before the first failure, and the hot path can index without a miss branch.
        children = _TierChildren(
            latency=self._latency.labels(tier),
            ttft=self._ttft.labels(tier),
            attempts={o: self._attempts.labels(tier, o.value) for o in AttemptOutcome},
        )
        self._by_tier[tier] = children
        return children


class _SnapshotCollector:
    """Builds the gauges from a fresh snapshot on every scrape, plus the exact cost totals."""

    def __init__(self, snapshot: Callable[[], Snapshot], cost: Mapping[str, Decimal]) -> None:
        self._snapshot = snapshot
        self._cost = cost

    def describe(self) -> Iterable[Metric]:
        # Declaring the names lets the registry reject clashes without calling snapshot() early.
        return [*_breakers((), {}), self._costs(()), _budget(Decimal(0)), *_ledger(LedgerStats(0, 0, 0, 0, 0))]

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        metrics = [*_breakers(snap.tiers, snap.breakers), self._costs(snap.tiers)]
        if snap.budget_remaining_usd is not None:
            metrics.append(_budget(snap.budget_remaining_usd))
        if snap.ledger is not None:
            metrics.extend(_ledger(snap.ledger))
        if snap.state is not None:
            metrics.extend(_state(snap.state))
        return metrics

    def _costs(self, tiers: Sequence[str]) -> Metric:
        family = CounterMetricFamily("proxy_cost_usd", "Exact cost of priced requests in USD.", labels=["tier"])
        cost = dict(self._cost)  # a copy: add_cost may run while a scrape iterates
        for tier in _tiers(tiers, cost):
            family.add_metric([tier], float(cost.get(tier, 0)))
        return family


def _breakers(tiers: Sequence[str], states: Mapping[str, BreakerState]) -> list[Metric]:
    state = GaugeMetricFamily(
        "proxy_breaker_state", "Circuit breaker per tier: 0 closed, 1 half_open, 2 open.", labels=["tier"]
    )
    tripped = GaugeMetricFamily(
        "proxy_breaker_open",
        "1 while a tier's breaker is not closed (open or half_open: the tier is not trusted).",
        labels=["tier"],
    )
    for tier in _tiers(tiers, states):
        value = BREAKER_VALUES[states.get(tier, BreakerState.CLOSED)]
        state.add_metric([tier], value)
        tripped.add_metric([tier], 1.0 if value else 0.0)
    return [state, tripped]


def _budget(remaining: Decimal) -> Metric:
    return GaugeMetricFamily(
        "proxy_budget_remaining_usd",
        "Paid spend left in the tightest budget window (absent: no budget configured).",
        value=float(remaining),
    )


def _ledger(stats: LedgerStats) -> list[Metric]:
    s = stats
    return [
        GaugeMetricFamily("proxy_ledger_queue_depth", "Requests waiting for the ledger writer.", value=s.queue_depth),
        CounterMetricFamily("proxy_ledger_written", "Requests committed to SQLite.", value=s.written),
        CounterMetricFamily("proxy_ledger_spilled", "Requests appended to the spill file instead.", value=s.spilled),
        CounterMetricFamily("proxy_ledger_imported", "Requests imported from a spill file at start.", value=s.imported),
        CounterMetricFamily("proxy_ledger_failed", "Requests lost: neither written nor spilled.", value=s.failed),
    ]


def _state(st: StateStatus) -> list[Metric]:
    return [
        GaugeMetricFamily(
            "proxy_state_shared",
            "1 while breakers, budgets and client limits are shared in Redis; 0 while this process uses its own.",
            value=1.0 if st.shared else 0.0,
        ),
        CounterMetricFamily("proxy_state_fallbacks", "Times Redis was lost (fell back).", value=st.fallbacks),
        GaugeMetricFamily("proxy_state_processes", "Processes sharing the state (last heartbeat).", value=st.processes),
    ]


def _tiers(configured: Sequence[str], seen: Iterable[str]) -> list[str]:
    """Configured tiers in config order, then any others seen (e.g. removed by a reload)."""
    extra = sorted(set(seen).difference(configured))
    return [*configured, *extra]
