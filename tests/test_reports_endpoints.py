"""The reports split by endpoint: requests, errors, tokens and cost per OpenAI endpoint, from
`build_report`, `proxy report` (text and JSON) and `GET /proxy/report`: on the hand-made set of
tests/support/endpoints.py, and on real requests to the four endpoints through the running app."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.cli import main
from proxy.gateway.state import STATE
from proxy.ledger import Ledger, open_db
from proxy.ledger.report import EndpointReport
from proxy.ledger.report_read import build_report
from proxy.ledger.report_text import report_text
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.endpoints import EXPECTED_ALL, EXPECTED_WINDOW, TOTAL_COST, endpoint_calls, endpoint_config
from tests.support.quality import KIMI_PRICE
from tests.test_endpoints import sdk
from tests.test_openapi import check

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()
# 24h at noon: `second` (yesterday evening) is read from raw rows, `first` and `late` from the rollup
FIRST, SECOND, LATE, OLD = NOW - 3 * 3600, NOW - 18 * 3600, NOW - 1800, NOW - 3 * 86400


async def _ledger(db: Path) -> None:
    ledger = Ledger(endpoint_config(batch_size=4), db)
    await ledger.start()
    for r in endpoint_calls(FIRST, SECOND, LATE, OLD):
        ledger.submit(r)
    await ledger.close()


def _json(e: EndpointReport) -> dict[str, Any]:
    return {
        "endpoint": e.endpoint,
        "calls": e.calls,
        "errors": e.errors,
        "client_cancelled": e.client_cancelled,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "cached_tokens": e.cached_tokens,
        "cost_usd": float(e.cost_usd),  # each of these is a whole number of micro-dollars
        "exact": {"cost_usd": str(e.cost_usd)},
    }


async def test_the_split_over_windows(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    day = await build_report(db, "24h", now=NOW)
    assert day.endpoints == EXPECTED_WINDOW
    # the split adds up to the report's own totals
    assert sum(e.calls for e in day.endpoints) == day.requests == 11
    assert sum(e.errors for e in day.endpoints) == day.errors == 1
    assert sum(e.client_cancelled for e in day.endpoints) == day.client_cancelled == 1
    assert sum((e.cost_usd for e in day.endpoints), Decimal(0)) == day.cost_usd == TOTAL_COST
    assert (await build_report(db, "all", now=NOW)).endpoints == EXPECTED_ALL
    # only endpoints with calls in the window: the last 2 hours hold chat-4 alone
    assert (await build_report(db, "2h", now=NOW)).endpoints == (
        EndpointReport("chat/completions", 1, 0, 0, 7, 3, 0, Decimal(0)),
    )
    # a window starting at midnight reads the rollup alone: today's part of the set
    today = await build_report(db, "12h", now=NOW)
    assert [(e.endpoint, e.calls, e.prompt_tokens) for e in today.endpoints] == [
        ("chat/completions", 3, 1107),
        ("completions", 1, 40),
        ("embeddings", 1, 12),
        ("responses", 1, 300),
    ]


async def test_the_split_needs_no_raw_rows_for_whole_days(tmp_path: Path) -> None:
    """Whole days come from daily_endpoints: with the raw rows gone, `all` still has them all."""
    db = tmp_path / "ledger.db"
    await _ledger(db)
    conn = await open_db(db)
    await conn.execute("DELETE FROM attempts")
    await conn.execute("DELETE FROM requests")
    await conn.close()
    assert (await build_report(db, "all", now=NOW)).endpoints == EXPECTED_ALL


async def test_proxy_report_text(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    code, text = await report_text(db, "24h", False, now=NOW)
    assert code == 0
    assert text.splitlines()[-7:] == [
        "",
        "Requests by endpoint (/v1/...)",
        "endpoint          calls  errors  cancelled  prompt tok  compl tok       cost",
        "chat/completions      4       1          0        1107        223  $0.000920",
        "responses             3       0          1         800        150  $0.000550",
        "completions           2       0          0         240        110  $0.000370",
        "embeddings            2       0          0        2012          0  $0.001200",
    ]


async def test_proxy_report_json(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    code, text = await report_text(db, "24h", True, now=NOW)
    assert code == 0
    doc = json.loads(text)
    assert doc["endpoints"] == [_json(e) for e in EXPECTED_WINDOW]
    assert list(doc["endpoints"][0]) == [
        "endpoint",
        "calls",
        "errors",
        "client_cancelled",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
        "exact",
    ]


def test_the_proxy_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.db"
    asyncio.run(_ledger(db))
    assert main(["report", "--db", str(db), "--since", "all"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("Requests by endpoint (/v1/...)")
    assert out[at + 2 : at + 6] == [
        "chat/completions      4       1          0        1107        223  $0.000920",
        "embeddings            3       0          0        2017          0  $0.001200",
        "responses             3       0          1         800        150  $0.000550",
        "completions           2       0          0         240        110  $0.000370",
    ]
    assert main(["report", "--db", str(db), "--since", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["endpoints"] == [_json(e) for e in EXPECTED_ALL]


async def test_an_empty_window_has_no_split(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    code, text = await report_text(db, "1h", True, now=NOW + 86400)
    assert code == 0 and json.loads(text)["endpoints"] == []
    code, text = await report_text(db, "1h", False, now=NOW + 86400)
    assert "No requests in this window." in text and "by endpoint" not in text


# ---------------------------------------------------------------------------- through the running proxy


def _kimi_cost(prompt: int, completion: int) -> Decimal:
    return (prompt * Decimal("0.60") + completion * Decimal("2.50")) / 1_000_000


class _Seen:
    """What the client saw, per endpoint: calls, errors, tokens, and the cost at kimi's price."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, Any]] = {}  # exact: the cost as a Decimal

    def add(self, endpoint: str, prompt: int, completion: int, *, paid: bool, error: bool = False) -> None:
        s = self.by.setdefault(endpoint, {"calls": 0, "errors": 0, "prompt": 0, "completion": 0, "cost": Decimal(0)})
        s["calls"] += 1
        s["errors"] += error
        s["prompt"] += prompt
        s["completion"] += completion
        if paid:
            s["cost"] += _kimi_cost(prompt, completion)

    def expected(self) -> list[dict[str, Any]]:
        order = sorted(self.by.items(), key=lambda kv: (-kv[1]["calls"], kv[0]))
        return [
            {
                "endpoint": name,
                "calls": s["calls"],
                "errors": s["errors"],
                "client_cancelled": 0,
                "prompt_tokens": s["prompt"],
                "completion_tokens": s["completion"],
                "cached_tokens": 0,
                "cost_usd": float(round(s["cost"], 6)),
                "exact": s["cost"],
            }
            for name, s in order
        ]


async def _call_every_endpoint(api: openai.AsyncOpenAI, seen: _Seen) -> None:
    """Eight requests: each endpoint answered by a free tier and by kimi (pinned), one stream each
    for chat and responses."""
    messages: Any = [{"role": "user", "content": "plan the week"}]

    def h(rid: str, kimi: bool = False) -> dict[str, str]:
        return {"X-Request-Id": rid, **({"X-Tier": "kimi"} if kimi else {})}

    chat = await api.chat.completions.create(model="auto", messages=messages, extra_headers=h("chat-free"))
    assert chat.usage is not None
    seen.add("chat/completions", chat.usage.prompt_tokens, chat.usage.completion_tokens, paid=False)
    usage = None
    async for chunk in await api.chat.completions.create(
        model="auto",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=h("chat-kimi", kimi=True),
    ):
        usage = chunk.usage or usage
    assert usage is not None
    seen.add("chat/completions", usage.prompt_tokens, usage.completion_tokens, paid=True)

    resp = await api.responses.create(model="auto", input="plan", extra_headers=h("resp-kimi", kimi=True))
    assert resp.usage is not None
    seen.add("responses", resp.usage.input_tokens, resp.usage.output_tokens, paid=True)
    async with api.responses.stream(model="auto", input="plan it", extra_headers=h("resp-free")) as stream:
        final = await stream.get_final_response()
    assert final.usage is not None
    seen.add("responses", final.usage.input_tokens, final.usage.output_tokens, paid=False)

    for rid, kimi in (("comp-free", False), ("comp-kimi", True)):
        comp = await api.completions.create(model="auto", prompt="Say hello", extra_headers=h(rid, kimi))
        assert comp.usage is not None
        seen.add("completions", comp.usage.prompt_tokens, comp.usage.completion_tokens, paid=kimi)
    for rid, kimi in (("emb-free", False), ("emb-kimi", True)):
        emb = await api.embeddings.create(model="auto", input=["a", "bb"], extra_headers=h(rid, kimi))
        seen.add("embeddings", emb.usage.prompt_tokens, 0, paid=kimi)


async def test_http_report_splits_requests_to_the_four_endpoints(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    client = await make_proxy(tiers=tier_config(upstreams, kimi={"price": KIMI_PRICE}))
    api, seen = sdk(client), _Seen()
    await _call_every_endpoint(api, seen)
    # and one that no tier answers
    for u in upstreams.values():
        u.always(Behaviour(status=503))
    with pytest.raises(openai.APIStatusError):
        await api.responses.create(model="auto", input="x", extra_headers={"X-Request-Id": "resp-failed"})
    seen.add("responses", 0, 0, paid=False, error=True)

    resp = await client.get("/proxy/report", params={"since": "24h"})
    assert resp.status == 200
    doc = check(resp, await resp.read(), "/proxy/report", "get")  # as proxy/openapi.yaml documents it
    got = [{**e, "exact": Decimal(e["exact"]["cost_usd"])} for e in doc["endpoints"]]
    assert got == seen.expected()
    assert [e["calls"] for e in doc["endpoints"]] == [3, 2, 2, 2]  # responses first, then by name
    assert sum(Decimal(e["exact"]["cost_usd"]) for e in doc["endpoints"]) == Decimal(doc["exact"]["cost_usd"]) > 0
    # each row says where it came from, and `proxy report --json` reads the same split
    ledger = client.app[STATE].ledger
    assert ledger is not None
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        by_id = dict(conn.execute("SELECT id, endpoint FROM requests").fetchall())
    assert by_id == {
        "chat-free": "chat/completions",
        "chat-kimi": "chat/completions",
        "resp-kimi": "responses",
        "resp-free": "responses",
        "resp-failed": "responses",
        "comp-free": "completions",
        "comp-kimi": "completions",
        "emb-free": "embeddings",
        "emb-kimi": "embeddings",
    }
    code, text = await report_text(ledger.store.location, "24h", True)
    assert code == 0 and json.loads(text)["endpoints"] == doc["endpoints"]
