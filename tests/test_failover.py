"""The failover loop on its own: a scripted `send`, a virtual clock, no network."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

from proxy.config import RetrySpec, Tier, build_config
from proxy.gateway.breaker import BreakerBoard, BreakerState
from proxy.gateway.failover import Failover
from proxy.gateway.routing import RouteHints, make_plan
from proxy.gateway.upstream import Reply
from proxy.records import AttemptOutcome, AttemptRecord

CONFIG = build_config({}, "<t>", {"MOONSHOT_API_KEY": "k"})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """Per tier, a queue of (outcome, http_status, retry_after, seconds taken)."""

    def __init__(self, clock: Clock, **per_tier: Iterable[tuple[AttemptOutcome, int | None, float | None, float]]):
        self.clock = clock
        self.queues = {k: deque(v) for k, v in per_tier.items()}
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, tier: Tier, rec: AttemptRecord, timeout: float) -> Reply:
        self.calls.append((tier.id, timeout))
        outcome, status, retry_after, took = self.queues[tier.id].popleft()
        self.clock.now += min(took, timeout)
        rec.outcome, rec.http_status = outcome, status
        return Reply(retry_after=retry_after)


OK = (AttemptOutcome.OK, 200, None, 0.01)
E500 = (AttemptOutcome.HTTP_ERROR, 500, None, 0.01)
SLOW = (AttemptOutcome.TIMEOUT, None, None, 99.0)


def failover(clock: Clock, threshold: int = 3, **retries: float) -> Failover:
    spec = RetrySpec(
        **{
            "max_fallback_retries": 3,
            "max_total_retries": 10,
            "backoff_initial_seconds": 0.1,
            "backoff_max_seconds": 1.0,
            "request_deadline_seconds": 30.0,
            **retries,
        }  # type: ignore[arg-type]
    )
    board = BreakerBoard(threshold=threshold, cooldown=10.0, successes_to_close=1)
    return Failover(retries=spec, breakers=board, rng=random.Random(1), clock=clock, sleep=clock.sleep)


def plan(**hints: object):  # type: ignore[no-untyped-def]
    return make_plan(CONFIG, RouteHints(**hints), frozenset())  # type: ignore[arg-type]


async def test_backoff_grows_exponentially_with_jitter_and_caps() -> None:
    clock = Clock()
    send = Script(clock, llama=[E500] * 5 + [OK])
    result = await failover(clock, threshold=10, max_fallback_retries=6).run(plan(), send)
    assert result.tier is not None and result.tier.id == "llama"
    bases = [0.1, 0.2, 0.4, 0.8, 1.0]
    assert len(clock.sleeps) == 5
    for slept, base in zip(clock.sleeps, bases, strict=True):
        assert base / 2 <= slept <= base


async def test_breaker_opening_mid_request_stops_retrying_that_tier() -> None:
    clock = Clock()
    send = Script(clock, llama=[E500] * 3, ollama=[OK])
    result = await failover(clock, threshold=2, max_fallback_retries=3).run(plan(), send)
    assert [c[0] for c in send.calls] == ["llama", "llama", "ollama"]
    assert result.tier is not None and result.tier.id == "ollama"


async def test_retry_after_longer_than_backoff_is_honoured() -> None:
    clock = Clock()
    send = Script(clock, llama=[(AttemptOutcome.HTTP_ERROR, 429, 3.0, 0.0), OK])
    await failover(clock).run(plan(), send)
    assert clock.sleeps == [3.0]


async def test_retry_after_past_deadline_fails_over_without_waiting() -> None:
    clock = Clock()
    send = Script(clock, llama=[(AttemptOutcome.HTTP_ERROR, 429, 60.0, 0.0)], ollama=[OK])
    result = await failover(clock, request_deadline_seconds=10).run(plan(), send)
    assert clock.sleeps == [] and result.tier is not None and result.tier.id == "ollama"


async def test_timeout_passed_is_capped_by_deadline_and_ends_in_504() -> None:
    clock = Clock()
    send = Script(clock, llama=[SLOW], ollama=[SLOW], kimi=[SLOW])
    result = await failover(clock, request_deadline_seconds=45).run(plan(), send)
    # llama 30s timeout, ollama gets 15s left (not its 20s), then the deadline is spent
    assert send.calls == [("llama", 30.0), ("ollama", 15.0)]
    assert result.error is not None and result.error.status == 504
    assert result.error.code == "deadline_exceeded"


async def test_all_429_is_a_429_with_retry_after() -> None:
    clock = Clock()
    r429 = (AttemptOutcome.HTTP_ERROR, 429, None, 0.0)
    send = Script(clock, llama=[r429], ollama=[r429], kimi=[r429])
    result = await failover(clock, max_fallback_retries=1).run(plan(), send)
    assert result.error is not None and result.error.status == 429 and "Retry-After" in result.error.headers


async def test_breaker_opens_after_threshold_and_admits_one_probe() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Script(clock, llama=[E500, E500, E500], ollama=[OK, OK, OK])
    for _ in range(3):
        await fo.run(plan(), send)
    breaker = fo.breakers.get("llama")
    assert breaker.state(clock()) is BreakerState.OPEN
    assert make_plan(CONFIG, RouteHints(), fo.breakers.blocked(clock())).route.value == "escalated"
    clock.now += 10.0
    assert breaker.state(clock()) is BreakerState.HALF_OPEN
    assert breaker.acquire(clock()) is True
    assert breaker.acquire(clock()) is False, "only one probe at a time"
    assert "llama" in fo.breakers.blocked(clock())
    breaker.on_success()
    assert breaker.state(clock()) is BreakerState.CLOSED


async def test_refusal_neither_opens_breaker_nor_retries() -> None:
    clock = Clock()
    r400 = (AttemptOutcome.HTTP_ERROR, 400, None, 0.0)
    fo = failover(clock)
    send = Script(clock, llama=[r400] * 5, ollama=[r400] * 5, kimi=[r400] * 5)
    for _ in range(4):
        result = await fo.run(plan(), send)
        assert result.refused and result.tier is not None and result.tier.id == "kimi"
    assert fo.breakers.get("llama").state(clock()) is BreakerState.CLOSED
    assert [c[0] for c in send.calls[:3]] == ["llama", "ollama", "kimi"]
