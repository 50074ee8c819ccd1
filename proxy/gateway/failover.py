"""The attempt loop: walk the plan's chain with retries, backoff, Retry-After, breakers, deadline.

What the loop answers when every tier failed is in exhausted.py.

It does no I/O itself: `send` performs one attempt (upstream.attempt in production, anything
in tests), so every rule here can be exercised without a network.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from proxy.config import RetrySpec, Tier
from proxy.errors import ProxyError
from proxy.gateway.breaker import Breaker, BreakerBoard, Ticket
from proxy.gateway.exhausted import (
    RATE_LIMIT_DEFAULT_WAIT,
    Verdict,
    all_open,
    chain_failed,
    outage_tiers,
    retry_after,
    verdict,
)
from proxy.gateway.routing import Plan
from proxy.gateway.upstream import Reply
from proxy.records import AttemptOutcome, AttemptRecord

if TYPE_CHECKING:
    from proxy.state.breakers import SharedBreakers

log = logging.getLogger("proxy.failover")

SendAttempt = Callable[[Tier, AttemptRecord, float], Awaitable[Reply]]


class SpendHolds(Protocol):
    """What the loop needs of the money gate (gateway/spend.py): a priced attempt is sent only
    once its worst case is held, and holds only what it cost once it is over."""

    async def reserve(self, tier: Tier, n: int) -> bool: ...

    def settle(self, tier: Tier, rec: AttemptRecord) -> None: ...

    def refusal(self) -> ProxyError: ...


@dataclass(slots=True)
class ChainResult:
    attempts: list[AttemptRecord] = field(default_factory=list)
    tier: Tier | None = None  # the tier whose reply is returned
    reply: Reply | None = None  # success, a committed stream, or an upstream refusal passed on
    refused: bool = False  # reply is an upstream 4xx passed through as is
    # reply is the last answer the quality gate refused (no tier gave a good one), from `answered`
    invalid: bool = False
    answered: AttemptRecord | None = None  # the attempt whose reply is returned
    error: ProxyError | None = None
    over_budget: list[str] = field(default_factory=list)  # tiers left out: their worst case did not fit


@dataclass(slots=True)
class _Walk:
    """What one run has seen besides its attempts: each tier's last breaker ticket (to trip it
    open if the whole chain fails) and when a tier that rate limited it takes calls again."""

    tickets: dict[str, tuple[Breaker, Ticket]] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)
    refusal: tuple[Tier, Reply] | None = None
    bad_answer: tuple[Tier, Reply, AttemptRecord] | None = None


@dataclass(slots=True)
class Failover:
    retries: RetrySpec
    breakers: BreakerBoard
    rng: random.Random
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    shared: SharedBreakers | None = None  # state.url: the breakers live in Redis (proxy/state/)

    async def run(
        self,
        plan: Plan,
        send: SendAttempt,
        attempts: list[AttemptRecord] | None = None,
        spend: SpendHolds | None = None,
    ) -> ChainResult:
        """Walk the chain. `attempts` (the caller's list) sees every attempt as it starts, so a
        caller cancelled midway still knows what was tried. With `spend`, a tier whose attempt
        cannot hold its worst-case cost is left out, as over budget. A tier whose breaker says no
        is skipped; when that leaves nothing to try, the answer is 503 at once."""
        result = ChainResult(attempts=attempts if attempts is not None else [])
        deadline = self.clock() + self.retries.request_deadline_seconds
        walk = _Walk()
        for tier in plan.chain:
            if await self._tier(tier, plan, send, result, walk, deadline, spend):
                return result
        return await self._exhausted(plan, result, walk, spend)

    async def _tier(
        self,
        tier: Tier,
        plan: Plan,
        send: SendAttempt,
        result: ChainResult,
        walk: _Walk,
        deadline: float,
        spend: SpendHolds | None,
    ) -> bool:
        """One tier's attempts; True when the request is over (an answer, or the deadline)."""
        breaker = self.breakers.get(tier.id)
        tries = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                secs = self.retries.request_deadline_seconds
                result.error = chain_failed(result.attempts, {}, deadline=secs)
                return True
            if tries and len(result.attempts) >= self.retries.max_total_retries:
                return False
            # After a bad answer the tier is up and this request is owed its retry there, even if
            # that answer just opened the breaker (the retry does not count for the breaker).
            asked_again = bool(tries) and result.attempts[-1].outcome is AttemptOutcome.INVALID_OUTPUT
            last_resort = plan.all_open or asked_again
            shared = self.shared
            if shared is None:
                ticket = breaker.acquire(self.clock(), last_resort=last_resort)
            else:
                ticket = await shared.acquire(tier.id, self.clock(), last_resort=last_resort)
            if ticket is None:  # open, or its half-open probe is out
                return False
            n = len(result.attempts) + 1
            if spend is not None and not await spend.reserve(tier, n):
                if shared is None:
                    breaker.on_neutral(ticket)
                else:
                    await shared.on_neutral(tier.id, ticket)
                result.over_budget.append(tier.id)
                return False
            rec = AttemptRecord(n=n, tier=tier.id, model=tier.model, started_at=time.time())
            result.attempts.append(rec)
            tries += 1
            try:
                reply = await send(tier, rec, min(tier.timeout, remaining))
            except BaseException:
                # An attempt that never finished (client gone, a bug) must not keep the
                # breaker's half-open probe slot forever.
                if shared is None:
                    breaker.on_neutral(ticket)
                else:
                    shared.neutral_soon(tier.id, ticket)
                raise
            if spend is not None and not reply.committed:
                spend.settle(tier, rec)
            v = verdict(rec)
            await self._update_breaker(tier, breaker, ticket, rec, v)
            walk.tickets[tier.id] = (breaker, ticket)
            if v is Verdict.OK or reply.committed:
                result.tier, result.reply, result.answered = tier, reply, rec
                return True
            if rec.http_status == 429:
                wait = RATE_LIMIT_DEFAULT_WAIT if reply.retry_after is None else reply.retry_after
                walk.ready_at[tier.id] = self.clock() + wait
            if v is Verdict.REFUSED:
                walk.refusal = (tier, reply)
            if rec.outcome is AttemptOutcome.INVALID_OUTPUT and reply.body is not None:
                walk.bad_answer = (tier, reply, rec)
            if not self._again(tier, rec, reply, v, tries) or len(result.attempts) >= self.retries.max_total_retries:
                return False
            if rec.outcome is AttemptOutcome.INVALID_OUTPUT:
                continue  # the tier is fine, its answer was not: ask again at once
            delay = self._delay(tries, reply.retry_after, deadline)
            if delay is None:
                return False
            await self.sleep(delay)

    def _again(self, tier: Tier, rec: AttemptRecord, reply: Reply, v: Verdict, tries: int) -> bool:
        """Whether this tier gets another attempt. A paid tier is tried once per request unless
        it asked to be retried (429/503 with Retry-After) or `retries.paid_retries` is "always":
        every attempt there may be billed, and the free tiers after it cost nothing."""
        if v is not Verdict.RETRY or tries >= self.retries.max_fallback_retries:
            return False
        if tier.paid and self.retries.paid_retries == "when_asked":
            return rec.http_status in (429, 503) and reply.retry_after is not None
        return True

    async def _exhausted(self, plan: Plan, result: ChainResult, walk: _Walk, spend: SpendHolds | None) -> ChainResult:
        if walk.bad_answer is not None:
            # The proxy stays transparent: the last bad answer, as it came, marked as failed.
            result.tier, result.reply, result.answered = walk.bad_answer
            result.invalid = True
            return result
        if walk.refusal is not None and all(verdict(a) is Verdict.REFUSED for a in result.attempts):
            result.tier, result.reply, result.refused = walk.refusal[0], walk.refusal[1], True
            return result
        if not result.attempts and result.over_budget and spend is not None:
            result.error = spend.refusal()
            return result
        now = self.clock()
        for tier_id in outage_tiers(result.attempts) if self.breakers.open_on_outage else ():
            breaker, ticket = walk.tickets[tier_id]
            if self.shared is None:
                breaker.trip(ticket, now)
            else:
                await self.shared.trip(tier_id, ticket, now)
        headers = retry_after(plan.chain, self.breakers, walk.ready_at, now)
        if not result.attempts:
            result.error = all_open(headers)
        else:
            result.error = chain_failed(result.attempts, headers, over_budget=result.over_budget)
        return result

    def _delay(self, tries: int, retry_after: float | None, deadline: float) -> float | None:
        """Backoff before retrying the same tier; None means fail over now instead."""
        base: float = min(self.retries.backoff_initial_seconds * 2 ** (tries - 1), self.retries.backoff_max_seconds)
        delay = base * (0.5 + self.rng.random() / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if delay >= deadline - self.clock():
            return None
        return delay

    async def _update_breaker(
        self, tier: Tier, breaker: Breaker, ticket: Ticket, rec: AttemptRecord, v: Verdict
    ) -> None:
        # The ticket says whether this result still counts (see breaker.py): an attempt that
        # started before the breaker opened must neither close it nor extend its cooldown.
        shared = self.shared
        bad = rec.outcome is AttemptOutcome.INVALID_OUTPUT
        if shared is not None:
            if v is Verdict.OK:
                await shared.on_success(tier.id, ticket)
            elif v is Verdict.REFUSED:
                await shared.on_neutral(tier.id, ticket)
            else:
                await shared.on_failure(tier.id, ticket, self.clock(), bad_answer=bad)
        elif v is Verdict.OK:
            breaker.on_success(ticket)
        elif v is Verdict.REFUSED:
            breaker.on_neutral(ticket)
        else:
            breaker.on_failure(ticket, self.clock(), bad_answer=bad)
        if rec.http_status in (401, 403):
            log.error(
                "tier %s rejected the proxy's API key (HTTP %s): check %s; not retrying this tier",
                tier.id,
                rec.http_status,
                tier.api_key_env or "its api_key_env setting",
            )
