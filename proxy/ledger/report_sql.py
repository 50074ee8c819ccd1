"""The report's queries, written once for both engines (SQLite and PostgreSQL).

Each figure has two queries: one over the daily rollups (whole days, parameter `$1` = the first
day), one over the raw rows of the partial first day of a window (`$1`, `$2` = ISO bounds, read
through the `started_at` index). Both engines run the same text: no `IS` comparison, no sum of
booleans, no `total()`: counts are `sum(CASE WHEN ... THEN 1 ELSE 0 END)`, a NULL compared with
`=` falls to the ELSE. `$n` is PostgreSQL's placeholder; SQLite runs it as `?n` (numbered), so
none of these statements may contain another `$`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Query:
    """One read-only statement and its positional arguments."""

    sql: str
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Pair:
    """A figure's rollup query and its raw-row query for the partial first day."""

    rollup: str
    raw: str


def n(condition: str) -> str:
    """How many rows of the group meet `condition` (0, never NULL, on both engines)."""
    return f"sum(CASE WHEN {condition} THEN 1 ELSE 0 END)"


REQUESTS = Pair(
    rollup="""
SELECT tier, paid, sum(calls), sum(failures), sum(cancelled), sum(fallbacks), sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(checked), sum(check_failed), sum(CASE WHEN route = 'escalated' THEN calls ELSE 0 END),
       sum(escalated_bad_answers)
FROM daily_usage WHERE day >= $1 GROUP BY tier, paid
""",
    raw=f"""
SELECT coalesce(tier, ''), coalesce(paid, 0), count(*), {n("outcome = 'error'")},
       {n("outcome = 'client_cancelled'")}, {n("tier IS NOT NULL AND attempts > 1")},
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       sum(cost_nano_usd), sum(baseline_nano_usd),
       {n("check_result IS NOT NULL")}, {n("check_result = 'failed'")}, {n("route = 'escalated'")},
       {n("escalated_for = 'bad_answers'")}
FROM requests WHERE started_at >= $1 AND started_at < $2 GROUP BY coalesce(tier, ''), coalesce(paid, 0)
""",
)

ATTEMPTS = Pair(
    rollup="""
SELECT tier, sum(attempts), sum(failures), sum(cancelled), sum(checked), sum(invalid), sum(invalid_cost_nano_usd)
FROM daily_attempts WHERE day >= $1 GROUP BY tier
""",
    raw=f"""
SELECT tier, count(*), {n("outcome NOT IN ('ok', 'cancelled')")}, {n("outcome = 'cancelled'")}, {n("checked <> 0")},
       {n("outcome = 'invalid_output'")},
       coalesce(sum(CASE WHEN outcome = 'invalid_output' THEN cost_nano_usd ELSE 0 END), 0)
FROM attempts WHERE started_at >= $1 AND started_at < $2 GROUP BY tier
""",
)

# Rollup: (tier, metric, bucket, count); raw: one (tier, duration, ttft) per answered request,
# bucketed in Python exactly as the writer buckets them (rows.latency_bucket).
LATENCY = Pair(
    rollup="""
SELECT tier, metric, bucket, sum(count) FROM daily_latency WHERE day >= $1 GROUP BY tier, metric, bucket
""",
    raw="""
SELECT tier, duration_ms, ttft_ms FROM requests
WHERE started_at >= $1 AND started_at < $2 AND tier IS NOT NULL
""",
)

ENDPOINTS = Pair(
    rollup="""
SELECT endpoint, sum(calls), sum(failures), sum(cancelled), sum(prompt_tokens), sum(completion_tokens),
       sum(cached_tokens), sum(cost_nano_usd)
FROM daily_endpoints WHERE day >= $1 GROUP BY endpoint
""",
    raw=f"""
SELECT endpoint, count(*), {n("outcome = 'error'")}, {n("outcome = 'client_cancelled'")},
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       sum(cost_nano_usd)
FROM requests WHERE started_at >= $1 AND started_at < $2 GROUP BY endpoint
""",
)

PAIRS = (REQUESTS, ATTEMPTS, LATENCY, ENDPOINTS)
assert all("$" not in p.replace("$1", "").replace("$2", "") for pair in PAIRS for p in (pair.rollup, pair.raw))


def for_sqlite(sql: str) -> str:
    """The same statement with SQLite's numbered placeholders (`$1` -> `?1`)."""
    return sql.replace("$", "?")
