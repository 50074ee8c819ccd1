"""The SQL the PostgreSQL store runs for a batch: multi-row inserts from one json parameter and the
rollup upserts, made from the same column lists as the SQLite statements (rows.py, rollups.py);
and the statements that rebuild the rollups from the raw rows."""

from __future__ import annotations

from proxy.ledger import by_endpoint
from proxy.ledger.rollups import ATTEMPT_COLUMNS, USAGE_COLUMNS
from proxy.ledger.rows import AttemptRow, RequestRow

# PostgreSQL's type of each column, in RequestRow / AttemptRow order (pg_migrations.py).
_REQUEST_TYPES = {
    "id": "text",
    "started_at": "text",
    "duration_ms": "float8",
    "route": "text",
    "stream": "int4",
    "requested_model": "text",
    "tier": "text",
    "paid": "int4",
    "model": "text",
    "status": "int4",
    "outcome": "text",
    "attempts": "int4",
    "ttft_ms": "float8",
    "prompt_tokens": "int8",
    "completion_tokens": "int8",
    "cached_tokens": "int8",
    "usage_source": "text",
    "cost_usd": "float8",
    "baseline_cost_usd": "float8",
    "cost_nano_usd": "int8",
    "baseline_nano_usd": "int8",
    "client": "text",
    "error": "text",
    "request_text": "text",
    "response_text": "text",
    "check_result": "text",
    "escalated_for": "text",
    "endpoint": "text",
}
_ATTEMPT_TYPES = {
    "request_id": "text",
    "n": "int4",
    "tier": "text",
    "model": "text",
    "started_at": "text",
    "duration_ms": "float8",
    "ttft_ms": "float8",
    "http_status": "int4",
    "outcome": "text",
    "error": "text",
    "prompt_tokens": "int8",
    "completion_tokens": "int8",
    "cached_tokens": "int8",
    "cost_usd": "float8",
    "cost_nano_usd": "int8",
    "checked": "int4",
}
assert tuple(_REQUEST_TYPES) == RequestRow._fields and tuple(_ATTEMPT_TYPES) == AttemptRow._fields

# Text a client or an upstream supplied: PostgreSQL's text cannot hold NUL, SQLite's can.
FREE_TEXT_REQUEST = tuple(
    i
    for i, f in enumerate(RequestRow._fields)
    if f in {"id", "requested_model", "model", "client", "error", "request_text", "response_text"}
)
FREE_TEXT_ATTEMPT = tuple(i for i, f in enumerate(AttemptRow._fields) if f in {"request_id", "model", "error"})


def _json_insert(table: str, types: dict[str, str], suffix: str = "") -> str:
    """The whole batch as ONE json parameter (an array of row objects, orjson-made), unpacked by
    the server: asyncpg encodes each element of an array parameter in Python, checking it
    against three collections.abc classes first (~100 µs of the proxy's CPU per row); a text
    parameter costs it nothing."""
    columns = ", ".join(f"{c} {t}" for c, t in types.items())
    return f"INSERT INTO {table} ({', '.join(types)}) SELECT * FROM json_to_recordset($1::json) AS r({columns}){suffix}"


# One statement per batch whatever its size; an id already stored comes back missing from RETURNING.
INSERT_REQUESTS = _json_insert("requests", _REQUEST_TYPES, " ON CONFLICT (id) DO NOTHING RETURNING id")
INSERT_ATTEMPTS = _json_insert("attempts", _ATTEMPT_TYPES)

# The REAL money columns are re-derived from the exact integers, as on SQLite.
_DERIVED = {
    "cost_usd": "cost_nano_usd",
    "baseline_cost_usd": "baseline_nano_usd",
    "invalid_cost_usd": "invalid_cost_nano_usd",
}


def _upsert(table: str, columns: str, keys: tuple[str, ...]) -> str:
    cols = [c.strip() for c in columns.split(",")]
    values = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    sets = []
    for c in cols:
        if c in keys:
            continue
        if c in _DERIVED:
            n = _DERIVED[c]
            sets.append(f"{c} = ({table}.{n} + excluded.{n}) / 1e9")
        else:
            sets.append(f"{c} = {table}.{c} + excluded.{c}")
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({values})"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)}"
    )


UPSERT_USAGE = _upsert("daily_usage", USAGE_COLUMNS, ("day", "tier", "route", "paid"))
UPSERT_ATTEMPTS = _upsert("daily_attempts", ATTEMPT_COLUMNS, ("day", "tier"))
UPSERT_LATENCY = _upsert("daily_latency", "day, tier, metric, bucket, count", ("day", "tier", "metric", "bucket"))
UPSERT_ENDPOINTS = _upsert("daily_endpoints", by_endpoint.COLUMNS, ("day", "endpoint"))

SPEND_SINCE = "SELECT coalesce(sum(cost_nano_usd), 0) FROM daily_usage WHERE day >= $1"
CLIENT_SPEND_SINCE = (
    "SELECT client, sum(cost_nano_usd) FROM requests WHERE started_at >= $1 AND client IS NOT NULL GROUP BY client"
)


# ---------------------------------------------------------------------------- rebuild_rollups
# The daily tables recomputed from the raw rows (postgres.rebuild_rollups), column for column
# what the SQLite script in rollups.py makes and the upserts above add up. The SQL differs from
# SQLite's only where the dialects do: a count with FILTER for SQLite's sum of a comparison,
# `coalesce(sum(..), 0)` for `total(..)`, `=` for `IS 'text'` (NULL counts in neither), and the
# latency bucket as an expression rather than a Python function, its constants passed from rows.py.

# The order the writer upserts them in (postgres._write_batch): locks taken in one order.
REBUILD_TABLES = ("daily_usage", "daily_attempts", "daily_latency", "daily_endpoints")

# rows.latency_bucket(ms): 0 for <= 1 ms (and NaN, which PostgreSQL sorts above every number),
# else 1 + floor(ln(min(ms, ceiling)) / ln(1.05)). $1 = ln(1.05), $2 = the ceiling, as float8.
_BUCKET = (
    "CASE WHEN {ms} > 1.0 AND {ms} <> 'NaN' THEN 1 + floor(ln(least({ms}, $2::float8)) / $1::float8)::int ELSE 0 END"
)

REBUILD_USAGE = f"""
INSERT INTO daily_usage ({USAGE_COLUMNS})
SELECT substr(started_at, 1, 10), coalesce(tier, ''), route, coalesce(paid, 0), count(*),
       count(*) FILTER (WHERE outcome = 'error'), count(*) FILTER (WHERE outcome = 'client_cancelled'),
       count(*) FILTER (WHERE tier IS NOT NULL AND attempts > 1),
       sum(attempts), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(cached_tokens), 0), coalesce(sum(duration_ms), 0), sum(cost_nano_usd), sum(baseline_nano_usd),
       sum(cost_nano_usd) / 1e9, sum(baseline_nano_usd) / 1e9,
       count(*) FILTER (WHERE check_result IS NOT NULL), count(*) FILTER (WHERE check_result = 'failed'),
       count(*) FILTER (WHERE escalated_for = 'bad_answers')
FROM requests GROUP BY 1, 2, 3, 4"""

REBUILD_ATTEMPTS = f"""
INSERT INTO daily_attempts ({ATTEMPT_COLUMNS})
SELECT substr(started_at, 1, 10), tier, count(*), count(*) FILTER (WHERE outcome NOT IN ('ok', 'cancelled')),
       count(*) FILTER (WHERE outcome = 'cancelled'), coalesce(sum(prompt_tokens), 0),
       coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0), sum(cost_nano_usd),
       sum(cost_nano_usd) / 1e9, count(*) FILTER (WHERE checked <> 0),
       count(*) FILTER (WHERE outcome = 'invalid_output'),
       coalesce(sum(cost_nano_usd) FILTER (WHERE outcome = 'invalid_output'), 0),
       coalesce(sum(cost_nano_usd) FILTER (WHERE outcome = 'invalid_output'), 0) / 1e9
FROM attempts GROUP BY 1, 2"""

REBUILD_LATENCY = f"""
INSERT INTO daily_latency (day, tier, metric, bucket, count)
SELECT substr(started_at, 1, 10), tier, 'duration', {_BUCKET.format(ms="duration_ms")}, count(*)
FROM requests WHERE tier IS NOT NULL GROUP BY 1, 2, 4
UNION ALL
SELECT substr(started_at, 1, 10), tier, 'ttft', {_BUCKET.format(ms="ttft_ms")}, count(*)
FROM requests WHERE tier IS NOT NULL AND ttft_ms IS NOT NULL GROUP BY 1, 2, 4"""

REBUILD_ENDPOINTS = f"""
INSERT INTO daily_endpoints ({by_endpoint.COLUMNS})
SELECT substr(started_at, 1, 10), endpoint, count(*), count(*) FILTER (WHERE outcome = 'error'),
       count(*) FILTER (WHERE outcome = 'client_cancelled'), coalesce(sum(prompt_tokens), 0),
       coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0), coalesce(sum(duration_ms), 0),
       sum(cost_nano_usd), sum(cost_nano_usd) / 1e9
FROM requests GROUP BY 1, 2"""

# For tests: the bucket of each of $3 (float8[]), as rows.latency_bucket gives it.
BUCKETS = f"SELECT {_BUCKET.format(ms='ms')} FROM unnest($3::float8[]) WITH ORDINALITY AS t (ms, i) ORDER BY i"
