"""Per-tier circuit breakers, shared by every request of the process.

A tier's breaker opens after `threshold` consecutive failed attempts (across requests) and
stays open for `cooldown` seconds; then one request at a time may probe it, and
`successes_to_close` successful probes in a row close it again. Routing reads the state to
escalate; the failover loop reports every attempt's result here.

An outage seen whole opens breakers at once (`routing.open_breakers_on_outage`): a request that
tried two tiers or more and got a failure from every one of them (not a refusal, a bad answer
or only 429s) `trip()`s each tier that failed, without waiting for `threshold`. So one chain
walk finds an outage, and until the cooldowns end requests are answered 503 at once instead of
walking the chain again.

Which results count. Every attempt starts with `acquire()`, which says no while the breaker is
open or its probe is out (unless, as a last resort, it opened on bad answers: that tier is up),
and hands the `Ticket` it got back with its result. The
breaker's life is a series of periods, numbered by `epoch`: a closed period, an open period
(cooldown, then half-open probes), a closed period again, and so on. A ticket belongs to the
period it was issued in, and its result counts only in that period:

- Closed: a success resets the consecutive-failure count, a failure adds to it, and reaching
  `threshold` opens the breaker (a new period).
- Open or half-open: only the probe's ticket counts. Its success counts toward closing; its
  failure re-opens the breaker for a whole new cooldown from now; a refusal or a cancelled
  probe frees the probe slot for the next request.
- Anything else is stale and ignored: an attempt that started before the breaker opened and
  finishes after it (its success must not close a breaker that opened meanwhile, its failure
  must not push the end of the cooldown out, which a stream of slow failures would do forever),
  an attempt of an earlier closed period finishing after a recovery, and last-resort attempts
  (they are not the probe, so they say nothing about whether the cooldown may end early).

So the cooldown always runs its full length from the failure that opened the breaker (or from
the failed probe), and only a probe admitted after it can close the breaker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.config import RoutingSpec
from proxy.records import Escalation


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Issued with each attempt, handed back with its result: which period it belongs to."""

    epoch: int
    probe: bool = False  # the half-open probe of its open period
    shared: bool = False  # issued by the shared breaker in Redis (proxy/state/breakers.py)


@dataclass(slots=True)
class Breaker:
    threshold: int
    cooldown: float
    successes_to_close: int = 1
    failures: int = 0  # consecutive failed attempts of the current closed period
    opened_at: float | None = None
    probing: bool = False  # a half-open probe is in flight
    probe_successes: int = 0
    epoch: int = 0  # the current period; each opening and each closing starts a new one
    bad_answers: int = 0  # of `failures`, how many were answers the quality gate refused
    opened_for: Escalation | None = None  # while open: mostly bad answers, or errors

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

    def acquire(self, now: float, *, last_resort: bool = False) -> Ticket | None:
        """Ask to send one attempt: None when it must not be sent (open, or another probe in
        flight); in half-open state the ticket is the probe's. `last_resort` (every tier of the
        chain is open): a breaker opened mostly on bad answers lets it through anyway, since
        its tier is up and its answer is judged as usual; that result does not count."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return Ticket(self.epoch)
        if state is BreakerState.HALF_OPEN and not self.probing:
            self.probing = True
            return Ticket(self.epoch, probe=True)
        if last_resort and self.opened_for is Escalation.BAD_ANSWERS:
            return Ticket(self.epoch)
        return None

    def wait(self, now: float) -> float | None:
        """Seconds until a new request may try this tier (for Retry-After): None when it may
        now; 0.0 while the half-open probe is out (it ends within the tier's timeout)."""
        state = self.state(now)
        if state is BreakerState.OPEN:
            assert self.opened_at is not None
            return self.opened_at + self.cooldown - now
        if state is BreakerState.HALF_OPEN and self.probing:
            return 0.0
        return None

    def trip(self, ticket: Ticket, now: float) -> None:
        """Open now, whatever the count: the ticket's request saw every tier it tried fail (see
        the module's docstring). Only a ticket of the current closed period counts."""
        if ticket.epoch == self.epoch and self.opened_at is None:
            self._open(now, self.bad_answers * 2 > self.failures)

    def on_success(self, ticket: Ticket) -> None:
        if ticket.epoch != self.epoch:
            return
        if self.opened_at is None:
            self.failures = self.bad_answers = 0
        elif ticket.probe:
            self.probing = False
            self.probe_successes += 1
            if self.probe_successes >= self.successes_to_close:
                self._close()

    def on_failure(self, ticket: Ticket, now: float, *, bad_answer: bool = False) -> None:
        """`bad_answer`: the tier answered, but not what was asked for (the quality gate)."""
        if ticket.epoch != self.epoch:
            return
        if self.opened_at is None:
            self.failures += 1
            self.bad_answers += bad_answer
            if self.failures >= self.threshold:
                self._open(now, self.bad_answers * 2 > self.failures)
        elif ticket.probe:
            self._open(now, bad_answer)

    def on_neutral(self, ticket: Ticket) -> None:
        """The tier answered but refused this request (e.g. a 400), or the attempt never
        finished: it proves nothing, but a probe's slot must be freed for the next request."""
        if ticket.probe and ticket.epoch == self.epoch:
            self.probing = False

    def _open(self, now: float, for_bad_answers: bool) -> None:
        self.epoch += 1
        self.opened_at = now
        self.opened_for = Escalation.BAD_ANSWERS if for_bad_answers else Escalation.FAILURES
        self.failures = self.bad_answers = 0
        self.probing = False
        self.probe_successes = 0

    def _close(self) -> None:
        self.epoch += 1
        self.opened_at = None
        self.opened_for = None
        self.failures = self.bad_answers = 0
        self.probing = False
        self.probe_successes = 0


@dataclass(slots=True)
class BreakerBoard:
    threshold: int
    cooldown: float
    successes_to_close: int
    breakers: dict[str, Breaker] = field(default_factory=dict)
    open_on_outage: bool = True  # trip the breakers of a chain whose every tier failed

    @classmethod
    def for_routing(cls, routing: RoutingSpec) -> BreakerBoard:
        return cls(
            routing.escalate_after_failures,
            routing.breaker_cooldown_seconds,
            routing.recovery_threshold,
            open_on_outage=routing.open_breakers_on_outage,
        )

    def reconfigure(self, routing: RoutingSpec) -> None:
        """After a reload: new limits for every breaker; their counts and open state carry over."""
        self.threshold = routing.escalate_after_failures
        self.cooldown = routing.breaker_cooldown_seconds
        self.successes_to_close = routing.recovery_threshold
        self.open_on_outage = routing.open_breakers_on_outage
        for b in self.breakers.values():
            b.threshold, b.cooldown, b.successes_to_close = self.threshold, self.cooldown, self.successes_to_close

    def get(self, tier_id: str) -> Breaker:
        b = self.breakers.get(tier_id)
        if b is None:
            b = self.breakers[tier_id] = Breaker(self.threshold, self.cooldown, self.successes_to_close)
        return b

    def wait(self, tier_id: str, now: float) -> float | None:
        b = self.breakers.get(tier_id)
        return None if b is None else b.wait(now)

    def blocked(self, now: float) -> frozenset[str]:
        return frozenset(t for t, b in self.breakers.items() if b.blocks(now))

    def snapshot(self, now: float) -> dict[str, BreakerState]:
        return {t: b.state(now) for t, b in self.breakers.items()}
