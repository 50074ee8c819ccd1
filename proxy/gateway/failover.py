"""The attempt loop: walk the plan's chain with retries, backoff, Retry-After, breakers, deadline.

It does no I/O itself: `send` performs one attempt (upstream.attempt in production, anything
in tests), so every rule here can be exercised without a network.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config import RetrySpec, Tier
from proxy.errors import ChainFailed, ProxyError, Unavailable
from proxy.gateway.breaker import Breaker, BreakerBoard, Ticket
from proxy.gateway.routing import Plan
from proxy.gateway.upstream import Reply
from proxy.records import AttemptOutcome, AttemptRecord

log = logging.getLogger("proxy.failover")

SendAttempt = Callable[[Tier, AttemptRecord, float], Awaitable[Reply]]


class SpendHolds(Protocol):
    """What the loop needs of the money gate (gateway/spend.py): a priced attempt is sent only
    once its worst case is held, and holds only what it cost once it is over."""

    def reserve(self, tier: Tier, n: int) -> bool: ...

    def unhold(self, n: int) -> None: ...

    def settle(self, tier: Tier, rec: AttemptRecord) -> None: ...

    def refusal(self) -> ProxyError: ...


class _Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # may be retried on the same tier
    NEXT = "next"  # go straight to the next tier (timeouts, bad keys)
    REFUSED = "refused"  # the tier rejected the request itself (400/404/413/422...)


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
class Failover:
    retries: RetrySpec
    breakers: BreakerBoard
    rng: random.Random
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def run(
        self,
        plan: Plan,
        send: SendAttempt,
        attempts: list[AttemptRecord] | None = None,
        spend: SpendHolds | None = None,
    ) -> ChainResult:
        """Walk the chain. `attempts` (the caller's list) sees every attempt as it starts, so a
        caller cancelled midway still knows what was tried. With `spend`, a tier whose attempt
        cannot hold its worst-case cost is left out, as over budget."""
        result = ChainResult(attempts=attempts if attempts is not None else [])
        deadline = self.clock() + self.retries.request_deadline_seconds
        refusal: tuple[Tier, Reply] | None = None
        bad_answer: tuple[Tier, Reply, AttemptRecord] | None = None
        for tier in plan.chain:
            breaker = self.breakers.get(tier.id)
            tries = 0
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    result.error = self._failed(result.attempts, deadline_hit=True)
                    return result
                if tries and len(result.attempts) >= self.retries.max_total_retries:
                    break
                n = len(result.attempts) + 1
                if spend is not None and not spend.reserve(tier, n):
                    result.over_budget.append(tier.id)
                    break
                ticket = breaker.bypass(self.clock()) if plan.forced else breaker.acquire(self.clock())
                if ticket is None:
                    if spend is not None:
                        spend.unhold(n)
                    break
                rec = AttemptRecord(n=n, tier=tier.id, model=tier.model, started_at=time.time())
                result.attempts.append(rec)
                tries += 1
                try:
                    reply = await send(tier, rec, min(tier.timeout, remaining))
                except BaseException:
                    # An attempt that never finished (client gone, a bug) must not keep the
                    # breaker's half-open probe slot forever.
                    breaker.on_neutral(ticket)
                    raise
                if spend is not None and not reply.committed:
                    spend.settle(tier, rec)
                verdict = _verdict(rec)
                self._update_breaker(tier, breaker, ticket, rec, verdict)
                if verdict is _Verdict.OK or reply.committed:
                    result.tier, result.reply, result.answered = tier, reply, rec
                    return result
                if verdict is _Verdict.REFUSED:
                    refusal = (tier, reply)
                if rec.outcome is AttemptOutcome.INVALID_OUTPUT and reply.body is not None:
                    bad_answer = (tier, reply, rec)
                if verdict is not _Verdict.RETRY or tries >= self.retries.max_fallback_retries:
                    break
                if len(result.attempts) >= self.retries.max_total_retries:
                    break
                if rec.outcome is AttemptOutcome.INVALID_OUTPUT:
                    continue  # the tier is fine, its answer was not: ask again at once
                delay = self._delay(tries, reply.retry_after, deadline)
                if delay is None:
                    break
                await self.sleep(delay)
        if bad_answer is not None:
            # The proxy stays transparent: the last bad answer, as it came, marked as failed.
            result.tier, result.reply, result.answered = bad_answer
            result.invalid = True
            return result
        if refusal is not None and all(_verdict(a) is _Verdict.REFUSED for a in result.attempts):
            result.tier, result.reply, result.refused = refusal[0], refusal[1], True
            return result
        if not result.attempts and result.over_budget and spend is not None:
            result.error = spend.refusal()
            return result
        result.error = self._failed(result.attempts, deadline_hit=False, over_budget=result.over_budget)
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

    def _update_breaker(
        self, tier: Tier, breaker: Breaker, ticket: Ticket, rec: AttemptRecord, verdict: _Verdict
    ) -> None:
        # The ticket says whether this result still counts (see breaker.py): an attempt that
        # started before the breaker opened must neither close it nor extend its cooldown.
        if verdict is _Verdict.OK:
            breaker.on_success(ticket)
        elif verdict is _Verdict.REFUSED:
            breaker.on_neutral(ticket)
        else:
            breaker.on_failure(ticket, self.clock(), bad_answer=rec.outcome is AttemptOutcome.INVALID_OUTPUT)
        if rec.http_status in (401, 403):
            log.error(
                "tier %s rejected the proxy's API key (HTTP %s): check %s; not retrying this tier",
                tier.id,
                rec.http_status,
                tier.api_key_env or "its api_key_env setting",
            )

    def _failed(
        self, attempts: list[AttemptRecord], *, deadline_hit: bool, over_budget: list[str] | None = None
    ) -> ChainFailed | Unavailable:
        if not attempts:
            return Unavailable(
                "No tier could be tried: every tier's circuit breaker is open after repeated failures. Retry shortly.",
                code="all_tiers_open",
                headers={"Retry-After": "1"},
            )
        steps = "; ".join(f"{a.tier} #{a.n}: {a.outcome.value} ({a.error})" for a in attempts)
        if over_budget:
            steps += "".join(f"; {t}: left out, over the spend budget" for t in over_budget)
        if deadline_hit:
            secs = self.retries.request_deadline_seconds
            return ChainFailed(
                f"Request deadline of {secs:g}s exceeded after {len(attempts)} attempt(s): {steps}",
                status=504,
                code="deadline_exceeded",
            )
        if all(a.outcome is AttemptOutcome.TIMEOUT for a in attempts):
            return ChainFailed(f"Every tier timed out: {steps}", status=504, code="upstream_timeout")
        if all(a.http_status == 429 for a in attempts):
            return ChainFailed(
                f"Every tier is rate limiting this proxy: {steps}",
                status=429,
                code="upstream_rate_limited",
                headers={"Retry-After": "1"},
            )
        return ChainFailed(f"Every tier failed: {steps}", status=502, code="upstream_failed")


def _verdict(rec: AttemptRecord) -> _Verdict:
    outcome = rec.outcome
    if outcome is AttemptOutcome.OK:
        return _Verdict.OK
    if outcome is AttemptOutcome.TIMEOUT:
        return _Verdict.NEXT
    if outcome is not AttemptOutcome.HTTP_ERROR:
        return _Verdict.RETRY
    status = rec.http_status or 0
    if status in (401, 403) or 300 <= status < 400:  # a bad key, or a redirect that is never followed
        return _Verdict.NEXT
    if status in (408, 429) or status >= 500:
        return _Verdict.RETRY
    return _Verdict.REFUSED
