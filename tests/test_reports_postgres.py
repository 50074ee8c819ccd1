"""Reports from the PostgreSQL ledger (tests/support/postgres.py starts a real server): the same
records written through the real Ledger to SQLite and to PostgreSQL give the same report, for
windows with and without a partial first day; `proxy report --db postgresql://...` (text and
JSON) and `GET /proxy/report` with `ledger.url`; a report over a 10-million-request history
answers in well under a second; the password appears nowhere."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from proxy.cli import main
from proxy.config import build_config
from proxy.ledger import SqliteStore
from proxy.ledger.postgres import PostgresStore
from proxy.ledger.report_read import build_report
from proxy.ledger.report_text import report_text
from proxy.records import CallRecord, Usage
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.postgres import PostgresServer
from tests.support.quality import TIERS
from tests.support.records import call
from tests.test_ledger_postgres import DAY, records, through_ledger

NOW = DAY + 3.5 * 3600  # 2026-11-26 15:30 UTC: 24h starts mid-day on the 25th, 2h at 13:30 on the 26th
WINDOWS = ("24h", "2h", "12h", "7d", "all")
PW_ENV = "TEST_PG_REPORT_PASSWORD"


@pytest.fixture
def pg_url(pg: PostgresServer) -> str:
    return pg.new_database()


def history() -> list[CallRecord]:
    """`records()` plus calls on the evening of the 25th: inside 24h (read from raw rows) or just before it."""
    evening = [
        call("eve-1", "llama", at=DAY - 18 * 3600, stream=True, ttft_ms=40.0),
        call("eve-2", "kimi", at=DAY - 20 * 3600, usage=Usage(300, 40, 100), client="alice"),
        call("eve-3", "kimi", at=DAY - 22 * 3600, usage=Usage(50, 50)),  # before the 24h window
    ]
    return records() + evening


async def both(pg_url: str, tmp_path: Path) -> Path:
    db = tmp_path / "ref.db"
    recs = history()
    await through_ledger(SqliteStore(db), recs)
    await through_ledger(PostgresStore(pg_url, spill_base=tmp_path / "ledger"), recs)
    return db


async def test_same_records_same_report_on_both_engines(pg_url: str, tmp_path: Path) -> None:
    db = await both(pg_url, tmp_path)
    for since in WINDOWS:
        want = (await build_report(db, since, now=NOW)).to_json()
        got = (await build_report(pg_url, since, now=NOW)).to_json()
        assert got == want, since
    # Not an empty agreement: every window has requests, and the partial days were read from raw rows.
    day, two_hours = [await build_report(pg_url, s, now=NOW) for s in ("24h", "2h")]
    assert day.requests == len([r for r in history() if r.started_at >= NOW - 86400])
    assert 0 < two_hours.requests < day.requests
    assert {t.tier for t in day.tiers} >= {"llama", "kimi"} and day.endpoints
    assert any(t.latency_p50_ms is not None for t in two_hours.tiers)


async def test_report_equals_hand_written_sql(pg_url: str, tmp_path: Path) -> None:
    await both(pg_url, tmp_path)
    report = await build_report(pg_url, "all", now=NOW)
    conn = await asyncpg.connect(pg_url)
    try:
        n, cost = await conn.fetchrow("SELECT count(*), sum(cost_nano_usd) FROM requests")
        tiers = dict(await conn.fetch("SELECT tier, count(*) FROM requests WHERE tier IS NOT NULL GROUP BY tier"))
    finally:
        await conn.close()
    assert (report.requests, report.cost_usd) == (n, Decimal(cost) / 10**9)
    assert report.calls == tiers


async def test_proxy_report_text_and_json(pg: PostgresServer, pg_url: str, tmp_path: Path) -> None:
    db = await both(pg_url, tmp_path)
    code, text = await report_text(pg_url, "24h", False, now=NOW)
    want_code, want_text = await report_text(db, "24h", False, now=NOW)
    assert (code, text) == (want_code, want_text) and code == 0
    assert "kimi" in text and "Requests by endpoint" in text
    code, out = await report_text(pg_url, "all", True, now=NOW)
    assert code == 0 and json.loads(out) == (await build_report(db, "all", now=NOW)).to_json()
    assert pg.password not in text + out


def test_proxy_report_command(
    pg: PostgresServer, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(both(pg_url, tmp_path))
    assert main(["report", "--db", pg_url, "--since", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"] == len(history()) and doc["calls"]["kimi"] > 0
    assert main(["report", "--db", pg_url, "--since", "all"]) == 0
    out = capsys.readouterr().out
    assert "kimi" in out and pg.password not in out


async def test_report_from_the_configs_ledger_url(
    pg: PostgresServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`proxy report` without --db reads the config's `ledger.url`, its password from `ledger.password_env`."""
    await both(pg_url, tmp_path)
    dsn = pg.url(pg_url.rsplit("/", 1)[1], with_password=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    raw = {"tiers": TIERS, "ledger": {"url": dsn, "password_env": PW_ENV, "path": str(tmp_path / "l")}}
    config = build_config(raw, "t", {PW_ENV: pg.password})
    code, text = await report_text(config, "all", True, now=NOW)
    assert code == 0, text
    assert json.loads(text)["requests"] == len(history())
    # Without the password: a clear error, no password, no traceback.
    code, text = await report_text(dsn, "all", False, now=NOW)
    assert code == 1 and text.startswith(f"cannot read ledger {dsn}: ") and pg.password not in text


async def test_errors_name_the_ledger_never_the_password(pg: PostgresServer) -> None:
    wrong = pg.url().replace(pg.password, "not-the-password")
    code, text = await report_text(wrong, "all", False)
    assert code == 1 and "cannot read ledger postgresql://proxy@127.0.0.1" in text
    assert "not-the-password" not in text and pg.password not in text
    empty = pg.new_database()  # a database the proxy never wrote to: said so, and left untouched
    code, text = await report_text(empty, "all", False)
    assert code == 1 and text.startswith("no ledger tables in postgresql://proxy@") and pg.password not in text
    conn = await asyncpg.connect(empty)
    try:
        assert await conn.fetchval("SELECT to_regclass('requests')") is None
    finally:
        await conn.close()
    closed = f"postgresql://proxy:{pg.password}@127.0.0.1:1/x"
    code, text = await report_text(closed, "all", False)
    assert code == 1 and "cannot read ledger postgresql://proxy@127.0.0.1:1/x" in text and pg.password not in text


async def test_http_report_with_ledger_url(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], pg: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    """GET /proxy/report reads the PostgreSQL ledger through the proxy's own store: calls just
    answered are in it, and it is the same report `proxy report --db` gives."""
    await through_ledger(PostgresStore(pg_url, spill_base=tmp_path / "x"), history())
    dsn = pg.url(pg_url.rsplit("/", 1)[1], with_password=False)
    client = await make_proxy(
        tiers=tier_config(upstreams), ledger={"url": dsn, "password_env": PW_ENV}, env={PW_ENV: pg.password}
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "plan the next step"}]}
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    r = await client.get("/proxy/report?since=all")
    assert r.status == 200, await r.text()
    doc = await r.json()
    assert doc["requests"] == len(history()) + 3
    assert doc["ledger"]["written"] == 3
    cli = (await build_report(pg_url, "all")).to_json()
    for key in ("requests", "calls", "cost_usd", "tiers", "endpoints", "exact"):
        assert doc[key] == cli[key], key
    assert pg.password not in await r.text()
    assert (await client.get("/proxy/report?since=2h")).status == 200


# ---------------------------------------------------------------------------- 10 million requests

BIG_DAYS = 365
BIG_LAST_DAY = "2026-11-26"
BIG_NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
# Per day: (tier, route, paid, calls, nano-dollars per call): 27,400 requests a day, 10,001,000 in all.
_BIG_TIERS = """(VALUES ('llama', 'default', 0, 20000::bigint, 0::bigint), ('ollama', 'default', 0, 4000, 0),
    ('kimi', 'default', 1, 3000, 550000), ('kimi', 'escalated', 1, 200, 550000), ('', 'default', 0, 200, 0))
    AS t (tier, route, paid, calls, cost)"""
_BIG_DAY = f"to_char(date '{BIG_LAST_DAY}' - d, 'YYYY-MM-DD')"
_BIG_ROLLUPS = [
    f"""INSERT INTO daily_usage (day, tier, route, paid, calls, failures, cancelled, fallbacks, attempts,
        prompt_tokens, completion_tokens, cached_tokens, duration_ms, cost_nano_usd, baseline_nano_usd,
        cost_usd, baseline_cost_usd, checked, check_failed, escalated_bad_answers)
    SELECT {_BIG_DAY}, tier, route, paid, calls, calls / 100, calls / 200, calls / 50, calls + calls / 50,
        calls * 500, calls * 100, calls * 50, calls * 250.0, calls * cost, calls * 800000,
        calls * cost / 1e9, calls * 800000 / 1e9, calls / 2, calls / 40,
        CASE WHEN route = 'escalated' THEN calls / 2 ELSE 0 END
    FROM generate_series(0, {BIG_DAYS - 1}) AS d, {_BIG_TIERS}""",
    f"""INSERT INTO daily_attempts (day, tier, attempts, failures, cancelled, prompt_tokens, completion_tokens,
        cached_tokens, cost_nano_usd, cost_usd, checked, invalid, invalid_cost_nano_usd, invalid_cost_usd)
    SELECT {_BIG_DAY}, tier, sum(calls) * 1.02, sum(calls) / 50, sum(calls) / 200, sum(calls) * 500,
        sum(calls) * 100, sum(calls) * 50, sum(calls * cost), sum(calls * cost) / 1e9, sum(calls) / 2,
        sum(calls) / 80, sum(calls * cost) / 80, sum(calls * cost) / 80 / 1e9
    FROM generate_series(0, {BIG_DAYS - 1}) AS d, {_BIG_TIERS} WHERE tier <> '' GROUP BY 1, 2""",
    f"""INSERT INTO daily_latency (day, tier, metric, bucket, count)
    SELECT {_BIG_DAY}, tier, metric, b, 1 + (b % 7) * 10
    FROM generate_series(0, {BIG_DAYS - 1}) AS d, (VALUES ('llama'), ('ollama'), ('kimi')) AS t (tier),
         (VALUES ('duration'), ('ttft')) AS m (metric), generate_series(100, 160) AS b""",
    f"""INSERT INTO daily_endpoints (day, endpoint, calls, failures, cancelled, prompt_tokens, completion_tokens,
        cached_tokens, duration_ms, cost_nano_usd, cost_usd)
    SELECT {_BIG_DAY}, e, c, c / 100, c / 200, c * 500, c * 100, c * 50, c * 250.0, c * 60000, c * 60000 / 1e9
    FROM generate_series(0, {BIG_DAYS - 1}) AS d,
         (VALUES ('chat/completions', 20000), ('responses', 5000), ('completions', 2000), ('embeddings', 400))
         AS x (e, c)""",
]
# One day of raw rows (the 25th, 27,400 of them, every 3.153 s): the 24h window's partial first day.
_BIG_TS = "to_char(timestamp '2026-11-25' + i * interval '3153 ms', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
_BIG_TIER = "CASE WHEN i % 10 < 8 THEN 'llama' ELSE 'kimi' END"
_BIG_RAW = [
    f"""INSERT INTO requests (id, started_at, duration_ms, route, stream, requested_model, tier, paid, model,
        status, outcome, attempts, ttft_ms, prompt_tokens, completion_tokens, cached_tokens, usage_source,
        cost_usd, baseline_cost_usd, cost_nano_usd, baseline_nano_usd, endpoint)
    SELECT 'r' || i, {_BIG_TS}, 100 + i % 900, 'default', i % 2, 'auto', {_BIG_TIER}, (i % 10 >= 8)::int, 'm',
        200, 'ok', 1, CASE WHEN i % 2 = 1 THEN 50 + i % 100 END, 500, 100, 0, 'upstream',
        CASE WHEN i % 10 >= 8 THEN 0.00055 ELSE 0 END, 0.0008, CASE WHEN i % 10 >= 8 THEN 550000 ELSE 0 END,
        800000, 'chat/completions'
    FROM generate_series(0, 27399) AS i""",
    f"""INSERT INTO attempts (request_id, n, tier, model, started_at, duration_ms, http_status, outcome,
        prompt_tokens, completion_tokens, cached_tokens, cost_usd, cost_nano_usd)
    SELECT 'r' || i, 1, {_BIG_TIER}, 'm', {_BIG_TS}, 100 + i % 900, 200, 'ok', 500, 100, 0,
        CASE WHEN i % 10 >= 8 THEN 0.00055 ELSE 0 END, CASE WHEN i % 10 >= 8 THEN 550000 ELSE 0 END
    FROM generate_series(0, 27399) AS i""",
]


async def test_report_over_ten_million_requests_is_fast(pg_url: str, tmp_path: Path) -> None:
    store = PostgresStore(pg_url, spill_base=tmp_path / "x")
    await store.open()  # the schema
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        started = time.perf_counter()
        for sql in (*_BIG_ROLLUPS, *_BIG_RAW):
            await conn.execute(sql)
        await conn.execute("ANALYZE")
        generated = time.perf_counter() - started
        total, cost = await conn.fetchrow("SELECT sum(calls), sum(cost_nano_usd) FROM daily_usage")
        lo = "2026-11-25T12:00:00.000Z"
        partial = await conn.fetchval("SELECT count(*) FROM requests WHERE started_at >= $1", lo)
        today = await conn.fetchval("SELECT sum(calls) FROM daily_usage WHERE day >= $1", BIG_LAST_DAY)
        rollup_rows = await conn.fetchval(
            "SELECT (SELECT count(*) FROM daily_usage) + (SELECT count(*) FROM daily_attempts)"
            " + (SELECT count(*) FROM daily_latency) + (SELECT count(*) FROM daily_endpoints)"
        )
    finally:
        await conn.close()
    assert total == 10_001_000

    timings: dict[str, float] = {}
    reports = {}
    for since in ("24h", "7d", "30d", "all"):
        t = time.perf_counter()
        reports[since] = await build_report(pg_url, since, now=BIG_NOW)
        timings[since] = time.perf_counter() - t
    print(
        f"\n10,001,000-request PostgreSQL ledger ({rollup_rows:,} rollup rows, 27,400 raw rows) generated in "
        f"{generated:.2f}s; report: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    )
    everything = reports["all"]
    assert (everything.requests, everything.cost_usd) == (total, Decimal(cost) / 10**9)
    assert reports["24h"].requests == partial + today  # the 25th from raw rows, the 26th from the rollup
    assert everything.tiers[0].latency_p95_ms is not None
    # Each includes connecting and the schema check; the goal is under a second.
    assert max(timings.values()) < 1.0, timings
