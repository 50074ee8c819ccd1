from __future__ import annotations

from decimal import Decimal

from proxy.config import Price, load_config
from proxy.ledger.pricing import (
    FREE,
    attempt_cost_usd,
    baseline_cost_usd,
    baseline_price,
    cost_usd,
    from_nano,
    nano_to_float,
    round_micro,
    to_nano,
)
from proxy.records import AttemptOutcome, AttemptRecord, Usage, UsageSource

KIMI = Price(Decimal("0.60"), Decimal("0.15"), Decimal("2.50"), Decimal("0.0008"))
TOKENS_ONLY = Price(Decimal("0.60"), Decimal("0.15"), Decimal("2.50"), None)


def test_tokens_priced_per_million_with_cached_prompt_at_the_cached_rate() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400)
    # 600 uncached * 0.60 + 400 cached * 0.15 + 500 * 2.50, per million
    expected = (600 * Decimal("0.60") + 400 * Decimal("0.15") + 500 * Decimal("2.50")) / 1_000_000
    assert cost_usd(usage, KIMI) == expected == Decimal("0.00167")


def test_no_float_drift_over_many_calls() -> None:
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    total = sum((cost_usd(usage, KIMI) for _ in range(100_000)), Decimal(0))
    assert total == Decimal("0.31")  # (0.60 + 2.50) / 10: a float sum is off in the last digits
    assert sum(float(cost_usd(usage, KIMI)) for _ in range(100_000)) != 0.31


def test_flat_per_call_price_without_usage() -> None:
    assert cost_usd(None, KIMI) == Decimal("0.0008")
    assert cost_usd(Usage(10, 10, 0, UsageSource.NONE), KIMI) == Decimal("0.0008")
    assert cost_usd(None, TOKENS_ONLY) == 0


def test_estimated_usage_takes_the_flat_price_else_is_priced_by_tokens() -> None:
    usage = Usage(prompt_tokens=2000, completion_tokens=0, source=UsageSource.ESTIMATED)
    assert cost_usd(usage, KIMI) == Decimal("0.0008"), "no usage from upstream: the flat per-call price"
    assert cost_usd(usage, TOKENS_ONLY) == Decimal("0.0012")


def test_free_tier_costs_nothing() -> None:
    assert cost_usd(Usage(10_000, 10_000, 5_000), FREE) == 0
    assert cost_usd(None, FREE) == 0


def test_cached_tokens_above_prompt_are_clamped() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=0, cached_tokens=500)
    assert cost_usd(usage, KIMI) == 100 * Decimal("0.15") / 1_000_000


def test_baseline_is_the_first_paid_tier_of_the_config() -> None:
    config = load_config(None, {})
    price = baseline_price(config)
    assert price == config.tier("kimi").price
    usage = Usage(1000, 1000)
    assert baseline_cost_usd(usage, price) == Decimal("0.0031")
    assert baseline_cost_usd(None, price) == Decimal("0.0008")
    assert baseline_cost_usd(usage, None) == 0


def test_failed_attempt_pays_only_for_reported_tokens() -> None:
    def attempt(outcome: AttemptOutcome, usage: Usage | None) -> AttemptRecord:
        return AttemptRecord(n=1, tier="kimi", model="k", started_at=0.0, outcome=outcome, usage=usage)

    assert attempt_cost_usd(attempt(AttemptOutcome.TIMEOUT, None), KIMI) == 0
    assert attempt_cost_usd(attempt(AttemptOutcome.OK, None), KIMI) == Decimal("0.0008")
    assert attempt_cost_usd(attempt(AttemptOutcome.BAD_RESPONSE, Usage(0, 400)), KIMI) == Decimal("0.001")


def test_nano_dollar_conversions() -> None:
    assert to_nano(Decimal("0.0008")) == 800_000
    assert to_nano(Decimal("0.0000000015")) == 2  # half-even at the ninth decimal
    assert from_nano(800_000) == Decimal("0.0008")
    assert nano_to_float(800_000) == 0.0008
    assert round_micro(Decimal("0.0000125")) == Decimal("0.000012")
