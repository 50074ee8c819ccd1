"""A hand-made day of calls through the quality gate, with every figure the reports should show
worked out by hand below (prices: kimi 0.60 in / 2.50 out per million tokens, llama and ollama
free).

| set | calls | attempts (tier: outcome)                          | answer          | check   | route                |
|-----|-------|---------------------------------------------------|-----------------|---------|----------------------|
| A   | 4     | llama ok                                          | llama           | passed  | default              |
| B   | 2     | llama bad, llama ok                               | llama           | passed  | default              |
| C   | 1     | llama bad, llama bad, ollama ok                   | ollama          | passed  | default              |
| D   | 1     | llama bad, ollama bad, kimi bad (1000/400 tokens) | kimi, the last  | failed  | default              |
| E   | 2     | kimi ok (500/100)                                 | kimi            | passed  | escalated, bad answers |
| F   | 1     | kimi ok (500/100), unchecked                      | kimi            | -       | escalated, failures  |
| G   | 3     | llama ok, unchecked                               | llama           | -       | default              |
| H   | 1     | kimi bad (200/100), kimi ok (200/100)             | kimi            | passed  | complex              |
| I   | 1     | llama timeout, ollama ok                          | ollama          | passed  | default              |

A-E start at `first`, F-I at `second` (so a test can put them on either side of midnight).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from proxy.config import Config, build_config
from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, CheckResult, Escalation, Route, Usage
from tests.support.records import attempt, call

KIMI_PRICE = {"input_per_mtok": "0.60", "cached_input_per_mtok": "0.15", "output_per_mtok": "2.50"}
TIERS: dict[str, dict[str, Any]] = {
    "llama": {"base_url": "http://127.0.0.1:1/v1", "model": "llama3.1:8b"},
    "ollama": {"base_url": "http://127.0.0.1:2/v1", "model": "qwen2.5:7b"},
    "kimi": {"base_url": "http://127.0.0.1:3/v1", "model": "kimi-k2.5", "paid": True, "price": KIMI_PRICE},
}
BAD = "content is not JSON: Expecting value at line 1 column 1"
CUT = "cut at max_tokens"

# What the answers the clients got (passed or failed) and the attempts come to.
EXPECTED_TIERS: dict[str, dict[str, Any]] = {
    #        attempts failures checked bad  bad rate   bad cost          calls escalated (bad answers)
    "llama": dict(attempts=15, failures=6, checked=11, bad_answers=5, bad_answer_rate=0.4545,
                  bad_answer_cost_usd=Decimal(0), calls=9, escalated=0, escalated_bad_answers=0),
    "ollama": dict(attempts=3, failures=1, checked=3, bad_answers=1, bad_answer_rate=0.3333,
                   bad_answer_cost_usd=Decimal(0), calls=2, escalated=0, escalated_bad_answers=0),
    "kimi": dict(attempts=6, failures=2, checked=5, bad_answers=2, bad_answer_rate=0.4,
                 bad_answer_cost_usd=Decimal("0.00197"), calls=5, escalated=3, escalated_bad_answers=2),
}  # fmt: skip
EXPECTED_TOTALS: dict[str, Any] = {
    "requests": 16,
    "answered": 16,
    "answers_checked": 12,
    "answers_passed": 11,
    "answers_passed_pct": 91.67,
    "bad_answers": 8,
    "bad_answer_cost_usd": Decimal("0.00197"),
    "escalated": 3,
    "escalated_bad_answers": 2,
    # D 0.0016 + E 2 x 0.00055 + F 0.00055 + H 0.00037 twice
    "cost_usd": Decimal("0.00399"),
}


def quality_config(batch_size: int = 500) -> Config:
    return build_config({"tiers": TIERS, "ledger": {"batch_size": batch_size}}, "test", {})


class _Clock:
    def __init__(self, start: float) -> None:
        self.t = start

    def tick(self) -> float:
        self.t += 1.0
        return self.t


def _ok(n: int, tier: str, at: float, usage: Usage | None = None, *, checked: bool = True) -> AttemptRecord:
    return attempt(n, tier, started_at=at, http_status=200, usage=usage, checked=checked)


def _bad(n: int, tier: str, at: float, usage: Usage | None = None, error: str = BAD) -> AttemptRecord:
    return attempt(
        n, tier, AttemptOutcome.INVALID_OUTPUT, started_at=at, http_status=200, usage=usage, error=error, checked=True
    )


def _call(rid: str, tier: str, at: float, attempts: list[AttemptRecord], **kw: Any) -> CallRecord:
    return call(rid, tier, at=at, attempts=attempts, usage=attempts[-1].usage, duration_ms=200.0, **kw)


def quality_calls(first: float, second: float) -> list[CallRecord]:
    a, b = _Clock(first), _Clock(second)
    passed = {"check": CheckResult.PASSED}
    out: list[CallRecord] = []
    for i in range(4):
        t = a.tick()
        out.append(_call(f"A{i}", "llama", t, [_ok(1, "llama", t)], **passed))
    for i in range(2):
        t = a.tick()
        out.append(_call(f"B{i}", "llama", t, [_bad(1, "llama", t, error=CUT), _ok(2, "llama", t)], **passed))
    t = a.tick()
    out.append(_call("C", "ollama", t, [_bad(1, "llama", t), _bad(2, "llama", t), _ok(3, "ollama", t)], **passed))
    t = a.tick()
    out.append(
        _call(
            "D",
            "kimi",
            t,
            [_bad(1, "llama", t), _bad(2, "ollama", t), _bad(3, "kimi", t, Usage(1000, 400))],
            check=CheckResult.FAILED,
            error=BAD,
        )
    )
    for i in range(2):
        t = a.tick()
        out.append(
            _call(
                f"E{i}",
                "kimi",
                t,
                [_ok(1, "kimi", t, Usage(500, 100))],
                route=Route.ESCALATED,
                escalated_for=Escalation.BAD_ANSWERS,
                **passed,
            )
        )
    t = b.tick()
    out.append(
        _call(
            "F",
            "kimi",
            t,
            [_ok(1, "kimi", t, Usage(500, 100), checked=False)],
            route=Route.ESCALATED,
            escalated_for=Escalation.FAILURES,
        )
    )
    for i in range(3):
        t = b.tick()
        out.append(_call(f"G{i}", "llama", t, [_ok(1, "llama", t, checked=False)]))
    t = b.tick()
    out.append(
        _call(
            "H",
            "kimi",
            t,
            [_bad(1, "kimi", t, Usage(200, 100)), _ok(2, "kimi", t, Usage(200, 100))],
            route=Route.COMPLEX,
            **passed,
        )
    )
    t = b.tick()
    timeout = attempt(1, "llama", AttemptOutcome.TIMEOUT, started_at=t, error="no answer within 1.0 s")
    out.append(_call("I", "ollama", t, [timeout, _ok(2, "ollama", t)], **passed))
    return out
