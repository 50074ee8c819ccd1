"""Per-tier circuit breakers, shared by every request of the process.

A tier's breaker opens after `threshold` consecutive failed attempts (across requests) and
stays open for `cooldown` seconds; then one request at a time may probe it, and
`successes_to_close` successful probes in a row close it again. Routing reads the state to
escalate; the failover loop reports every attempt's result here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.config import RoutingSpec


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    threshold: int
    cooldown: float
    successes_to_close: int = 1
    failures: int = 0  # consecutive failed attempts
    opened_at: float | None = None
    probing: bool = False  # a half-open probe is in flight
    probe_successes: int = 0

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now - self.opened_at < self.cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def blocks(self, now: float) -> bool:
        """True when a new request should not start with this tier."""
        state = self.state(now)
        return state is BreakerState.OPEN or (state is BreakerState.HALF_OPEN and self.probing)

    def acquire(self, now: float) -> bool:
        """Ask to send one attempt; in half-open state only one probe runs at a time."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self.probing:
            return False
        self.probing = True
        return True

    def on_success(self) -> None:
        self.failures = 0
        if self.opened_at is not None:
            self.probing = False
            self.probe_successes += 1
            if self.probe_successes >= self.successes_to_close:
                self.opened_at = None
                self.probe_successes = 0

    def on_failure(self, now: float) -> None:
        self.failures += 1
        self.probing = False
        self.probe_successes = 0
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now

    def on_neutral(self) -> None:
        """The tier answered but refused this request (e.g. a 400): it is up, but this proves nothing."""
        self.probing = False


@dataclass(slots=True)
class BreakerBoard:
    threshold: int
    cooldown: float
    successes_to_close: int
    breakers: dict[str, Breaker] = field(default_factory=dict)

    @classmethod
    def for_routing(cls, routing: RoutingSpec) -> BreakerBoard:
        return cls(routing.escalate_after_failures, routing.breaker_cooldown_seconds, routing.recovery_threshold)

    def reconfigure(self, routing: RoutingSpec) -> None:
        """After a reload: new limits for every breaker; their counts and open state carry over."""
        self.threshold = routing.escalate_after_failures
        self.cooldown = routing.breaker_cooldown_seconds
        self.successes_to_close = routing.recovery_threshold
        for b in self.breakers.values():
            b.threshold, b.cooldown, b.successes_to_close = self.threshold, self.cooldown, self.successes_to_close

    def get(self, tier_id: str) -> Breaker:
        b = self.breakers.get(tier_id)
        if b is None:
            b = self.breakers[tier_id] = Breaker(self.threshold, self.cooldown, self.successes_to_close)
        return b

    def blocked(self, now: float) -> frozenset[str]:
        return frozenset(t for t, b in self.breakers.items() if b.blocks(now))

    def snapshot(self, now: float) -> dict[str, BreakerState]:
        return {t: b.state(now) for t, b in self.breakers.items()}
