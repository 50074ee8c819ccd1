"""Spend limits for paid tiers: per UTC day, ISO week (from Monday) and calendar month.

Spend is counted from the ledger at start, so a restart does not reset a budget, and then
kept current in memory from every priced record, before the ledger writer has flushed it.
A paid attempt first reserves its worst-case cost (`reserve`), so calls in flight count
before they are priced: a burst of concurrent calls cannot all pass a nearly spent budget.
Spend is kept for every window, configured or not, so a reload that changes the limits keeps
what was spent and reserved (`reconfigure`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from proxy.config import BudgetSpec

log = logging.getLogger("proxy.budget")

ZERO = Decimal(0)
WINDOWS = ("daily", "weekly", "monthly")


class SpendSource(Protocol):
    async def spend_since(self, day: str) -> Decimal: ...


def window_start(window: str, at: float) -> date:
    """First UTC day of the window that contains `at`."""
    day = datetime.fromtimestamp(at, UTC).date()
    if window == "daily":
        return day
    if window == "weekly":
        return day - timedelta(days=day.weekday())
    if window == "monthly":
        return day.replace(day=1)
    raise ValueError(f"unknown budget window {window!r}; expected one of {', '.join(WINDOWS)}")


def next_window_start(window: str, start: date) -> date:
    if window == "daily":
        return start + timedelta(days=1)
    if window == "weekly":
        return start + timedelta(days=7)
    year, month = divmod(start.month, 12)
    return start.replace(year=start.year + year, month=month + 1)


@dataclass(frozen=True, slots=True)
class WindowState:
    window: str  # daily, weekly, monthly
    start: str  # first day of the current window, YYYY-MM-DD (UTC)
    limit: Decimal
    spent: Decimal
    remaining: Decimal  # never negative
    exhausted: bool
    soft_limit_reached: bool
    resets_at: str  # first day of the next window, YYYY-MM-DD (00:00 UTC)


@dataclass(frozen=True, slots=True)
class BudgetState:
    windows: tuple[WindowState, ...]  # only the configured ones
    paid_allowed: bool
    remaining: Decimal | None  # smallest remaining; None when no budget is configured


class _BudgetWindow:
    """Spend within the current period of one window; rolls over when time moves past it.
    `limit` is None while the window is not configured: its spend is still counted."""

    __slots__ = ("exhausted_logged", "limit", "name", "soft", "spent", "start", "warned")

    def __init__(self, name: str) -> None:
        self.name = name
        self.limit: Decimal | None = None
        self.soft = ZERO
        self.start: date | None = None
        self.spent = ZERO
        self.warned = False
        self.exhausted_logged = False

    def set_limit(self, limit: Decimal | None, soft_ratio: float) -> None:
        if limit != self.limit:
            self.warned = self.exhausted_logged = False
        self.limit = limit
        self.soft = ZERO if limit is None else limit * Decimal(str(soft_ratio))

    def current(self, at: float) -> date:
        start = window_start(self.name, at)
        if self.start is None or start > self.start:
            self.start, self.spent = start, ZERO
            self.warned = self.exhausted_logged = False
        return self.start

    def add(self, cost: Decimal, at: float) -> None:
        start = window_start(self.name, at)
        # A record from a window that has already closed (a request that started before
        # midnight and finished after) belongs to that window, as in the ledger.
        if self.start is not None and start < self.start:
            return
        self.current(at)
        self.spent += cost
        self.check()

    def check(self) -> None:
        if self.limit is None:
            return
        if not self.warned and self.spent >= self.soft:
            self.warned = True
            log.warning(
                "budget: %s spend $%s has reached %s of the $%s limit",
                self.name,
                self.spent,
                f"{self.soft / self.limit:.0%}" if self.limit else "100%",
                self.limit,
            )
        if not self.exhausted_logged and self.spent >= self.limit:
            self.exhausted_logged = True
            log.warning(
                "budget: %s limit of $%s is exhausted ($%s spent); paid tiers are off until %s",
                self.name,
                self.limit,
                self.spent,
                self._next_start(),
            )

    def _next_start(self) -> str:
        assert self.start is not None
        return next_window_start(self.name, self.start).isoformat()

    def state(self, now: float) -> WindowState:
        assert self.limit is not None, "only configured windows have a state"
        start = self.current(now)
        remaining = max(self.limit - self.spent, ZERO)
        return WindowState(
            window=self.name,
            start=start.isoformat(),
            limit=self.limit,
            spent=self.spent,
            remaining=remaining,
            exhausted=self.spent >= self.limit,
            soft_limit_reached=self.spent >= self.soft,
            resets_at=next_window_start(self.name, start).isoformat(),
        )


def _midnight(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


class BudgetTracker:
    """Budgets from `config.budgets`; with none configured every query says "allowed".

    `load` it from the ledger once it has started, before any request is served, and
    `record` every request that cost money (the ledger's cost listener does, at submit time).
    """

    def __init__(self, spec: BudgetSpec) -> None:
        self._all = tuple(_BudgetWindow(name) for name in WINDOWS)
        self._windows: tuple[_BudgetWindow, ...] = ()
        self.reserved = ZERO  # worst-case cost of the paid attempts in flight
        self.reconfigure(spec)

    def reconfigure(self, spec: BudgetSpec) -> None:
        """New limits (a reload); what was spent and what is reserved carry over."""
        limits = {"daily": spec.daily_usd, "weekly": spec.weekly_usd, "monthly": spec.monthly_usd}
        for w in self._all:
            w.set_limit(limits[w.name], spec.soft_ratio)
        self._windows = tuple(w for w in self._all if w.limit is not None)

    @property
    def configured(self) -> bool:
        return bool(self._windows)

    async def load(self, source: SpendSource, now: float | None = None) -> None:
        """Add the spend already in the ledger for each current window.

        Must run before the ledger writes any row recorded here, or that row counts twice:
        the app calls it after `Ledger.start` and before it serves.
        """
        at = datetime.now(UTC).timestamp() if now is None else now
        for w in self._all:
            start = w.current(at)
            w.spent += await source.spend_since(start.isoformat())
            w.check()

    def record(self, cost: Decimal, at: float) -> None:
        for w in self._all:
            w.add(cost, at)

    def reserve(self, amount: Decimal, at: float) -> bool:
        """Hold `amount` for an attempt about to be sent, if no window is used up by what is
        spent and already held; False leaves nothing held. As without calls in flight, the
        last call may pass the limit by its own cost: a budget is exceeded by at most one call."""
        for w in self._windows:
            w.current(at)
            assert w.limit is not None
            if w.spent + self.reserved >= w.limit:
                return False
        self.reserved += amount
        return True

    def release(self, amount: Decimal) -> None:
        """Give back a reservation, once the attempt's real cost has been `record`ed."""
        self.reserved = max(self.reserved - amount, ZERO)

    def limits(self) -> dict[str, Decimal | None]:
        return {w.name: w.limit for w in self._all}

    def spent(self) -> dict[str, Decimal]:
        return {w.name: w.spent for w in self._all}

    def mirror(self, spent: dict[str, Decimal], at: float) -> None:
        """Shared state (proxy/state/): the spend every process has recorded, for routing,
        headers and metrics; this process's own spend then comes back through it."""
        for w in self._all:
            if w.name in spent:
                w.current(at)
                w.spent = spent[w.name]
                w.check()

    def adopt_share(self, known: dict[str, Decimal], held: Decimal, share: float, at: float) -> None:
        """Shared state lost: from now on this process alone decides, so it takes `share` of
        what was left when it last heard (spend and every process's holds counted as spent)."""
        for w in self._all:
            if w.name not in known:
                continue
            w.current(at)
            used = known[w.name] + held
            left = max(w.limit - used, ZERO) if w.limit is not None else ZERO
            w.spent = used + left * (1 - Decimal(str(share)))
        self.reserved = ZERO

    def paid_allowed(self, now: float) -> bool:
        return all(w.state(now).remaining > ZERO for w in self._windows)

    def remaining(self, now: float) -> Decimal | None:
        if not self._windows:
            return None
        return min(w.state(now).remaining for w in self._windows)

    def reopens_in(self, now: float) -> float | None:
        """Seconds until every exhausted window has reset (for Retry-After); None when allowed."""
        if not self._windows:
            return None
        ends = [_midnight(s.resets_at) for s in self.state(now).windows if s.exhausted]
        return max(ends) - now if ends else None

    def state(self, now: float) -> BudgetState:
        windows = tuple(w.state(now) for w in self._windows)
        return BudgetState(
            windows=windows,
            paid_allowed=all(not s.exhausted for s in windows),
            remaining=min((s.remaining for s in windows), default=None),
        )


def budget_json(state: BudgetState) -> dict[str, object]:
    """The budget state as /proxy/report shows it; money as numbers rounded to micro-dollars."""
    return {
        "configured": bool(state.windows),
        "paid_allowed": state.paid_allowed,
        "remaining_usd": None if state.remaining is None else float(round(state.remaining, 6)),
        "windows": [
            {
                "window": w.window,
                "start": w.start,
                "resets_at": w.resets_at,
                "limit_usd": float(w.limit),
                "spent_usd": float(round(w.spent, 6)),
                "remaining_usd": float(round(w.remaining, 6)),
                "exhausted": w.exhausted,
                "soft_limit_reached": w.soft_limit_reached,
            }
            for w in state.windows
        ],
    }
