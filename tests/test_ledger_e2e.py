"""The ledger through the real proxy: every request and attempt lands with the right cost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import LedgerUnavailable, create_app
from proxy.gateway.state import STATE
from proxy.ledger import spill_path
from proxy.ledger.report_text import report_text
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config

MSG = {"messages": [{"role": "user", "content": "plan the next step"}]}
KIMI_FLAT = {"price": {"per_call_usd": 0.0008}}
KIMI_TOKENS = {"price": {"input_per_mtok": 0.60, "cached_input_per_mtok": 0.15, "output_per_mtok": 2.50}}


async def rows(client: TestClient[web.Request, web.Application], sql: str, *args: Any) -> list[sqlite3.Row]:
    ledger = client.app[STATE].ledger
    assert ledger is not None
    await ledger.flush()
    with sqlite3.connect(ledger.store.location) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, args))


async def one(client: TestClient[web.Request, web.Application], sql: str, *args: Any) -> sqlite3.Row:
    got = await rows(client, sql, *args)
    assert len(got) == 1, got
    return got[0]


async def test_plain_success_row_field_by_field(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(tiers=tier_config(upstreams, kimi=KIMI_TOKENS))
    resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    doc = await resp.json()
    rid = resp.headers["X-Request-Id"]
    r = await one(client, "SELECT * FROM requests")
    usage = doc["usage"]
    expected_baseline = (
        Decimal(usage["prompt_tokens"]) * Decimal("0.60") + Decimal(usage["completion_tokens"]) * Decimal("2.50")
    ) / 1_000_000
    assert dict(r) | {"started_at": None, "duration_ms": None} == dict(r) | {
        "id": rid,
        "started_at": None,
        "duration_ms": None,
        "route": "default",
        "stream": 0,
        "requested_model": "auto",
        "tier": "llama",
        "model": "llama3.1:8b",
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "ttft_ms": None,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cached_tokens": 0,
        "usage_source": "upstream",
        "cost_usd": 0.0,
        "baseline_cost_usd": float(expected_baseline),
        "client": None,
        "error": None,
        "request_text": None,
        "response_text": None,
        "check_result": None,  # the request asked for no structure
        "escalated_for": None,
        "endpoint": "chat/completions",
    }
    assert r["started_at"].endswith("Z") and r["duration_ms"] > 0
    a = await one(client, "SELECT * FROM attempts")
    assert (a["request_id"], a["n"], a["tier"], a["http_status"], a["outcome"], a["cost_usd"]) == (
        rid,
        1,
        "llama",
        200,
        "ok",
        0.0,
    )


async def test_failover_is_one_request_row_and_an_attempt_row_each(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(status=503))
    client = await make_proxy(retries={"max_fallback_retries": 2})
    resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    assert resp.status == 200
    r = await one(client, "SELECT tier, attempts, outcome FROM requests")
    assert tuple(r) == ("ollama", 3, "ok")
    got = await rows(client, "SELECT n, tier, http_status, outcome, error FROM attempts ORDER BY n")
    assert [tuple(x)[:4] for x in got] == [
        (1, "llama", 503, "http_error"),
        (2, "llama", 503, "http_error"),
        (3, "ollama", 200, "ok"),
    ]
    assert "503" in got[0]["error"]


async def test_minor_replan_and_all_failing_rows(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(retries={"max_fallback_retries": 1})
    await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers={"X-Replan": "minor"})
    for u in upstreams.values():
        u.always(Behaviour(status=500))
    resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    assert resp.status == 502
    got = await rows(client, "SELECT route, tier, status, outcome, attempts, error FROM requests ORDER BY started_at")
    assert tuple(got[0])[:5] == ("minor_replan", "llama", 200, "ok", 1)
    assert tuple(got[1])[:5] == ("default", None, 502, "error", 3)
    assert "Every tier failed" in got[1]["error"]
    assert len(await rows(client, "SELECT * FROM attempts")) == 4


async def test_bad_requests_get_rows_too(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    await client.post("/v1/chat/completions", data=b"{not json")
    await client.post("/v1/chat/completions", json={"model": "nope", **MSG})
    got = await rows(client, "SELECT status, outcome, attempts FROM requests ORDER BY status")
    assert [tuple(r) for r in got] == [(400, "error", 0), (404, "error", 0)]


async def test_stream_usage_is_recorded_whether_or_not_the_client_asked(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy()
    plain = await client.post("/v1/chat/completions", json={"model": "auto", "stream": True, **MSG})
    raw = await plain.read()
    assert b'"usage"' not in raw
    asked = await client.post(
        "/v1/chat/completions",
        json={"model": "auto", "stream": True, "stream_options": {"include_usage": True}, **MSG},
    )
    assert b'"usage":{' in await asked.read()
    got = await rows(client, "SELECT stream, prompt_tokens, completion_tokens, usage_source, ttft_ms FROM requests")
    assert len(got) == 2
    for r in got:
        assert r["stream"] == 1 and r["usage_source"] == "upstream"
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] == 8
        assert r["ttft_ms"] is not None and r["ttft_ms"] >= 0


async def test_stream_without_upstream_usage_is_estimated(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(no_usage=True, chunks=12))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json={"model": "auto", "stream": True, **MSG})
    await resp.read()
    r = await one(client, "SELECT usage_source, completion_tokens, prompt_tokens FROM requests")
    assert r["usage_source"] == "estimated"
    assert r["completion_tokens"] == 12 and r["prompt_tokens"] > 0


async def test_cancelled_stream_gets_its_row(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["kimi"].always(Behaviour(chunk_delay=0.05, chunks=40))
    client = await make_proxy(tiers=tier_config(upstreams, kimi=KIMI_FLAT))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            client.make_url("/v1/chat/completions"),
            json={"model": "kimi", "stream": True, **MSG},
        )
        await resp.content.readany()
        resp.close()
    for _ in range(50):
        if upstreams["kimi"].stats.active == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    r = await one(client, "SELECT tier, outcome, status, usage_source, cost_usd FROM requests")
    assert tuple(r) == ("kimi", "client_cancelled", 499, "estimated", 0.0008)
    a = await one(client, "SELECT outcome FROM attempts")
    assert a["outcome"] == "cancelled"


async def test_nine_llama_one_kimi_report_matches_original_design(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    for u in upstreams.values():
        u.always(Behaviour(no_usage=True))
    client = await make_proxy(tiers=tier_config(upstreams, kimi=KIMI_FLAT))
    for _ in range(9):
        assert (await client.post("/v1/chat/completions", json={"model": "auto", **MSG})).status == 200
    await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers={"X-Complexity": "complex"})
    await rows(client, "SELECT 1")  # flush
    report = await (await client.get("/proxy/report?since=24h")).json()
    assert report["calls"] == {"llama": 9, "kimi": 1}
    assert report["cost_usd"] == 0.0008
    assert report["savings_usd"] == 0.0072
    assert report["free_call_pct"] == 90.0
    # the CLI's JSON is the same report, and a hand-written SQL sum agrees with both
    ledger = client.app[STATE].ledger
    assert ledger is not None
    code, text = await report_text(ledger.store.location, "24h", as_json=True)
    assert code == 0
    cli = json.loads(text)
    for key in ("calls", "cost_usd", "savings_usd", "free_call_pct"):
        assert cli[key] == report[key]
    sql = await one(
        client,
        "SELECT sum(cost_nano_usd) AS cost, sum(CASE WHEN paid = 0 THEN baseline_nano_usd - cost_nano_usd END) AS saved"
        " FROM requests",
    )
    assert (sql["cost"], sql["saved"]) == (800_000, 7_200_000)


async def test_budget_runs_out_mid_day_and_holds_across_restart(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["kimi"].always(Behaviour(no_usage=True))
    tiers = tier_config(upstreams, kimi=KIMI_FLAT)
    budgets = {"daily_usd": 0.002}
    client = await make_proxy(tiers=tiers, budgets=budgets)
    seen = []
    for _ in range(4):
        resp = await client.post(
            "/v1/chat/completions", json={"model": "auto", **MSG}, headers={"X-Complexity": "complex"}
        )
        seen.append(
            (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"], resp.headers["X-Proxy-Budget-Remaining"])
        )
    assert seen == [
        ("kimi", "complex", "0.001200"),
        ("kimi", "complex", "0.000400"),
        ("kimi", "complex", "0.000000"),
        ("llama", "budget", "0.000000"),
    ]
    report = await (await client.get("/proxy/report")).json()
    assert report["budget"]["paid_allowed"] is False
    assert report["budget"]["windows"][0]["exhausted"] is True
    pinned = await client.post("/v1/chat/completions", json={"model": "kimi", **MSG})
    assert pinned.status == 429 and "Retry-After" in pinned.headers
    await client.close()

    # a restart reads the day's spend back from the ledger
    again = await make_proxy(tiers=tiers, budgets=budgets)
    resp = await again.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers={"X-Complexity": "complex"})
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("llama", "budget")
    assert upstreams["kimi"].hits == 3


async def test_locked_database_spills_then_imports_on_restart(
    aiohttp_client: Any, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    config = make_config({"tiers": tier_config(upstreams), "ledger": {"path": str(db), "busy_timeout_ms": 20}})
    client = await aiohttp_client(create_app(config))
    await rows(client, "SELECT 1")  # created and migrated
    blocker = sqlite3.connect(db, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(20):
            assert (await client.post("/v1/chat/completions", json={"model": "auto", **MSG})).status == 200
        ledger = client.app[STATE].ledger
        assert ledger is not None
        for _ in range(200):
            if ledger.stats.spilled == 20:
                break
            await asyncio.sleep(0.05)
        assert ledger.stats.spilled == 20, ledger.stats
    finally:
        blocker.rollback()
        blocker.close()
    await client.close()
    assert (tmp_path / "ledger.db.spill.jsonl").exists()

    client = await aiohttp_client(create_app(config))
    assert len(await rows(client, "SELECT id FROM requests")) == 20
    assert len(await rows(client, "SELECT * FROM attempts")) == 20
    report = await (await client.get("/proxy/report")).json()
    assert report["ledger"]["imported"] == 20
    assert not (tmp_path / "ledger.db.spill.jsonl").exists()


async def test_load_rows_equal_requests_and_attempts_equal_upstream_hits(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].settings.failure_rate = 0.3
    upstreams["llama"].settings.seed = 7
    for u in upstreams.values():
        u.settings.record_requests = False
    client = await make_proxy(retries={"max_fallback_retries": 2})
    n = 2000
    sem = asyncio.Semaphore(200)

    async def call(i: int) -> int:
        async with sem:
            body = {"model": "auto", "stream": i % 3 == 0, **MSG}
            resp = await client.post("/v1/chat/completions", json=body)
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(call(i) for i in range(n)))
    assert statuses.count(200) == n
    assert (await one(client, "SELECT count(*) AS n FROM requests"))["n"] == n
    upstream_hits = sum(u.hits for u in upstreams.values())
    assert (await one(client, "SELECT count(*) AS n FROM attempts"))["n"] == upstream_hits
    assert upstream_hits > n  # failures made retries happen


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Bind-mount `path` over itself read-only (root only): writes fail even for root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a file read-only for root")
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


async def test_read_only_database_spills_then_imports(
    aiohttp_client: Any, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    config = make_config({"tiers": tier_config(upstreams), "ledger": {"path": str(db), "busy_timeout_ms": 20}})
    client = await aiohttp_client(create_app(config))
    await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    await client.close()  # one row written, file closed and checkpointed

    with read_only(db):
        client = await aiohttp_client(create_app(config))
        for _ in range(10):
            assert (await client.post("/v1/chat/completions", json={"model": "auto", **MSG})).status == 200
        await client.close()
        ledger = client.app[STATE].ledger
        assert ledger is not None
        assert (ledger.stats.written, ledger.stats.spilled, ledger.stats.failed) == (0, 10, 0)

    client = await aiohttp_client(create_app(config))
    assert len(await rows(client, "SELECT id FROM requests")) == 11
    report = await (await client.get("/proxy/report")).json()
    assert report["ledger"]["imported"] == 10


@pytest.mark.parametrize("required", [True, False], ids=["proxy-serve", "library"])
async def test_a_ledger_that_is_not_a_database(
    aiohttp_client: Any, upstreams: dict[str, Upstream], tmp_path: Path, required: bool
) -> None:
    """`proxy serve` (require_ledger) does not start over it: budgets would count from $0. Embedded
    (the default), the app serves and spills, as it always did."""
    db = tmp_path / "ledger.db"
    db.write_bytes(b"not a ledger\n" * 500)
    raw = {"tiers": tier_config(upstreams), "ledger": {"path": str(db)}, "budgets": {"daily_usd": 1}}
    app = create_app(make_config(raw), require_ledger=required)
    if required:
        with pytest.raises(LedgerUnavailable, match=f"the ledger {db} cannot be opened: file is not a database"):
            await aiohttp_client(app)
        return
    client = await aiohttp_client(app)
    assert (await client.post("/v1/chat/completions", json={"model": "auto", **MSG})).status == 200
    await client.close()
    assert spill_path(db).exists() and db.read_bytes() == b"not a ledger\n" * 500
