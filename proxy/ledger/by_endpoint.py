"""Requests per OpenAI endpoint: the `daily_endpoints` rollup and the report's split by endpoint.

`requests.endpoint` is the path under /v1 a request came to (`Api`: chat/completions, responses,
completions, embeddings). The rollup, keyed by (day, endpoint), is added to in the same
transaction as the raw rows (`rollups.py` calls it) and read like the other rollups (the SQL is
`report_sql.ENDPOINTS`): whole days from here, the partial first day of a window from raw rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.ledger.pricing import from_nano, nano_to_float
from proxy.ledger.report import EndpointReport
from proxy.ledger.rows import RequestRow
from proxy.records import Outcome


@dataclass(slots=True)
class _EndpointSums:
    """One (day, endpoint) group of a batch, or one endpoint of a report window."""

    calls: int = 0
    failures: int = 0  # outcome = error
    cancelled: int = 0  # outcome = client_cancelled
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    duration: float = 0.0
    cost: int = 0  # nano-dollars


COLUMNS = """day, endpoint, calls, failures, cancelled, prompt_tokens, completion_tokens, cached_tokens,
    duration_ms, cost_nano_usd, cost_usd"""

UPSERT = f"""
INSERT INTO daily_endpoints ({COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, endpoint) DO UPDATE SET
    calls = calls + excluded.calls,
    failures = failures + excluded.failures,
    cancelled = cancelled + excluded.cancelled,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    duration_ms = duration_ms + excluded.duration_ms,
    cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd,
    cost_usd = (cost_nano_usd + excluded.cost_nano_usd) / 1e9
"""

# Column for column what `EndpointRollup` adds up (part of `rollups.rebuild_rollups`).
REBUILD = f"""
DELETE FROM daily_endpoints;
INSERT INTO daily_endpoints ({COLUMNS})
SELECT substr(started_at, 1, 10), endpoint, count(*), sum(outcome = 'error'), sum(outcome = 'client_cancelled'),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       total(duration_ms), sum(cost_nano_usd), sum(cost_nano_usd) / 1e9
FROM requests GROUP BY 1, 2;
"""


class EndpointRollup:
    """A batch's contribution to `daily_endpoints`: one upsert per (day, endpoint)."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], _EndpointSums] = {}

    def add(self, day: str, r: RequestRow) -> None:
        s = self.groups.get((day, r.endpoint))
        if s is None:
            s = self.groups[(day, r.endpoint)] = _EndpointSums()
        s.calls += 1
        s.failures += r.outcome == Outcome.ERROR.value
        s.cancelled += r.outcome == Outcome.CLIENT_CANCELLED.value
        s.prompt += r.prompt_tokens or 0
        s.completion += r.completion_tokens or 0
        s.cached += r.cached_tokens or 0
        s.duration += r.duration_ms
        s.cost += r.cost_nano_usd

    def params(self) -> list[tuple[Any, ...]]:
        return [
            (
                *k,
                s.calls,
                s.failures,
                s.cancelled,
                s.prompt,
                s.completion,
                s.cached,
                s.duration,
                s.cost,
                nano_to_float(s.cost),
            )
            for k, s in self.groups.items()
        ]


# ---------------------------------------------------------------------------- the report's split


def endpoint_reports(rows: Iterable[Sequence[Any]]) -> tuple[EndpointReport, ...]:
    """The window's requests per endpoint, busiest first; only endpoints with calls in it.

    `rows` are those of `report_sql.ENDPOINTS` (rollup days, then the partial first day), from either engine.
    """
    sums: dict[str, _EndpointSums] = {}
    for endpoint, calls, failures, cancelled, prompt, completion, cached, cost in rows:
        s = sums.setdefault(str(endpoint), _EndpointSums())
        s.calls += int(calls or 0)
        s.failures += int(failures or 0)
        s.cancelled += int(cancelled or 0)
        s.prompt += int(prompt or 0)
        s.completion += int(completion or 0)
        s.cached += int(cached or 0)
        s.cost += int(cost or 0)
    return tuple(
        EndpointReport(
            endpoint=name,
            calls=s.calls,
            errors=s.failures,
            client_cancelled=s.cancelled,
            prompt_tokens=s.prompt,
            completion_tokens=s.completion,
            cached_tokens=s.cached,
            cost_usd=from_nano(s.cost),
        )
        for name, s in sorted(sums.items(), key=lambda kv: (-kv[1].calls, kv[0]))
        if s.calls
    )
