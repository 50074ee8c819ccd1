"""What the routing rules alone give: the proxy's own `make_plan`, `Failover` and breakers, in-process.

The economics run measures a few thousand calls through the real server, so its usable share
carries counting noise (10 unusable answers in 10,000 is 99.90%, 5 is 99.95%). This runs the same
rules on many more calls with no I/O: each attempt is bad with its tier's rate, the calls come
one after another with the breaker's cooldown over by the next call (as in `bench.economics`),
so its figures are what the measured ones scatter around. With `escalate_after_failures` set
out of reach it also shows what the breaker itself costs.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from proxy.config import Tier, build_config
from proxy.gateway.breaker import BreakerBoard
from proxy.gateway.failover import Failover
from proxy.gateway.routing import RouteHints, make_plan
from proxy.gateway.upstream import Reply
from proxy.records import AttemptOutcome, AttemptRecord

_HINTS = {"normal": RouteHints(), "minor": RouteHints(replan="minor"), "complex": RouteHints(complexity="complex")}


def expected(
    n: int,
    seed: int,
    mix: tuple[tuple[str, float], ...],
    bad_rates: tuple[tuple[str, float], ...],
    escalate_after: int = 3,
) -> dict[str, Any]:
    raw = {
        "strategic_planner": {
            "primary_llm": "llama",
            "max_fallback_retries": 2,
            "max_total_retries": 5,
            "escalate_after_failures": escalate_after,
            "use_llama_for_minor_replans": True,
        },
        "kimi": {"api_key_env": "ECON_MODEL_KEY"},
        "routing": {"breaker_cooldown_seconds": 1.0},
    }
    config = build_config(raw, "<econ-model>", {"ECON_MODEL_KEY": "unused"})
    board = BreakerBoard.for_routing(config.routing)
    now = [0.0]
    failover = Failover(config.retries, board, random.Random(seed), clock=lambda: now[0])
    rng = random.Random(seed)
    bad = dict(bad_rates)
    kinds, weights = zip(*mix, strict=True)

    async def send(tier: Tier, rec: AttemptRecord, timeout: float) -> Reply:
        rec.checked = True
        if rng.random() < bad[tier.id]:
            rec.fail(AttemptOutcome.INVALID_OUTPUT, "bad answer")
        return Reply(body=b"{}")

    per: dict[str, list[int]] = {k: [0, 0, 0] for k in kinds}  # calls, unusable, paid

    async def calls() -> None:
        for _ in range(n):
            now[0] += 2.0  # the next call: the 1 s cooldown is over, as in the real run
            kind = rng.choices(kinds, weights)[0]
            plan = make_plan(config, _HINTS[kind], board.blocked(now[0]))
            result = await failover.run(plan, send)
            counts = per[kind]
            counts[0] += 1
            counts[1] += result.invalid or result.error is not None
            counts[2] += any(config.tier(a.tier).paid for a in result.attempts)

    asyncio.run(calls())
    total = sum(c[0] for c in per.values())
    return {
        "calls": total,
        "escalate_after_failures": escalate_after,
        "usable": 1 - sum(c[1] for c in per.values()) / total,
        "paid": sum(c[2] for c in per.values()) / total,
        "usable_by_kind": {k: 1 - c[1] / c[0] for k, c in per.items() if c[0]},
    }
