"""proxy.metrics: exact values in the rendered exposition, snapshot gauges, isolation, cost."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.gateway.breaker import BreakerState
from proxy.ledger import LedgerStats
from proxy.ops.metrics import Metrics, Snapshot
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Outcome, Route, Usage
from tests.support.records import attempt, call
from tests.support.timing import best_us_per_call, us_per_call

TIERS = ("llama", "ollama", "kimi")
Key = tuple[str, frozenset[tuple[str, str]]]


def _snapshot(
    breakers: dict[str, BreakerState] | None = None,
    budget_remaining_usd: Decimal | None = None,
    ledger: LedgerStats | None = None,
) -> Snapshot:
    return Snapshot(breakers or {}, budget_remaining_usd, ledger, TIERS)


def _metrics(snap: Snapshot | None = None) -> Metrics:
    fixed = snap or _snapshot()
    return Metrics(lambda: fixed, process_metrics=False)


def _samples(m: Metrics) -> dict[Key, float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _attempt(n: int, tier: str, ms: float, outcome: AttemptOutcome = AttemptOutcome.OK, **kw: Any) -> AttemptRecord:
    return attempt(n, tier, outcome, started_at=0.0, duration_ms=ms, **kw)


def _call(route: Route, tier: str | None, attempts: list[AttemptRecord], ms: float, **kw: Any) -> CallRecord:
    fields: dict[str, Any] = {"model": None, "client": "client-name", "request_body": b"PROMPT-TEXT", **kw}
    return call("req-SECRET-ID", tier, at=0.0, route=route, attempts=attempts, duration_ms=ms, **fields)


SUCCESS = _call(Route.DEFAULT, "llama", [_attempt(1, "llama", 200.0)], 200.4, status=200)
FAILOVER = _call(
    Route.DEFAULT,
    "ollama",
    [
        _attempt(1, "llama", 3.0, AttemptOutcome.CONNECT_ERROR),
        _attempt(2, "llama", 9.0, AttemptOutcome.HTTP_ERROR, http_status=503),
        _attempt(3, "ollama", 300.0),
    ],
    450.0,  # includes backoff sleeps: must not count as overhead
    status=200,
)
FAILED = _call(
    Route.MINOR_REPLAN,
    None,
    [_attempt(1, "llama", 2.0, AttemptOutcome.CONNECT_ERROR), _attempt(2, "ollama", 20000.0, AttemptOutcome.TIMEOUT)],
    20003.0,
    status=504,
    outcome=Outcome.ERROR,
    error="all tiers failed",
)
STREAM = _call(
    Route.COMPLEX,
    "kimi",
    [_attempt(1, "kimi", 2500.0, ttft_ms=800.0, usage=Usage(10, 20))],
    2500.9,
    status=200,
    stream=True,
    ttft_ms=800.0,
)
ALL = (SUCCESS, FAILOVER, FAILED, STREAM)


def test_request_and_attempt_counters() -> None:
    m = _metrics()
    for rec in ALL:
        m.observe(rec)
    s = _samples(m)
    assert _get(s, "proxy_requests_total", tier="llama", route="default", outcome="ok") == 1
    assert _get(s, "proxy_requests_total", tier="ollama", route="default", outcome="ok") == 1
    assert _get(s, "proxy_requests_total", tier="none", route="minor_replan", outcome="error") == 1
    assert _get(s, "proxy_requests_total", tier="kimi", route="complex", outcome="ok") == 1
    assert sum(v for (name, _), v in s.items() if name == "proxy_requests_total") == 4

    expected = {("llama", "ok"): 1, ("llama", "connect_error"): 2, ("llama", "http_error"): 1}
    expected |= {("ollama", "ok"): 1, ("ollama", "timeout"): 1, ("kimi", "ok"): 1}
    for tier in TIERS:
        for outcome in AttemptOutcome:  # every outcome of a used tier exists, at 0 if never seen
            want = expected.get((tier, outcome.value), 0)
            assert _get(s, "proxy_attempts_total", tier=tier, outcome=outcome.value) == want


def test_latency_histograms() -> None:
    m = _metrics()
    for rec in ALL:
        m.observe(rec)
    s = _samples(m)
    lat = "proxy_upstream_latency_seconds"
    assert _get(s, f"{lat}_count", tier="llama") == 4
    assert _get(s, f"{lat}_sum", tier="llama") == pytest.approx(0.2 + 0.003 + 0.009 + 0.002, abs=1e-12)
    assert _get(s, f"{lat}_bucket", tier="llama", le="0.01") == 3
    assert _get(s, f"{lat}_bucket", tier="llama", le="0.25") == 4
    assert _get(s, f"{lat}_count", tier="ollama") == 2
    assert _get(s, f"{lat}_sum", tier="ollama") == pytest.approx(20.3, abs=1e-12)
    assert _get(s, f"{lat}_bucket", tier="ollama", le="10.0") == 1
    assert _get(s, f"{lat}_bucket", tier="ollama", le="+Inf") == 2
    assert _get(s, f"{lat}_count", tier="kimi") == 1
    assert _get(s, f"{lat}_sum", tier="kimi") == pytest.approx(2.5, abs=1e-12)

    ttft = "proxy_upstream_ttft_seconds"
    assert _get(s, f"{ttft}_count", tier="kimi") == 1
    assert _get(s, f"{ttft}_sum", tier="kimi") == pytest.approx(0.8, abs=1e-12)
    assert _get(s, f"{ttft}_bucket", tier="kimi", le="0.5") == 0
    assert _get(s, f"{ttft}_bucket", tier="kimi", le="1.0") == 1
    assert _get(s, f"{ttft}_count", tier="llama") == 0


def test_added_latency_only_for_single_attempt_requests() -> None:
    m = _metrics()
    for rec in ALL:
        m.observe(rec)
    s = _samples(m)
    added = "proxy_added_latency_seconds"
    assert _get(s, f"{added}_count") == 2  # SUCCESS and STREAM
    assert _get(s, f"{added}_sum") == pytest.approx(0.0004 + 0.0009, abs=1e-12)
    assert _get(s, f"{added}_bucket", le="0.00025") == 0
    assert _get(s, f"{added}_bucket", le="0.0005") == 1
    assert _get(s, f"{added}_bucket", le="0.001") == 2


def test_cancelled_attempt_counts_but_has_no_latency() -> None:
    m = _metrics()
    gone = _attempt(1, "kimi", 1500.0, AttemptOutcome.CANCELLED)
    m.observe(_call(Route.COMPLEX, "kimi", [gone], 1500.0, status=499, outcome=Outcome.CLIENT_CANCELLED))
    m.observe(_call(Route.DEFAULT, None, [], 0.5, status=400, outcome=Outcome.ERROR))  # refused before any attempt
    s = _samples(m)
    assert _get(s, "proxy_requests_total", tier="kimi", route="complex", outcome="client_cancelled") == 1
    assert _get(s, "proxy_requests_total", tier="none", route="default", outcome="error") == 1
    assert _get(s, "proxy_attempts_total", tier="kimi", outcome="cancelled") == 1
    assert _get(s, "proxy_upstream_latency_seconds_count", tier="kimi") == 0
    assert _get(s, "proxy_added_latency_seconds_count") == 1


def test_no_request_id_client_or_text_in_labels() -> None:
    m = _metrics()
    for rec in ALL:
        m.observe(rec)
    body = m.render()[0]
    for secret in (b"req-SECRET-ID", b"client-name", b"PROMPT-TEXT", b"-model"):
        assert secret not in body


def test_snapshot_gauges() -> None:
    calls: list[int] = []
    snap = _snapshot(
        breakers={"ollama": BreakerState.HALF_OPEN, "kimi": BreakerState.OPEN},
        budget_remaining_usd=Decimal("1.25"),
        ledger=LedgerStats(written=10, spilled=2, imported=3, queue_depth=4, failed=1),
    )

    def read() -> Snapshot:
        calls.append(1)
        return snap

    m = Metrics(read, process_metrics=False)
    m.observe(SUCCESS)
    assert calls == []  # read at scrape time only
    s = _samples(m)
    assert len(calls) == 1
    # llama never appears in `breakers` (the board creates breakers lazily) yet has its gauge.
    assert [_get(s, "proxy_breaker_state", tier=t) for t in TIERS] == [0, 1, 2]
    assert [_get(s, "proxy_breaker_open", tier=t) for t in TIERS] == [0, 1, 1]
    assert _get(s, "proxy_budget_remaining_usd") == 1.25
    assert _get(s, "proxy_ledger_queue_depth") == 4
    assert _get(s, "proxy_ledger_written_total") == 10
    assert _get(s, "proxy_ledger_spilled_total") == 2
    assert _get(s, "proxy_ledger_imported_total") == 3
    assert _get(s, "proxy_ledger_failed_total") == 1


def test_budget_and_ledger_absent_when_not_configured() -> None:
    s = _samples(_metrics())
    names = {name for name, _ in s}
    assert "proxy_budget_remaining_usd" not in names
    assert not any(n.startswith("proxy_ledger_") for n in names)
    assert _get(s, "proxy_breaker_state", tier="kimi") == 0


def test_instances_do_not_share_values() -> None:
    a, b = _metrics(), _metrics()
    a.observe(SUCCESS)
    a.add_cost("kimi", Decimal("0.5"))
    sa, sb = _samples(a), _samples(b)
    assert _get(sa, "proxy_requests_total", tier="llama", route="default", outcome="ok") == 1
    assert not any(name == "proxy_requests_total" for name, _ in sb)
    assert _get(sb, "proxy_cost_usd_total", tier="kimi") == 0


def test_add_cost_sums_exactly() -> None:
    m = _metrics()
    for _ in range(10):
        m.add_cost("kimi", Decimal("0.1"))
    m.add_cost("extra", Decimal("0.1"))
    m.add_cost("extra", Decimal("0.2"))  # as floats this would be 0.30000000000000004
    m.add_cost("llama", Decimal(0))
    s = _samples(m)
    assert _get(s, "proxy_cost_usd_total", tier="kimi") == 1.0
    assert _get(s, "proxy_cost_usd_total", tier="extra") == 0.3
    assert _get(s, "proxy_cost_usd_total", tier="llama") == 0
    assert _get(s, "proxy_cost_usd_total", tier="ollama") == 0  # configured, never priced
    with pytest.raises(ValueError, match="negative"):
        m.add_cost("kimi", Decimal("-0.01"))


def test_process_metrics_in_own_registry() -> None:
    body = Metrics(_snapshot).render()[0].decode()
    assert "python_info" in body


def test_observe_cost(capsys: pytest.CaptureFixture[str]) -> None:
    # Measured on the 2-core dev machine, during a full test run: 5-11 us per call. 200 us is
    # 20x that, so load never trips it; a lock wait, a registry walk or I/O per call would. The
    # fresh and the grown instance are timed in turns, so load falls on both alike: a cost that
    # grows with the requests already seen shows as the grown one being slower.
    calls, seen = 2_000, 100_000
    grown = _metrics()
    mix = itertools.cycle(ALL)
    for _ in range(seen):
        grown.observe(next(mix))
    assert _get(_samples(grown), "proxy_requests_total", tier="llama", route="default", outcome="ok") == seen // 4
    fresh = _metrics()
    fresh_us, grown_us = [], []
    for _ in range(5):
        fresh_us.append(us_per_call(lambda: fresh.observe(next(mix)), calls))
        grown_us.append(us_per_call(lambda: grown.observe(next(mix)), calls))
    single = _metrics()
    single_us = best_us_per_call(lambda: single.observe(SUCCESS), calls)
    with capsys.disabled():
        print(
            f"\nobserve(): {min(fresh_us):.2f} us/call (mix of 1-3 attempts), {min(grown_us):.2f} after {seen} calls,"
            f" {single_us:.2f} (one attempt)"
        )
    assert min(fresh_us) < 200, f"observe(): {min(fresh_us):.1f} us per call"
    assert single_us < 200, f"observe() of one attempt: {single_us:.1f} us per call"
    assert min(grown_us) < 4 * min(fresh_us), f"observe() after {seen} calls: {min(grown_us):.1f} us per call"
