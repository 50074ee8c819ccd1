"""The failover loop on its own: a scripted `send`, a virtual clock, no network."""

from __future__ import annotations

import asyncio
import contextlib
import math
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
    probe = breaker.acquire(clock())
    assert probe is not None and probe.probe
    assert breaker.acquire(clock()) is None, "only one probe at a time"
    assert "llama" in fo.breakers.blocked(clock())
    breaker.on_success(probe)
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


class Gated:
    """A `send` whose llama attempts wait for `gate` when scripted to: calls in flight while
    other calls change the breaker. Per tier, a queue of (outcome, status, held)."""

    def __init__(self, clock: Clock, **per_tier: Iterable[tuple[AttemptOutcome, int | None, bool]]):
        self.clock = clock
        self.gate = asyncio.Event()
        self.queues = {k: deque(v) for k, v in per_tier.items()}
        self.held = 0
        self.calls: list[str] = []

    async def __call__(self, tier: Tier, rec: AttemptRecord, timeout: float) -> Reply:
        self.calls.append(tier.id)
        outcome, status, held = self.queues[tier.id].popleft()
        if held:
            self.held += 1
            await self.gate.wait()
        rec.outcome, rec.http_status = outcome, status
        return Reply()


G_OK = (AttemptOutcome.OK, 200, False)
G_500 = (AttemptOutcome.HTTP_ERROR, 500, False)
HELD_OK = (AttemptOutcome.OK, 200, True)
HELD_500 = (AttemptOutcome.HTTP_ERROR, 500, True)


async def _hold(fo: Failover, send: Gated, n: int) -> list[asyncio.Task[object]]:
    """Start n llama-only requests and wait until all are in flight."""
    tasks: list[asyncio.Task[object]] = [asyncio.create_task(fo.run(plan(fallback=False), send)) for _ in range(n)]
    while send.held < n:
        await asyncio.sleep(0)
    return tasks


async def test_in_flight_successes_do_not_close_a_breaker_that_opened_meanwhile() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Gated(clock, llama=[HELD_OK] * 5 + [G_500] * 3 + [G_OK], ollama=[G_OK] * 3)
    held = await _hold(fo, send, 5)
    for _ in range(3):
        await fo.run(plan(), send)
    breaker = fo.breakers.get("llama")
    assert breaker.state(clock()) is BreakerState.OPEN
    clock.now = 1.0
    send.gate.set()
    for r in await asyncio.gather(*held):
        assert r.tier is not None and r.tier.id == "llama"  # type: ignore[attr-defined]
    assert breaker.state(clock()) is BreakerState.OPEN, "a success that was not the probe closed the breaker"
    assert "llama" in fo.breakers.blocked(clock())
    clock.now = 9.99
    assert breaker.state(clock()) is BreakerState.OPEN
    clock.now = 10.0
    result = await fo.run(plan(), send)  # the probe
    assert result.tier is not None and result.tier.id == "llama"
    assert breaker.state(clock()) is BreakerState.CLOSED


async def test_in_flight_failures_do_not_extend_the_cooldown() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Gated(clock, llama=[HELD_500] * 5 + [G_500] * 3, ollama=[G_OK] * 8)
    held = await _hold(fo, send, 5)
    for _ in range(3):
        await fo.run(plan(), send)
    breaker = fo.breakers.get("llama")
    clock.now = 6.0
    send.gate.set()
    await asyncio.gather(*held)
    clock.now = 10.0  # the cooldown counts from the opening at 0, not from the late failures at 6
    assert breaker.state(clock()) is BreakerState.HALF_OPEN
    probe = breaker.acquire(clock())
    assert probe is not None and probe.probe


async def test_failed_probe_reopens_for_a_full_cooldown_and_late_results_of_old_periods_are_ignored() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Gated(clock, llama=[HELD_500] * 3 + [G_500] * 3 + [G_500, G_OK], ollama=[G_OK] * 4)
    held = await _hold(fo, send, 3)
    for _ in range(3):
        await fo.run(plan(), send)
    breaker = fo.breakers.get("llama")
    clock.now = 10.0
    await fo.run(plan(), send)  # the probe fails at 10: open until 20
    assert breaker.state(19.99) is BreakerState.OPEN and breaker.state(20.0) is BreakerState.HALF_OPEN
    clock.now = 20.0
    await fo.run(plan(), send)  # the probe succeeds: closed
    assert breaker.state(clock()) is BreakerState.CLOSED
    # Three failures of attempts that started before all this: they do not re-open it.
    send.gate.set()
    await asyncio.gather(*held)
    assert breaker.state(clock()) is BreakerState.CLOSED and breaker.failures == 0


async def test_when_every_breaker_is_open_nothing_is_sent_until_the_probes() -> None:
    clock = Clock()
    fo = failover(clock, threshold=1, max_fallback_retries=1)
    send = Gated(clock, llama=[G_500, G_OK], ollama=[G_500], kimi=[G_500])
    await fo.run(plan(), send)
    assert fo.breakers.blocked(clock()) == {"llama", "ollama", "kimi"}
    opened = clock()
    sent = len(send.calls)
    clock.now = 1.0
    all_open = make_plan(CONFIG, RouteHints(), fo.breakers.blocked(clock()))
    assert all_open.all_open and [t.id for t in all_open.chain] == ["kimi", "llama", "ollama"]
    result = await fo.run(all_open, send)
    assert len(send.calls) == sent and not result.attempts, "a tier whose breaker is open was called"
    assert result.error is not None and (result.error.status, result.error.code) == (503, "all_tiers_open")
    # The real wait: until the earliest breaker half-opens (10 s cooldown from `opened`), not 1.
    assert result.error.headers == {"Retry-After": str(math.ceil(opened + 10.0 - 1.0))}
    clock.now = 10.0 + opened
    assert fo.breakers.get("kimi").state(clock()) is BreakerState.HALF_OPEN
    result = await fo.run(make_plan(CONFIG, RouteHints(), fo.breakers.blocked(clock())), send)
    assert result.tier is not None and result.tier.id == "llama"  # the probe, which closes it
    assert fo.breakers.get("llama").state(clock()) is BreakerState.CLOSED


async def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Gated(clock, llama=[G_500] * 3 + [HELD_OK, G_OK], ollama=[G_OK] * 3)
    for _ in range(3):
        await fo.run(plan(), send)
    clock.now = 10.0
    (probe,) = await _hold(fo, send, 1)
    breaker = fo.breakers.get("llama")
    assert breaker.acquire(clock()) is None
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    assert breaker.state(clock()) is BreakerState.HALF_OPEN and "llama" not in fo.breakers.blocked(clock())
    await fo.run(plan(), send)
    assert breaker.state(clock()) is BreakerState.CLOSED
