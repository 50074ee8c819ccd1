"""The ledger schema as an ordered list of SQL scripts, applied once each.

Every applied script is recorded by name in `_migrations`, so a newer proxy upgrades an old
ledger file in place and an up-to-date file is left alone. Append new scripts at the end;
never edit or reorder one that has shipped. docs/ledger.md documents every column.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass

import aiosqlite


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str


_INITIAL = """
CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    started_at        TEXT NOT NULL,
    duration_ms       REAL NOT NULL,
    route             TEXT NOT NULL,
    stream            INTEGER NOT NULL,
    requested_model   TEXT,
    tier              TEXT,
    paid              INTEGER,
    model             TEXT,
    status            INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    attempts          INTEGER NOT NULL,
    ttft_ms           REAL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cached_tokens     INTEGER,
    usage_source      TEXT NOT NULL,
    cost_usd          REAL NOT NULL,
    baseline_cost_usd REAL NOT NULL,
    cost_nano_usd     INTEGER NOT NULL,
    baseline_nano_usd INTEGER NOT NULL,
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
    duration_ms       REAL NOT NULL,
    ttft_ms           REAL,
    http_status       INTEGER,
    outcome           TEXT NOT NULL,
    error             TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cached_tokens     INTEGER,
    cost_usd          REAL NOT NULL,
    cost_nano_usd     INTEGER NOT NULL,
    PRIMARY KEY (request_id, n)
);
CREATE INDEX attempts_started_at ON attempts (started_at);
CREATE INDEX attempts_tier_started_at ON attempts (tier, started_at);

CREATE TABLE daily_usage (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    route             TEXT NOT NULL,
    paid              INTEGER NOT NULL,
    calls             INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    cancelled         INTEGER NOT NULL DEFAULT 0,
    fallbacks         INTEGER NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    duration_ms       REAL NOT NULL DEFAULT 0,
    cost_nano_usd     INTEGER NOT NULL DEFAULT 0,
    baseline_nano_usd INTEGER NOT NULL DEFAULT 0,
    cost_usd          REAL NOT NULL DEFAULT 0,
    baseline_cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier, route, paid)
) WITHOUT ROWID;

CREATE TABLE daily_attempts (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    cancelled         INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_nano_usd     INTEGER NOT NULL DEFAULT 0,
    cost_usd          REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier)
) WITHOUT ROWID;

CREATE TABLE daily_latency (
    day               TEXT NOT NULL,
    tier              TEXT NOT NULL,
    metric            TEXT NOT NULL,
    bucket            INTEGER NOT NULL,
    count             INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tier, metric, bucket)
) WITHOUT ROWID;
"""

# The quality gate (issue 12). Rows written before it were never checked, so the defaults
# (NULL, 0) are what a rebuild from the raw rows gives: no rollup needs recomputing.
_QUALITY = """
ALTER TABLE requests ADD COLUMN check_result TEXT;
ALTER TABLE requests ADD COLUMN escalated_for TEXT;
ALTER TABLE attempts ADD COLUMN checked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN checked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN check_failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN escalated_bad_answers INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN checked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid_cost_nano_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_attempts ADD COLUMN invalid_cost_usd REAL NOT NULL DEFAULT 0;
"""

# Which OpenAI endpoint each request came to (issue 13). Every row written before it came to
# /v1/chat/completions (the only endpoint there was), hence the default; `daily_endpoints` is
# backfilled from the raw rows in the same transaction.
_ENDPOINT = """
ALTER TABLE requests ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat/completions';
CREATE TABLE daily_endpoints (
    day               TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    calls             INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    cancelled         INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    duration_ms       REAL NOT NULL DEFAULT 0,
    cost_nano_usd     INTEGER NOT NULL DEFAULT 0,
    cost_usd          REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, endpoint)
) WITHOUT ROWID;
INSERT INTO daily_endpoints
SELECT substr(started_at, 1, 10), endpoint, count(*), sum(outcome = 'error'), sum(outcome = 'client_cancelled'),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0),
       total(duration_ms), sum(cost_nano_usd), sum(cost_nano_usd) / 1e9
FROM requests GROUP BY 1, 2;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _INITIAL),
    Migration("0002_quality", _QUALITY),
    Migration("0003_endpoint", _ENDPOINT),
)

_CREATE_TABLE = "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"


def statements(script: str) -> list[str]:
    """Split a script into statements; `complete_statement` keeps trigger bodies whole."""
    out: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf.strip())
            buf = ""
    return out


async def applied(conn: aiosqlite.Connection) -> set[str]:
    rows = await conn.execute_fetchall("SELECT name FROM _migrations")
    return {str(r[0]) for r in rows}


async def pending(conn: aiosqlite.Connection) -> list[str]:
    """Names not yet applied; reads only (works on a read-only connection)."""
    exists = await conn.execute_fetchall("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'")
    done: set[str] = set()
    if exists:
        done = {str(r[0]) for r in await conn.execute_fetchall("SELECT name FROM _migrations")}
    return [m.name for m in MIGRATIONS if m.name not in done]


async def migrate(conn: aiosqlite.Connection) -> list[str]:
    """Apply what is missing, each script in its own transaction; returns the names applied.

    The connection must be in autocommit mode (isolation_level=None). An up-to-date file is
    only read, so opening it never waits for another writer. BEGIN IMMEDIATE takes the write
    lock before re-reading `_migrations`, so two processes upgrading an old file at the same
    time cannot both apply the same script.
    """
    todo = set(await pending(conn))
    if not todo:
        return []
    await conn.execute(_CREATE_TABLE)
    done: list[str] = []
    for migration in MIGRATIONS:
        if migration.name in todo and await _apply(conn, migration):
            done.append(migration.name)
    return done


async def _apply(conn: aiosqlite.Connection, migration: Migration) -> bool:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        if migration.name in await applied(conn):
            await conn.execute("ROLLBACK")
            return False
        for stmt in statements(migration.sql):
            await conn.execute(stmt)
        await conn.execute(
            "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
            (migration.name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )
        await conn.execute("COMMIT")
    except sqlite3.Error:
        await _rollback(conn)
        raise
    return True


async def _rollback(conn: aiosqlite.Connection) -> None:
    # The failed statement may already have ended the transaction.
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")
