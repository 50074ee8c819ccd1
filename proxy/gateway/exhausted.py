"""What the failover loop answers when no tier gave an answer: the error, and when to come back.

Each error says, in its message, every attempt and how it ended; its `Retry-After` is the real
wait (the upstreams' own Retry-After when they were rate limiting, else the time until the
earliest circuit breaker of the chain lets a probe through), and its code makes the response
carry `x-should-retry: false` (proxy/errors.py): the proxy already retried and failed over, so
a client's automatic retry would only walk the same chain again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping

from proxy.config import Tier
from proxy.errors import ChainFailed, Unavailable
from proxy.gateway.breaker import BreakerBoard
from proxy.records import AttemptOutcome, AttemptRecord

# A 429 without Retry-After: the tier is taken to accept calls again after this long.
RATE_LIMIT_DEFAULT_WAIT = 1.0


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # may be retried on the same tier
    NEXT = "next"  # go straight to the next tier (timeouts, bad keys)
    REFUSED = "refused"  # the tier rejected the request itself (400/404/413/422/501...)


def verdict(rec: AttemptRecord) -> Verdict:
    outcome = rec.outcome
    if outcome is AttemptOutcome.OK:
        return Verdict.OK
    if outcome is AttemptOutcome.TIMEOUT:
        return Verdict.NEXT
    if outcome is not AttemptOutcome.HTTP_ERROR:
        return Verdict.RETRY
    status = rec.http_status or 0
    if status in (401, 403) or 300 <= status < 400:  # a bad key, or a redirect that is never followed
        return Verdict.NEXT
    if status == 501:  # the tier's server lacks this endpoint (llama.cpp without embeddings): not an outage
        return Verdict.REFUSED
    if status in (408, 429) or status >= 500:
        return Verdict.RETRY
    return Verdict.REFUSED


def outage_tiers(attempts: list[AttemptRecord]) -> set[str]:
    """The tiers to trip open after a walk in which every attempt failed: those that failed with
    something other than a 429 (a rate limit is not an outage, and says when it ends). Empty
    unless two tiers or more failed that way, with no success, refusal or bad answer at all: one
    tier's failures are its breaker's ordinary count, and one request must not open them all."""
    failed: set[str] = set()
    for a in attempts:
        if verdict(a) not in (Verdict.RETRY, Verdict.NEXT) or a.outcome is AttemptOutcome.INVALID_OUTPUT:
            return set()
        if a.http_status != 429:
            failed.add(a.tier)
    return failed if len(failed) >= 2 else set()


def retry_after(
    chain: Iterable[Tier], breakers: BreakerBoard, ready_at: Mapping[str, float], now: float
) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) when every tier of the chain is known to be
    unavailable for a while: its breaker is open (until it half-opens), or it rate limited this
    request (until its Retry-After ends); the soonest of them. No header when some tier's wait is
    unknown (it failed, but nothing says for how long)."""
    waits: list[float] = []
    for tier in chain:
        wait = breakers.wait(tier.id, now)
        if wait is None and tier.id in ready_at:
            wait = ready_at[tier.id] - now
        if wait is None:
            return {}
        waits.append(wait)
    if not waits:
        return {}
    # A millisecond of slack: `now` and the breaker's opening come from separate clock reads (and,
    # with shared state, another process), so a 30 s cooldown must not read as 30.0001 -> "31".
    return {"Retry-After": str(max(math.ceil(min(waits) - 0.001), 1))}


def all_open(headers: dict[str, str]) -> Unavailable:
    when = f" Retry after {headers['Retry-After']} s" if "Retry-After" in headers else " Retry shortly"
    return Unavailable(
        "No tier was tried: every tier's circuit breaker is open after repeated failures, and each "
        f"lets one probe through when its cooldown ends.{when} (the proxy answers at once until then).",
        code="all_tiers_open",
        headers=headers,
    )


def chain_failed(
    attempts: list[AttemptRecord],
    headers: dict[str, str],
    *,
    deadline: float | None = None,
    over_budget: list[str] | None = None,
) -> ChainFailed:
    """Every attempt failed; `deadline`: the request's deadline (seconds) cut the walk short."""
    steps = "; ".join(f"{a.tier} #{a.n}: {a.outcome.value} ({a.error})" for a in attempts)
    if over_budget:
        steps += "".join(f"; {t}: left out, over the spend budget" for t in over_budget)
    if deadline is not None:
        return ChainFailed(
            f"Request deadline of {deadline:g}s exceeded after {len(attempts)} attempt(s): {steps}",
            status=504,
            code="deadline_exceeded",
            headers=headers,
        )
    after = f" The proxy already retried and failed over; retry after {headers['Retry-After']} s." if headers else ""
    if all(a.outcome is AttemptOutcome.TIMEOUT for a in attempts):
        return ChainFailed(
            f"Every tier timed out: {steps}.{after}", status=504, code="upstream_timeout", headers=headers
        )
    if all(a.http_status == 429 for a in attempts):
        return ChainFailed(
            f"Every tier is rate limiting this proxy: {steps}.{after}",
            status=429,
            code="upstream_rate_limited",
            headers=headers or {"Retry-After": str(int(RATE_LIMIT_DEFAULT_WAIT))},
        )
    return ChainFailed(f"Every tier failed: {steps}.{after}", status=502, code="upstream_failed", headers=headers)
