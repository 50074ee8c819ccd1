"""An exhausted chain, unit by unit (no network, a virtual clock): which breakers an outage trips
open, the Retry-After the final error carries, `x-should-retry`, and how often a paid tier is
tried in one request."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from proxy.config import RetrySpec, Tier, build_config
from proxy.errors import ChainFailed, Unavailable
from proxy.gateway.breaker import BreakerBoard, BreakerState
from proxy.gateway.failover import Failover
from proxy.gateway.routing import RouteHints, make_plan
from proxy.gateway.upstream import Reply
from proxy.records import AttemptOutcome, AttemptRecord

CONFIG = build_config({}, "<t>", {"MOONSHOT_API_KEY": "k"})
COOLDOWN = 10.0


@dataclass(frozen=True)
class Step:
    outcome: AttemptOutcome = AttemptOutcome.OK
    status: int | None = 200
    retry_after: float | None = None
    took: float = 0.01
    body: bytes | None = None


OK = Step()
E500 = Step(AttemptOutcome.HTTP_ERROR, 500)
E400 = Step(AttemptOutcome.HTTP_ERROR, 400, body=b'{"error": {"message": "bad"}}')
TIMEOUT = Step(AttemptOutcome.TIMEOUT, None, took=1.0)
BAD = Step(AttemptOutcome.INVALID_OUTPUT, 200, body=b'{"choices": []}')


def r429(after: float | None) -> Step:
    return Step(AttemptOutcome.HTTP_ERROR, 429, after)


def r503(after: float | None) -> Step:
    return Step(AttemptOutcome.HTTP_ERROR, 503, after)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Send:
    """Per tier, the steps its attempts take, in order; `calls` lists the tiers tried."""

    def __init__(self, clock: Clock, **per_tier: Iterable[Step]) -> None:
        self.clock = clock
        self.queues = {k: deque(v) for k, v in per_tier.items()}
        self.calls: list[str] = []

    async def __call__(self, tier: Tier, rec: AttemptRecord, timeout: float) -> Reply:
        self.calls.append(tier.id)
        step = self.queues[tier.id].popleft()
        self.clock.now += min(step.took, timeout)
        rec.outcome, rec.http_status = step.outcome, step.status
        if step.outcome is not AttemptOutcome.OK:
            rec.error = f"{step.outcome.value} {step.status}"
        return Reply(body=step.body, retry_after=step.retry_after)


def failover(clock: Clock, *, threshold: int = 3, open_on_outage: bool = True, **retries: object) -> Failover:
    spec = RetrySpec(
        **{  # type: ignore[arg-type]
            "max_fallback_retries": 2,
            "max_total_retries": 5,
            "backoff_initial_seconds": 0.1,
            "backoff_max_seconds": 1.0,
            "request_deadline_seconds": 30.0,
            **retries,
        }
    )
    board = BreakerBoard(threshold, COOLDOWN, 1, open_on_outage=open_on_outage)
    return Failover(retries=spec, breakers=board, rng=random.Random(1), clock=clock, sleep=clock.sleep)


def plan(fo: Failover, clock: Clock, **hints: object):  # type: ignore[no-untyped-def]
    return make_plan(CONFIG, RouteHints(**hints), fo.breakers.blocked(clock()))  # type: ignore[arg-type]


def states(fo: Failover, clock: Clock) -> dict[str, str]:
    return {t: fo.breakers.get(t).state(clock()).value for t in ("llama", "ollama", "kimi")}


# ------------------------------------------------------------------ an outage seen whole


async def test_a_chain_that_fails_everywhere_opens_every_breaker_it_tried() -> None:
    clock = Clock()
    fo = failover(clock)
    send = Send(clock, llama=[E500] * 2, ollama=[E500] * 2, kimi=[E500])
    result = await fo.run(plan(fo, clock), send)
    assert send.calls == ["llama", "llama", "ollama", "ollama", "kimi"]  # the default caps: 2 + 2 + 1
    assert states(fo, clock) == {"llama": "open", "ollama": "open", "kimi": "open"}
    err = result.error
    assert isinstance(err, ChainFailed) and (err.status, err.code) == (502, "upstream_failed")
    assert err.headers == {"Retry-After": "10"}, "the time until the breakers half-open"
    # The next request sends nothing and says the same.
    clock.now += 3.2
    again = await fo.run(plan(fo, clock), send)
    assert len(send.calls) == 5 and not again.attempts
    assert isinstance(again.error, Unavailable) and again.error.code == "all_tiers_open"
    assert again.error.headers == {"Retry-After": "7"}  # ceil(10 - 3.2)


async def test_timeouts_and_connect_errors_count_as_an_outage_too() -> None:
    clock = Clock()
    fo = failover(clock)
    lost = Step(AttemptOutcome.CONNECT_ERROR, None)
    send = Send(clock, llama=[TIMEOUT], ollama=[lost, lost], kimi=[TIMEOUT])
    await fo.run(plan(fo, clock), send)
    assert states(fo, clock) == {"llama": "open", "ollama": "open", "kimi": "open"}


@pytest.mark.parametrize(
    ("case", "steps"),
    [
        ("one tier only (X-Fallback: off)", {"llama": [E500, E500]}),
        ("a tier refused the request", {"llama": [E500, E500], "ollama": [E400], "kimi": [E500]}),
        ("every tier rate limited", {"llama": [r429(None)] * 2, "ollama": [r429(None)] * 2, "kimi": [r429(None)]}),
        ("a bad answer among the failures", {"llama": [E500, E500], "ollama": [BAD, BAD], "kimi": [E500]}),
    ],
)
async def test_what_is_not_an_outage_opens_nothing_early(case: str, steps: dict[str, list[Step]]) -> None:
    clock = Clock()
    fo = failover(clock)
    hints = {"fallback": False} if len(steps) == 1 else {}
    await fo.run(plan(fo, clock, **hints), Send(clock, **steps))
    # Only the ordinary count (3 failures in a row) could open a breaker: none reached it.
    assert set(states(fo, clock).values()) == {"closed"}, case


async def test_rate_limited_tiers_are_not_tripped_with_the_failed_ones() -> None:
    clock = Clock()
    fo = failover(clock)
    send = Send(clock, llama=[r429(60.0)], ollama=[E500, E500], kimi=[E500])
    result = await fo.run(plan(fo, clock), send)
    assert states(fo, clock) == {"llama": "closed", "ollama": "open", "kimi": "open"}
    # llama said 60 s, the breakers 10 s: the soonest any tier takes a call again.
    assert result.error is not None and result.error.headers == {"Retry-After": "10"}


async def test_the_switch_turns_tripping_off() -> None:
    clock = Clock()
    fo = failover(clock, open_on_outage=False)
    send = Send(clock, llama=[E500] * 2, ollama=[E500] * 2, kimi=[E500])
    result = await fo.run(plan(fo, clock), send)
    assert set(states(fo, clock).values()) == {"closed"}
    assert result.error is not None and "Retry-After" not in result.error.headers, "no tier's wait is known"


async def test_a_breaker_that_opened_meanwhile_is_not_reopened_by_a_late_trip() -> None:
    clock = Clock()
    fo = failover(clock)
    board = fo.breakers
    llama = board.get("llama")
    ticket = llama.acquire(clock())
    assert ticket is not None
    for _ in range(3):  # other requests open it at t=100
        other = llama.acquire(clock())
        assert other is not None
        llama.on_failure(other, clock())
    clock.now += 6.0
    llama.trip(ticket, clock())  # a walk that started before: its ticket is of the closed period
    assert llama.wait(clock()) == pytest.approx(4.0), "the cooldown was pushed out"


# ------------------------------------------------------------------ Retry-After


async def test_every_tier_rate_limited_gives_the_soonest_upstream_retry_after() -> None:
    clock = Clock()
    fo = failover(clock, request_deadline_seconds=5.0)
    send = Send(clock, llama=[r429(20.0)], ollama=[r429(7.0)], kimi=[r429(12.0)])
    result = await fo.run(plan(fo, clock), send)
    assert send.calls == ["llama", "ollama", "kimi"], "a Retry-After beyond the deadline: fail over at once"
    err = result.error
    assert isinstance(err, ChainFailed) and (err.status, err.code) == (429, "upstream_rate_limited")
    assert err.headers == {"Retry-After": "7"}


async def test_rate_limited_without_retry_after_says_one_second() -> None:
    clock = Clock()
    fo = failover(clock, max_fallback_retries=1)
    send = Send(clock, llama=[r429(None)], ollama=[r429(None)], kimi=[r429(None)])
    result = await fo.run(plan(fo, clock), send)
    assert result.error is not None and result.error.headers == {"Retry-After": "1"}


async def test_a_probe_in_flight_means_retry_after_one_second() -> None:
    clock = Clock()
    fo = failover(clock, threshold=1)
    await fo.run(plan(fo, clock), Send(clock, llama=[E500], ollama=[E500], kimi=[E500]))
    clock.now += COOLDOWN
    for t in ("llama", "ollama", "kimi"):
        assert fo.breakers.get(t).acquire(clock()) is not None  # three probes out, none back yet
    result = await fo.run(plan(fo, clock), Send(clock))
    assert result.error is not None and result.error.code == "all_tiers_open"
    assert result.error.headers == {"Retry-After": "1"}


# ------------------------------------------------------------------ a paid tier is tried once


@pytest.mark.parametrize(
    ("kimi", "tried", "answered_by"),
    [
        ([E500, OK], ["kimi", "llama"], "llama"),  # a 500: the free tier next, not kimi again
        ([r503(None), OK], ["kimi", "llama"], "llama"),
        ([BAD, OK], ["kimi", "llama"], "llama"),  # a bad answer costs; asking again costs again
        ([r429(0.5), OK], ["kimi", "kimi"], "kimi"),  # it asked, with a wait that fits: worth it
        ([r503(0.5), OK], ["kimi", "kimi"], "kimi"),
        ([r429(None), OK], ["kimi", "llama"], "llama"),  # a 429 that says nothing: fail over
    ],
)
async def test_paid_tier_is_retried_only_when_it_asked(kimi: list[Step], tried: list[str], answered_by: str) -> None:
    clock = Clock()
    fo = failover(clock)
    send = Send(clock, kimi=kimi, llama=[OK])
    result = await fo.run(plan(fo, clock, complexity="complex"), send)
    assert send.calls == tried
    assert result.tier is not None and result.tier.id == answered_by


async def test_paid_retries_always_retries_it_like_a_free_tier() -> None:
    clock = Clock()
    fo = failover(clock, paid_retries="always")
    send = Send(clock, kimi=[E500, OK])
    result = await fo.run(plan(fo, clock, complexity="complex"), send)
    assert send.calls == ["kimi", "kimi"] and result.tier is not None and result.tier.id == "kimi"


async def test_escalated_walk_in_an_outage_pays_once() -> None:
    clock = Clock()
    fo = failover(clock)
    llama = fo.breakers.get("llama")
    for _ in range(3):
        ticket = llama.acquire(clock())
        assert ticket is not None
        llama.on_failure(ticket, clock())
    escalated = plan(fo, clock)
    assert escalated.route.value == "escalated" and escalated.tier_ids == ("kimi", "ollama")
    send = Send(clock, kimi=[E500] * 2, ollama=[E500] * 2)
    await fo.run(escalated, send)
    assert send.calls == ["kimi", "ollama", "ollama"]


async def test_free_tiers_keep_their_retries() -> None:
    clock = Clock()
    fo = failover(clock)
    send = Send(clock, llama=[E500, OK])
    result = await fo.run(plan(fo, clock), send)
    assert send.calls == ["llama", "llama"] and result.tier is not None and result.tier.id == "llama"


async def test_breaker_wait_reports_the_cooldown_left() -> None:
    clock = Clock()
    fo = failover(clock, threshold=1)
    await fo.run(plan(fo, clock, fallback=False), Send(clock, llama=[E500]))
    llama = fo.breakers.get("llama")
    assert llama.state(clock()) is BreakerState.OPEN
    assert llama.opened_at is not None
    assert llama.wait(clock()) == pytest.approx(llama.opened_at + COOLDOWN - clock())
    clock.now = llama.opened_at + COOLDOWN
    assert llama.wait(clock()) is None  # half-open, no probe out: a request may try it
    assert fo.breakers.wait("ollama", clock()) is None  # never used


async def test_a_tier_open_on_bad_answers_is_still_asked_when_every_tier_is_open() -> None:
    """Breakers opened on bad answers say the tier is up and answers, badly: when nothing better
    is left it is still asked (its answer judged as usual), where one open on failures is not."""
    clock = Clock()
    fo = failover(clock, threshold=2)
    await fo.run(plan(fo, clock), Send(clock, llama=[BAD, BAD], ollama=[E500, E500], kimi=[BAD]))
    await fo.run(plan(fo, clock, complexity="complex"), Send(clock, kimi=[BAD], llama=[], ollama=[]))
    assert states(fo, clock) == {"llama": "open", "ollama": "open", "kimi": "open"}
    assert (
        fo.breakers.get("llama").opened_for is not None and fo.breakers.get("llama").opened_for.value == "bad_answers"
    )
    assert fo.breakers.get("ollama").opened_for is not None and fo.breakers.get("ollama").opened_for.value == "failures"
    send = Send(clock, llama=[OK], kimi=[BAD])
    result = await fo.run(plan(fo, clock), send)
    assert send.calls == ["kimi", "llama"], "ollama (open on failures) was called"
    assert result.tier is not None and result.tier.id == "llama"
    assert states(fo, clock)["llama"] == "open", "a last-resort success is not the probe"
