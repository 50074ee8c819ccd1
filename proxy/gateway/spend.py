"""The money gate: a priced attempt reserves its worst-case cost before it is sent.

Budgets and client caps are only worth something if calls in flight count: checked when a
request is planned and charged when it ends, a burst of concurrent calls all pass a nearly
spent budget. So each attempt on a priced tier first holds the most it can cost against
the spend budget and the client key's daily cap; after the attempt its hold shrinks to what
it really cost (a failed attempt usually nothing), and when the request's record has been
priced by the ledger (which adds the real cost) the holds are released.

Worst case: the tier's flat `per_call_usd`, or the prompt at one token per byte of the
request body (a token is at least a byte in the byte-level tokenizers these models use)
plus `max_completion_tokens` / `max_tokens` output tokens (`budgets.reserve_output_tokens`
when the client sets neither), at the tier's prices; whichever is higher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.config import ClientKey, Price, Tier
from proxy.errors import ProxyError, RateLimited
from proxy.gateway.client_keys import ClientLimits
from proxy.ledger.budget import BudgetTracker
from proxy.ledger.pricing import ZERO, attempt_cost_usd
from proxy.records import AttemptRecord

if TYPE_CHECKING:
    from proxy.state.spend import SharedSpend

_MTOK = Decimal(1_000_000)


def output_ceiling(payload: dict[str, Any], default: int) -> int:
    """The most output tokens the client allows this call, or `default`."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def worst_case_usd(price: Price, prompt_bytes: int, output_tokens: int) -> Decimal:
    tokens = (prompt_bytes * price.input_per_mtok + output_tokens * price.output_per_mtok) / _MTOK
    return max(price.per_call_usd or ZERO, tokens)


@dataclass(slots=True)
class SpendGate:
    """One request's reservations, shared by its attempts."""

    budget: BudgetTracker
    limits: ClientLimits
    key: ClientKey | None
    prompt_bytes: int
    output_tokens: int
    shared: SharedSpend | None = None  # state.url: the holds live in Redis (proxy/state/spend.py)
    held: dict[int, Decimal] = field(default_factory=dict)  # attempt number -> amount held
    holds: dict[int, str] = field(default_factory=dict)  # attempt number -> its hold in Redis
    refused_by: str | None = None  # "budget" or "client": why a priced tier was left out

    async def reserve(self, tier: Tier, n: int) -> bool:
        """Hold the worst case of attempt `n` on `tier`; False: the tier is over budget."""
        amount = worst_case_usd(tier.price, self.prompt_bytes, self.output_tokens)
        if amount <= ZERO:
            return True
        now = time.time()
        if self.shared is not None and self.shared.link.up:
            verdict, hold = await self.shared.reserve(self.key, amount, now)
            if hold is not None:
                self.held[n], self.holds[n] = amount, hold
                return True
            if verdict != "down":
                self.refused_by = verdict
                return False
        if not self.budget.reserve(amount, now):
            self.refused_by = "budget"
            return False
        if not self.limits.reserve(self.key, amount, now):
            self.budget.release(amount)
            self.refused_by = "client"
            return False
        self.held[n] = amount
        return True

    def settle(self, tier: Tier, rec: AttemptRecord) -> None:
        """An attempt is over (and was not a committed stream): hold only what it cost."""
        held = self.held.get(rec.n)
        if held is None:
            return
        cost = min(attempt_cost_usd(rec, tier.price), held)
        hold = self.holds.get(rec.n)
        if hold is not None and self.shared is not None:
            self.shared.settle(hold, cost)
        else:
            self._give_back(rec.n, held - cost)
        self.held[rec.n] = cost

    def release(self) -> None:
        """The request's real cost has been recorded: let go of every hold."""
        for n, amount in self.held.items():
            self._give_back(n, amount)
        self.held.clear()
        self.holds.clear()

    def refusal(self) -> ProxyError:
        """The error when every tier left was refused for spend."""
        now = time.time()
        if self.refused_by == "client" and self.key is not None:
            return self.limits.exhausted(self.key, now)
        wait = max(int(self.budget.reopens_in(now) or 0) + 1, 1)
        return RateLimited(
            "The spend budget cannot cover this call (spent plus calls in flight): use a free tier, "
            "or wait for the budget window to reset",
            code="budget_exhausted",
            headers={"Retry-After": str(wait)},
        )

    def _give_back(self, n: int, amount: Decimal) -> None:
        hold = self.holds.pop(n, None)
        if hold is not None and self.shared is not None:
            self.shared.release(hold)
        elif amount > ZERO:
            self.budget.release(amount)
            self.limits.release(self.key, amount)
            if self.shared is not None:
                self.shared.local_released()
