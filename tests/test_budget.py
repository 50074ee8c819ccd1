from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.config import BudgetSpec, Config, build_config
from proxy.ledger import Ledger
from proxy.ledger.budget import BudgetTracker, window_start
from proxy.records import CallRecord
from tests.support.records import call

D = Decimal
CALL = D("0.0008")  # the default Kimi per-call price


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


SUNDAY_LATE = ts(2026, 11, 29, 23, 59, 30)  # Sunday, last day of November
MONDAY = ts(2026, 11, 30, 0, 0, 1)
DECEMBER = ts(2026, 12, 1, 0, 0, 1)


def kimi_call(rid: str, at: float) -> CallRecord:
    return call(rid, "kimi", at=at, chain=("kimi",), requested_model="kimi", model="kimi-k2.5", attempts=[])


def config_with(**budgets: str) -> Config:
    return build_config({"budgets": budgets}, "test", {"MOONSHOT_API_KEY": "k"})


def test_without_budgets_paid_tiers_are_always_allowed() -> None:
    tracker = BudgetTracker(BudgetSpec())
    tracker.record(D(1000), MONDAY)
    assert tracker.paid_allowed(MONDAY) and tracker.remaining(MONDAY) is None
    assert tracker.state(MONDAY).windows == () and not tracker.configured


def test_daily_limit_is_exhausted_exactly_at_the_limit() -> None:
    tracker = BudgetTracker(BudgetSpec(daily_usd=D("0.002"), monthly_usd=D("1")))
    tracker.record(CALL, MONDAY)
    tracker.record(CALL, MONDAY)
    assert tracker.paid_allowed(MONDAY)
    assert tracker.remaining(MONDAY) == D("0.0004")  # the smaller of the two windows
    tracker.record(D("0.0004"), MONDAY)
    assert not tracker.paid_allowed(MONDAY) and tracker.remaining(MONDAY) == 0
    daily, monthly = tracker.state(MONDAY).windows
    assert (daily.window, daily.start, daily.spent, daily.exhausted) == ("daily", "2026-11-30", D("0.002"), True)
    assert daily.resets_at == "2026-12-01" and monthly.resets_at == "2026-12-01"
    assert tracker.reopens_in(MONDAY) == ts(2026, 12, 1) - MONDAY
    assert (monthly.window, monthly.start, monthly.remaining, monthly.exhausted) == (
        "monthly",
        "2026-11-01",
        D("0.998"),
        False,
    )


def test_windows_roll_over_at_utc_midnight_monday_and_the_first() -> None:
    tracker = BudgetTracker(BudgetSpec(daily_usd=D(1), weekly_usd=D(2), monthly_usd=D(3)))
    tracker.record(D("0.5"), SUNDAY_LATE)
    spent = {w.window: w.spent for w in tracker.state(SUNDAY_LATE).windows}
    assert spent == {"daily": D("0.5"), "weekly": D("0.5"), "monthly": D("0.5")}
    spent = {w.window: w.spent for w in tracker.state(MONDAY).windows}
    assert spent == {"daily": 0, "weekly": 0, "monthly": D("0.5")}
    tracker.record(D("0.25"), MONDAY)
    spent = {w.window: w.spent for w in tracker.state(DECEMBER).windows}
    assert spent == {"daily": 0, "weekly": D("0.25"), "monthly": 0}
    assert window_start("weekly", DECEMBER).isoformat() == "2026-11-30"
    assert [w.resets_at for w in tracker.state(DECEMBER).windows] == ["2026-12-02", "2026-12-07", "2027-01-01"]
    assert tracker.reopens_in(DECEMBER) is None


def test_a_late_record_belongs_to_the_window_it_started_in() -> None:
    tracker = BudgetTracker(BudgetSpec(daily_usd=D(1)))
    assert tracker.paid_allowed(MONDAY)  # the day has already rolled over
    tracker.record(D("0.9"), SUNDAY_LATE)  # a request that started before midnight
    assert tracker.remaining(MONDAY) == D(1)


def test_soft_limit_warning_is_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    tracker = BudgetTracker(BudgetSpec(daily_usd=D(1), soft_ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="proxy.budget"):
        for _ in range(4):
            tracker.record(D("0.2"), SUNDAY_LATE)
        tracker.record(D("0.3"), MONDAY)
        tracker.record(D("0.3"), MONDAY)
    soft = [r.getMessage() for r in caplog.records if "has reached" in r.getMessage()]
    assert soft == [
        "budget: daily spend $0.6 has reached 50% of the $1 limit",
        "budget: daily spend $0.6 has reached 50% of the $1 limit",
    ]
    assert tracker.state(MONDAY).windows[0].soft_limit_reached


def test_exhaustion_is_logged_with_the_reset_date(caplog: pytest.LogCaptureFixture) -> None:
    tracker = BudgetTracker(BudgetSpec(monthly_usd=D("0.001")))
    with caplog.at_level(logging.WARNING, logger="proxy.budget"):
        tracker.record(CALL, MONDAY)
        tracker.record(CALL, MONDAY)
    assert any("paid tiers are off until 2026-12-01" in r.getMessage() for r in caplog.records)


async def test_spend_survives_a_restart_and_exhausts_the_budget(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    config = config_with(daily_usd="0.005", weekly_usd="0.05")
    now = time.time()

    tracker = BudgetTracker(config.budgets)
    ledger = Ledger(config, db, on_cost=lambda cost, rec: tracker.record(cost, rec.started_at))
    await ledger.start()
    await tracker.load(ledger)
    for i in range(3):
        ledger.submit(kimi_call(f"a{i}", now))
    # Counted at submit time, before the writer has flushed anything.
    assert tracker.remaining(now) == D("0.0026")
    await ledger.close()

    tracker = BudgetTracker(config.budgets)  # a new process
    ledger = Ledger(config, db, on_cost=lambda cost, rec: tracker.record(cost, rec.started_at))
    await ledger.start()
    await tracker.load(ledger)
    assert {w.window: w.spent for w in tracker.state(now).windows} == {"daily": D("0.0024"), "weekly": D("0.0024")}
    for i in range(4):
        ledger.submit(kimi_call(f"b{i}", now))
    await ledger.close()
    assert not tracker.paid_allowed(now)
    assert tracker.state(now).windows[0].spent == D("0.0056")


async def test_load_counts_each_window_from_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(config_with(), tmp_path / "ledger.db")
    await ledger.start()
    ledger.submit(kimi_call("oct", ts(2026, 10, 31, 12)))
    ledger.submit(kimi_call("sun", SUNDAY_LATE))
    ledger.submit(kimi_call("mon1", MONDAY))
    ledger.submit(kimi_call("mon2", MONDAY + 60))
    await ledger.flush()
    tracker = BudgetTracker(BudgetSpec(daily_usd=D(1), weekly_usd=D(1), monthly_usd=D(1)))
    await tracker.load(ledger, now=MONDAY + 3600)
    await ledger.close()
    spent = {w.window: w.spent for w in tracker.state(MONDAY + 3600).windows}
    assert spent == {"daily": 2 * CALL, "weekly": 2 * CALL, "monthly": 3 * CALL}
