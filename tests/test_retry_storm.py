"""No retry storms (issue 13), counted at the fake upstreams: the real `proxy serve` in front of
three simulated tiers (tests/support/faults.py SimThread), the real openai SDK as the client
with its DEFAULT retries (max_retries=2), every tier failing.

Goals: one client call walks the chain once (<= 5 upstream requests with the default caps, at
most one to the paid tier); ten calls in a row during a total outage cost one chain walk plus
one probe per tier per cooldown; escalated calls pay the paid tier once unless it asked for a
retry. The breakers use their defaults (3 failures, outage tripping on) except for cooldowns,
scaled down where a test waits one out.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.errors import RETRY_ADVICE, ChainFailed, RateLimited, Unavailable, error_response
from proxy.gateway.state import STATE
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.faults import KIMI_ENV, MSG, SimThread, proxy_config, wait_count
from tests.support.proc import ProxyProc

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")

TIERS = ("llama", "ollama", "kimi")
DOWN = Behaviour(status=500)


Start = Callable[..., ProxyProc]


@pytest.fixture
def start(sims: SimThread, tmp_path: Path) -> Iterator[Start]:
    """A fresh `proxy serve` per test (breaker state must not leak), default breaker rules."""
    sims.reset()
    procs: list[ProxyProc] = []

    def go(cooldown: float = 30.0, **sections: dict[str, Any]) -> ProxyProc:
        urls = {name: sim.url for name, sim in sims.sims.items()}
        routing = {"escalate_after_failures": 3, "breaker_cooldown_seconds": cooldown, "open_breakers_on_outage": True}
        config = proxy_config(urls, tmp_path / "ledger.db", routing=routing, **sections)
        proc = ProxyProc.start(tmp_path, config, KIMI_ENV)
        procs.append(proc)
        return proc

    yield go
    for proc in procs:
        assert proc.terminate() == 0, proc.log_text()[-2000:]


def sdk(proc: ProxyProc) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="k", timeout=20)
    assert client.max_retries == 2, "the SDK's default changed: the goal is measured with it"
    return client


@dataclass
class Got:
    status: int
    code: str | None
    headers: dict[str, str]
    elapsed: float

    @property
    def tier(self) -> str | None:
        return self.headers.get("x-proxy-tier")


def call(client: openai.OpenAI, *, stream: bool = False, **extra: Any) -> Got:
    t0 = time.monotonic()
    try:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model="auto", messages=MSG, stream=True, **extra
            ) as resp:
                resp.read()
                return Got(resp.status_code, None, dict(resp.headers), time.monotonic() - t0)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, **extra)
        return Got(raw.status_code, None, dict(raw.headers), time.monotonic() - t0)
    except openai.APIStatusError as e:
        return Got(e.status_code, e.code, dict(e.response.headers), time.monotonic() - t0)


def delta(sims: SimThread, before: dict[str, int]) -> dict[str, int]:
    now = sims.hits()
    return {t: now[t] - before[t] for t in TIERS}


def all_down(sims: SimThread, behaviour: Behaviour = DOWN) -> None:
    for sim in sims.sims.values():
        sim.always(behaviour)


# ---------------------------------------------------------------------------- a total outage


def test_ten_calls_in_a_total_outage_cost_one_walk(start: Start, sims: SimThread) -> None:
    """Every tier answers 500. The first SDK call (default retries) is one chain walk with one
    paid request, and opens every breaker; the nine calls after it are answered 503 at once.
    Before the fix: 14 upstream requests (5 paid) for the first call, 149 (59 paid) for ten."""
    proc = start()
    all_down(sims)
    client = sdk(proc)
    first = call(client)
    assert (first.status, first.code) == (502, "upstream_failed")
    assert first.headers["x-should-retry"] == "false"
    assert first.headers["retry-after"] == "30", "the real wait: the breakers' cooldown"
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 1}
    assert wait_count(proc.db, 1) == 1, "the SDK retried the proxy's answer"
    got = [call(client) for _ in range(9)]
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 1}
    for g in got:
        assert (g.status, g.code) == (503, "all_tiers_open")
        assert g.headers["x-should-retry"] == "false"
        assert g.headers["retry-after"] in ("29", "30")
        assert g.elapsed < 1.0, "answered at once"
    assert wait_count(proc.db, 10) == 10


def test_a_stream_in_a_total_outage_walks_the_chain_once(start: Start, sims: SimThread) -> None:
    """The same for a streamed call: the error comes before any event, as a plain 502."""
    proc = start()
    all_down(sims)
    got = call(sdk(proc), stream=True)
    assert (got.status, got.headers["x-should-retry"]) == (502, "false")
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 1}
    assert wait_count(proc.db, 1) == 1


def test_after_each_cooldown_one_probe_per_tier(start: Start, sims: SimThread) -> None:
    """Once the cooldown ends, each tier gets one probe; it fails, the breaker re-opens for a
    whole cooldown, and the other calls are answered 503 at once."""
    cooldown = 0.8
    proc = start(cooldown=cooldown)
    all_down(sims)
    client = sdk(proc)
    assert call(client).status == 502
    assert sims.hits() == {"llama": 2, "ollama": 2, "kimi": 1}
    time.sleep(cooldown + 0.1)
    before, t0 = sims.hits(), time.monotonic()
    got = [call(client) for _ in range(10)]
    elapsed = time.monotonic() - t0
    probes = delta(sims, before)
    allowed = 1 + int(elapsed / cooldown)  # a cooldown that ended during the ten calls: one more
    assert all(1 <= probes[t] <= allowed for t in TIERS), (probes, elapsed)
    assert got[0].status == 502 and got[0].headers["x-should-retry"] == "false"
    assert sum(g.status == 503 for g in got) >= 10 - allowed
    assert wait_count(proc.db, 11) == 11, "the SDK retried one of them"


def test_every_tier_rate_limited_passes_the_upstreams_retry_after(start: Start, sims: SimThread) -> None:
    """Every tier 429s with a Retry-After beyond the proxy's deadline: the proxy fails over at
    once and tells the client the soonest upstream wait; the SDK, told not to retry, does not
    wait it out twice. Before the fix: `Retry-After: 1` and the SDK's two retries."""
    proc = start()
    for name, after in (("llama", "20"), ("ollama", "7"), ("kimi", "12")):
        sims.sims[name].always(Behaviour(status=429, retry_after=after))
    got = call(sdk(proc))
    assert (got.status, got.code) == (429, "upstream_rate_limited")
    assert got.headers["retry-after"] == "7" and got.headers["x-should-retry"] == "false"
    assert sims.hits() == {"llama": 1, "ollama": 1, "kimi": 1}
    assert got.elapsed < 2.0


# ---------------------------------------------------------------------------- escalation


def _open_primary(client: openai.OpenAI, sims: SimThread) -> None:
    sims.sims["llama"].always(DOWN)
    for _ in range(2):  # 2 + 1 failures of llama, answered by ollama
        assert call(client).tier == "ollama"
    assert call(client).headers["x-proxy-route"] == "escalated"


def test_escalated_calls_pay_once_when_the_paid_tier_fails(start: Start, sims: SimThread) -> None:
    """The free primary is down and Kimi fails every other call: each escalated call reaches
    Kimi once and then the free tier, not Kimi twice. Then every tier fails: one more walk
    (Kimi once), then 503s that cost nothing. Before the fix: 2 Kimi requests a call, then 6."""
    proc = start()
    client = sdk(proc)
    _open_primary(client, sims)
    kimi = sims.sims["kimi"]
    kimi.chooser = itertools.cycle([DOWN, None]).__next__
    tiers = []
    for _ in range(4):
        before = sims.hits()
        got = call(client)
        assert got.status == 200 and got.headers["x-proxy-route"] == "escalated"
        assert delta(sims, before) == {"llama": 0, "ollama": int(got.tier == "ollama"), "kimi": 1}
        tiers.append(got.tier)
    assert sorted(tiers) == ["kimi", "kimi", "ollama", "ollama"]
    all_down(sims)
    kimi.chooser = None
    before = sims.hits()
    statuses = [call(client).status for _ in range(5)]
    assert delta(sims, before) == {"llama": 0, "ollama": 2, "kimi": 1}
    assert statuses == [502, 503, 503, 503, 503]


def test_escalated_calls_retry_the_paid_tier_when_it_asks(start: Start, sims: SimThread) -> None:
    """Kimi answers 429 with a short Retry-After: worth one more try, which it answers."""
    proc = start()
    client = sdk(proc)
    _open_primary(client, sims)
    kimi = sims.sims["kimi"]
    kimi.chooser = itertools.cycle([Behaviour(status=429, retry_after="0.05"), None]).__next__
    for _ in range(2):
        before = sims.hits()
        got = call(client)
        assert (got.status, got.tier) == (200, "kimi")
        assert delta(sims, before) == {"llama": 0, "ollama": 0, "kimi": 2}


# ---------------------------------------------------------------------------- what the proxy tells SDKs


def _advice(err: ChainFailed | Unavailable | RateLimited) -> str | None:
    resp = error_response(err)
    assert resp.body is not None
    assert set(orjson.loads(resp.body)["error"]) == {"message", "type", "param", "code"}
    return resp.headers.get("x-should-retry")


def test_the_proxy_s_own_errors_tell_sdks_whether_to_retry() -> None:
    # An exhausted chain, every breaker open, money and configuration: no automatic retry.
    for err in (
        ChainFailed("x", status=502, code="upstream_failed"),
        ChainFailed("x", status=504, code="upstream_timeout"),
        ChainFailed("x", status=504, code="deadline_exceeded"),
        ChainFailed("x", status=429, code="upstream_rate_limited", headers={"Retry-After": "7"}),
        Unavailable("x", code="all_tiers_open", headers={"Retry-After": "30"}),
        Unavailable("x", code="no_tier_available"),
        Unavailable("x", code="tier_unavailable"),
        RateLimited("x", code="budget_exhausted", headers={"Retry-After": "3600"}),
        RateLimited("x", code="daily_budget_exhausted", headers={"Retry-After": "3600"}),
    ):
        assert _advice(err) == "false", err.code
    # A client key's per-minute limit: waiting Retry-After is all it takes, and costs no upstream call.
    assert _advice(RateLimited("x", code="rate_limit_exceeded", headers={"Retry-After": "2"})) == "true"
    # Anything else: no advice, the client's own rules.
    assert _advice(Unavailable("x", code="ledger_unavailable")) is None
    assert set(RETRY_ADVICE) >= {"upstream_failed", "all_tiers_open", "budget_exhausted", "rate_limit_exceeded"}


async def test_the_app_s_own_429s_carry_the_advice(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    """Through the app: a client key's per-minute limit (retry after Retry-After), its daily cap
    and the spend budget (no retry before the window resets)."""
    upstreams["kimi"].always(Behaviour(no_usage=True))
    auth = {
        "keys": [
            {"name": "a", "secret_env": "KEY_A", "requests_per_minute": 1, "daily_usd": 0.0001},
            {"name": "b", "secret_env": "KEY_B"},
        ]
    }
    tiers = tier_config(upstreams, kimi={"price": {"per_call_usd": 0.001}})
    env = {"KEY_A": "secret-a", "KEY_B": "secret-b"}
    client = await make_proxy(tiers=tiers, auth=auth, env=env, budgets={"daily_usd": 0.001})
    body = {"model": "auto", "messages": MSG}
    paid = {"Authorization": "Bearer secret-a", "X-Tier": "kimi", "X-Fallback": "off"}
    first = await client.post("/v1/chat/completions", json=body, headers=paid)
    assert first.status == 200  # $0.001: the key's cap and the budget are both spent
    limited = await client.post("/v1/chat/completions", json=body, headers=paid)
    assert limited.status == 429 and (await limited.json())["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["x-should-retry"] == "true" and int(limited.headers["Retry-After"]) <= 60
    client.app[STATE].limits.buckets.clear()  # the next minute
    capped = await client.post("/v1/chat/completions", json=body, headers=paid)
    assert capped.status == 429 and (await capped.json())["error"]["code"] == "daily_budget_exhausted"
    assert capped.headers["x-should-retry"] == "false"
    other = {"Authorization": "Bearer secret-b", "X-Tier": "kimi"}
    budget = await client.post("/v1/chat/completions", json=body, headers=other)
    assert budget.status == 429 and (await budget.json())["error"]["code"] == "budget_exhausted"
    assert budget.headers["x-should-retry"] == "false"
