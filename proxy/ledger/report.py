"""The cost report: calls, cost and savings per tier (and calls per endpoint) over a window, and its JSON.

`report_read.py` builds it from the ledger, `report_text.py` prints it (`proxy report`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from proxy.ledger.pricing import round_micro

ALLOWED_SINCE = "24h, 7d, 30d, all, or a whole number of hours or days such as 12h or 90d"
_SINCE_RE = re.compile(r"^\s*(\d{1,6})\s*([hd])\s*$", re.IGNORECASE)
_MAX_SINCE_HOURS = 36500 * 24


def parse_since(since: str, now: float) -> float | None:
    """The window start as unix seconds, None for `all`; ValueError names the allowed values."""
    if since.strip().lower() == "all":
        return None
    m = _SINCE_RE.match(since)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"invalid --since {since!r}: expected {ALLOWED_SINCE}")
    hours = int(m.group(1)) * (24 if m.group(2).lower() == "d" else 1)
    if hours > _MAX_SINCE_HOURS:
        raise ValueError(f"invalid --since {since!r}: at most 100 years (36500d); use 'all' for everything")
    return now - hours * 3600.0


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class TierReport:
    tier: str
    paid: bool
    calls: int  # requests this tier answered
    fallbacks: int  # ... of which needed more than one attempt
    fallback_rate: float | None  # fallbacks / calls
    attempts: int  # upstream attempts sent to this tier
    failures: int  # attempts that failed (timeout, connect, http, bad response, bad answer)
    cancelled: int  # attempts abandoned because the client went away
    failure_rate: float | None  # failures / attempts
    latency_p50_ms: float | None  # request duration, requests this tier answered
    latency_p95_ms: float | None
    ttft_p50_ms: float | None  # time to first token, streamed requests it answered
    ttft_p95_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal  # cost of the requests it answered
    baseline_cost_usd: Decimal  # what the baseline paid tier would have charged for them
    # The quality gate: answers from this tier it judged, and those that were bad.
    checked: int  # attempts whose answer was checked
    bad_answers: int  # ... that failed the check (outcome invalid_output)
    bad_answer_rate: float | None  # bad_answers / checked: plan quality by tier
    bad_answer_cost_usd: Decimal  # what the bad answers cost (they were paid for)
    escalated: int  # requests it answered on route escalated
    escalated_bad_answers: int  # ... because the primary's breaker opened on bad answers


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """The requests that came to one OpenAI endpoint (`requests.endpoint`), whoever answered."""

    endpoint: str  # the path under /v1: chat/completions, responses, completions, embeddings
    calls: int  # requests
    errors: int  # ... with outcome error
    client_cancelled: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal  # everything those requests cost


@dataclass(frozen=True, slots=True)
class Report:
    since: str
    window_start: str | None  # ISO-8601 UTC; None for `all`
    generated_at: str
    requests: int
    answered: int
    errors: int  # outcome = error
    client_cancelled: int
    calls: dict[str, int]  # answering tier -> requests
    cost_usd: Decimal  # everything spent (free tiers cost 0)
    savings_usd: Decimal  # sum(baseline - cost) over requests answered by free tiers
    free_calls: int
    free_call_pct: float | None  # share of answered requests a free tier answered
    answers_checked: int  # answers clients received that the quality gate judged
    answers_passed: int  # ... that passed it
    answers_passed_pct: float | None  # answers_passed / answers_checked, in percent
    bad_answers: int  # attempts on any tier that gave a bad answer
    bad_answer_cost_usd: Decimal  # what they cost
    escalated: int  # requests on route escalated
    escalated_bad_answers: int  # ... because the primary's breaker opened on bad answers
    tiers: tuple[TierReport, ...] = field(default=())
    endpoints: tuple[EndpointReport, ...] = field(default=())  # busiest first; only those with calls

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "window_start": self.window_start,
            "generated_at": self.generated_at,
            "requests": self.requests,
            "answered": self.answered,
            "errors": self.errors,
            "client_cancelled": self.client_cancelled,
            "calls": dict(self.calls),
            "cost_usd": _money(self.cost_usd),
            "savings_usd": _money(self.savings_usd),
            "free_calls": self.free_calls,
            "free_call_pct": self.free_call_pct,
            "answers_checked": self.answers_checked,
            "answers_passed": self.answers_passed,
            "answers_passed_pct": self.answers_passed_pct,
            "bad_answers": self.bad_answers,
            "bad_answer_cost_usd": _money(self.bad_answer_cost_usd),
            "escalated": self.escalated,
            "escalated_bad_answers": self.escalated_bad_answers,
            "exact": {
                "cost_usd": str(self.cost_usd),
                "savings_usd": str(self.savings_usd),
                "bad_answer_cost_usd": str(self.bad_answer_cost_usd),
            },
            "tiers": [_tier_json(t) for t in self.tiers],
            "endpoints": [_endpoint_json(e) for e in self.endpoints],
        }


def _money(usd: Decimal) -> float:
    return float(round_micro(usd))


def _tier_json(t: TierReport) -> dict[str, Any]:
    return {
        "tier": t.tier,
        "paid": t.paid,
        "calls": t.calls,
        "fallbacks": t.fallbacks,
        "fallback_rate": t.fallback_rate,
        "attempts": t.attempts,
        "failures": t.failures,
        "cancelled": t.cancelled,
        "failure_rate": t.failure_rate,
        "latency_p50_ms": t.latency_p50_ms,
        "latency_p95_ms": t.latency_p95_ms,
        "ttft_p50_ms": t.ttft_p50_ms,
        "ttft_p95_ms": t.ttft_p95_ms,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cached_tokens": t.cached_tokens,
        "cost_usd": _money(t.cost_usd),
        "baseline_cost_usd": _money(t.baseline_cost_usd),
        "checked": t.checked,
        "bad_answers": t.bad_answers,
        "bad_answer_rate": t.bad_answer_rate,
        "bad_answer_cost_usd": _money(t.bad_answer_cost_usd),
        "escalated": t.escalated,
        "escalated_bad_answers": t.escalated_bad_answers,
        "exact": {
            "cost_usd": str(t.cost_usd),
            "baseline_cost_usd": str(t.baseline_cost_usd),
            "bad_answer_cost_usd": str(t.bad_answer_cost_usd),
        },
    }


def _endpoint_json(e: EndpointReport) -> dict[str, Any]:
    return {
        "endpoint": e.endpoint,
        "calls": e.calls,
        "errors": e.errors,
        "client_cancelled": e.client_cancelled,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "cached_tokens": e.cached_tokens,
        "cost_usd": _money(e.cost_usd),
        "exact": {"cost_usd": str(e.cost_usd)},
    }
