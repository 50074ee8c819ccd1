"""The ledger schema on PostgreSQL: the same tables, columns and migration names as `migrations.py`.

Column for column what the SQLite scripts create, in PostgreSQL's types: TEXT stays TEXT (the
timestamps keep their fixed-width ISO text, so `substr(started_at, 1, 10)` is the day on both),
REAL is DOUBLE PRECISION, INTEGER is BIGINT (nano-dollar sums pass 2^31 at $2.15). Flags such as
`stream` and `paid` stay integers 0/1, so the queries in docs/ledger.md read both engines.

Each script runs in its own transaction under a transaction-level advisory lock, and is recorded
in `_migrations (name, applied_at)` as on SQLite: two processes opening one database at once
cannot apply a script twice, and PostgreSQL's DDL is transactional, so a script applies whole or
not at all. Append new scripts in both files, under the same name.
"""

from __future__ import annotations

import time
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from proxy.ledger.migrations import Migration

# A connection of its own or one lent by the pool.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Any constant: it only has to be the same in every proxy process (pg_advisory_xact_lock(bigint)).
MIGRATION_LOCK = 0x70726F78794C47  # "proxyLG"

_INITIAL = """
CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    started_at        TEXT NOT NULL,
    duration_ms       DOUBLE PRECISION NOT NULL,
    route             TEXT NOT NULL,
    stream            INTEGER NOT NULL,
    requested_model   TEXT,
    tier              TEXT,
    paid              INTEGER,
    model             TEXT,
    status            INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    attempts          INTEGER NOT NULL,
    ttft_ms           DOUBLE PRECISION,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    cached_tokens     BIGINT,
    usage_source      TEXT NOT NULL,
    cost_usd          DOUBLE PRECISION NOT NULL,
    baseline_cost_usd DOUBLE PRECISION NOT NULL,
    cost_nano_usd     BIGINT NOT NULL,
    baseline_nano_usd BIGINT NOT NULL,
    client            TEXT,
    error             TEXT,
    request_text      TEXT,
    response_text     TEXT
);
CREATE INDEX requests_started_at ON requests (started_at);
CREATE INDEX requests_tier_started_at ON requests (tier, started_at);

CREATE TABLE attempts (
    request_id        TEXT NOT NULL,
    n                 INTEGER NOT NULL,
    tier              TEXT NOT NULL,
    model             TEXT NOT NULL,
    started_at        TEXT NOT NULL,
    duration_ms       DOUBLE PRECISION NOT NULL,
    ttft_ms           DOUBLE PRECISION,
    http_status       INTEGER,
    outcome           TEXT NOT NULL,
    error             TEXT,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    cached_tokens     BIGINT,
    cost_usd          DOUBLE PRECISION NOT NULL,
    cost_nano_usd     BIGINT NOT NULL,
    PRIMARY KEY (request_id, n)
);
CREATE INDEX attempts_started_at ON attempts (started_at);
CREATE INDEX attempts_tier_started_at ON attempts (tier, started_at);

CREATE TABLE daily_usage (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    route             TEXT NOT NULL,
    paid              INTEGER NOT NULL,
    calls             BIGINT NOT NULL DEFAULT 0,
    failures          BIGINT NOT NULL DEFAULT 0,
    cancelled         BIGINT NOT NULL DEFAULT 0,
    fallbacks         BIGINT NOT NULL DEFAULT 0,
    attempts          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    duration_ms       DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_nano_usd     BIGINT NOT NULL DEFAULT 0,
    baseline_nano_usd BIGINT NOT NULL DEFAULT 0,
    cost_usd          DOUBLE PRECISION NOT NULL DEFAULT 0,
    baseline_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier, route, paid)
);

CREATE TABLE daily_attempts (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    failures          BIGINT NOT NULL DEFAULT 0,
    cancelled         BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    cost_nano_usd     BIGINT NOT NULL DEFAULT 0,
    cost_usd          DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier)
);

CREATE TABLE daily_latency (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    metric            TEXT NOT NULL,
    bucket            INTEGER NOT NULL,
    count             BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier, metric, bucket)
);
"""

_QUALITY = """
ALTER TABLE requests ADD COLUMN check_result TEXT;
ALTER TABLE requests ADD COLUMN escalated_for TEXT;
ALTER TABLE attempts ADD COLUMN checked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN checked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN check_failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN escalated_bad_answers BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN checked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid_cost_nano_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0;
"""

_ENDPOINT = """
ALTER TABLE requests ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat/completions';
CREATE TABLE daily_endpoints (
    day               TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    calls             BIGINT NOT NULL DEFAULT 0,
    failures          BIGINT NOT NULL DEFAULT 0,
    cancelled         BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens     BIGINT NOT NULL DEFAULT 0,
    duration_ms       DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_nano_usd     BIGINT NOT NULL DEFAULT 0,
    cost_usd          DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, endpoint)
);
INSERT INTO daily_endpoints
SELECT substr(started_at, 1, 10), endpoint, count(*), count(*) FILTER (WHERE outcome = 'error'),
       count(*) FILTER (WHERE outcome = 'client_cancelled'), coalesce(sum(prompt_tokens), 0),
       coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0), coalesce(sum(duration_ms), 0),
       sum(cost_nano_usd), sum(cost_nano_usd) / 1e9
FROM requests GROUP BY 1, 2;
"""

PG_MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _INITIAL),
    Migration("0002_quality", _QUALITY),
    Migration("0003_endpoint", _ENDPOINT),
)

_CREATE_TABLE = "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"


async def pending(conn: Conn) -> list[str]:
    """Names not yet applied; reads only."""
    exists = await conn.fetchval("SELECT to_regclass('_migrations') IS NOT NULL")
    done: set[str] = set()
    if exists:
        done = {str(r[0]) for r in await conn.fetch("SELECT name FROM _migrations")}
    return [m.name for m in PG_MIGRATIONS if m.name not in done]


async def migrate(conn: Conn) -> list[str]:
    """Apply what is missing, each script in its own transaction; returns the names applied.
    An up-to-date database is only read. Raises asyncpg's errors."""
    if not await pending(conn):
        return []
    done: list[str] = []
    for migration in PG_MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_CREATE_TABLE)
            if await conn.fetchval("SELECT 1 FROM _migrations WHERE name = $1", migration.name):
                continue
            await conn.execute(migration.sql)  # a simple-query script: several statements at once
            await conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES ($1, $2)",
                migration.name,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        done.append(migration.name)
    return done
