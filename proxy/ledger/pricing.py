"""Exact money: what a call cost, in Decimal USD, and the integer nano-dollars stored for it.

Floats never touch a price: prices arrive as Decimal from the config, token counts are ints,
and the result is converted once to integer nano-dollars (1e-9 USD) for storage and sums.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from proxy.config import Config, Price
from proxy.records import AttemptOutcome, AttemptRecord, Usage, UsageSource

ZERO = Decimal(0)
FREE = Price(ZERO, ZERO, ZERO, None)
NANOS_PER_USD = 1_000_000_000
_MTOK = Decimal(1_000_000)
_NANO = Decimal(NANOS_PER_USD)
_MICRO = Decimal("0.000001")


def _has_tokens(usage: Usage | None) -> bool:
    return usage is not None and usage.source != UsageSource.NONE


def cost_usd(usage: Usage | None, price: Price) -> Decimal:
    """What `price` charges for one call that used `usage` (exact).

    Without token counts from the upstream (none, or only the proxy's estimate) the flat
    per-call price applies where the tier has one; estimated tokens are priced otherwise.
    """
    if usage is None or usage.source != UsageSource.UPSTREAM:
        if price.per_call_usd is not None:
            return price.per_call_usd
        if usage is None or usage.source == UsageSource.NONE:
            return ZERO
    prompt = max(usage.prompt_tokens, 0)
    # cached_tokens is a subset of prompt_tokens; clamping means a malformed usage object can
    # neither bill the cached part twice nor produce a negative uncached part.
    cached = min(max(usage.cached_tokens, 0), prompt)
    completion = max(usage.completion_tokens, 0)
    total = (
        (prompt - cached) * price.input_per_mtok
        + cached * price.cached_input_per_mtok
        + completion * price.output_per_mtok
    )
    return total / _MTOK


def baseline_cost_usd(usage: Usage | None, baseline_price: Price | None) -> Decimal:
    """What the baseline (first paid) tier would have charged for the same call."""
    if baseline_price is None:
        return ZERO
    return cost_usd(usage, baseline_price)


_ANSWERED = (AttemptOutcome.OK, AttemptOutcome.INVALID_OUTPUT)


def attempt_cost_usd(attempt: AttemptRecord, price: Price) -> Decimal:
    """A failed attempt is only charged for tokens the upstream says it used.

    The flat per-call price is for answered calls: a timeout or a 5xx is not billed, a bad
    answer (`invalid_output`: a 200 that failed the quality gate) is, like a good one.
    """
    if attempt.outcome in _ANSWERED:
        return cost_usd(attempt.usage, price)
    if _has_tokens(attempt.usage):
        return cost_usd(attempt.usage, price)
    return ZERO


def baseline_price(config: Config) -> Price | None:
    """The price of the first paid tier in config order, the yardstick for savings."""
    for tier in config.tiers:
        if tier.paid:
            return tier.price
    return None


def to_nano(usd: Decimal) -> int:
    """Decimal USD -> integer nano-dollars (banker's rounding below 1e-9 USD)."""
    return int((usd * _NANO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_nano(nano: int) -> Decimal:
    return Decimal(nano) / _NANO


def nano_to_float(nano: int) -> float:
    """For the REAL columns: the float closest to the exact value, not a float sum."""
    return nano / NANOS_PER_USD


def round_micro(usd: Decimal) -> Decimal:
    return usd.quantize(_MICRO, rounding=ROUND_HALF_EVEN)
