"""Plan quality by tier in the reports: the share of checked answers that were bad, what they
cost, the calls escalated because of them, and the share of answers clients got that passed;
from `build_report`, `proxy report` (text and JSON) and `GET /proxy/report`, on the hand-made
day of tests/support/quality.py."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.gateway.state import STATE
from proxy.ledger import Ledger
from proxy.ledger.report import Report
from proxy.ledger.report_read import build_report
from proxy.ledger.report_text import report_text
from proxy.records import AttemptOutcome, CallRecord
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.quality import (
    BAD,
    EXPECTED_TIERS,
    EXPECTED_TOTALS,
    KIMI_PRICE,
    quality_calls,
    quality_config,
)
from tests.support.records import attempt, call
from tests.test_openapi import check

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()
TODAY, YESTERDAY = NOW - 3 * 3600, NOW - 18 * 3600  # 24h at noon: yesterday's part is read raw


def _old_bad_call() -> CallRecord:
    """Three days back, outside 24h: one more bad llama answer, then a good one."""
    at = NOW - 3 * 86400
    bad = attempt(1, "llama", AttemptOutcome.INVALID_OUTPUT, started_at=at, error=BAD, checked=True)
    return call("old", "llama", at=at, attempts=[bad, attempt(2, "llama", started_at=at, checked=True)])


async def _ledger(db: Path) -> None:
    ledger = Ledger(quality_config(batch_size=5), db)
    await ledger.start()
    for r in [*quality_calls(TODAY, YESTERDAY), _old_bad_call()]:
        ledger.submit(r)
    await ledger.close()


def _figures(report: Report) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    totals = {k: getattr(report, k) for k in EXPECTED_TOTALS}
    tiers = {t.tier: {k: getattr(t, k) for k in EXPECTED_TIERS["llama"]} for t in report.tiers}
    return totals, tiers


async def test_report_figures_on_a_hand_made_day(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    assert _figures(await build_report(db, "24h", now=NOW)) == (EXPECTED_TOTALS, EXPECTED_TIERS)
    # all: the older call adds two checked llama attempts (one bad) and an answer with no check result
    everything = await build_report(db, "all", now=NOW)
    totals, tiers = _figures(everything)
    assert totals == {**EXPECTED_TOTALS, "requests": 17, "answered": 17, "bad_answers": 9}
    assert tiers["llama"] == {
        **EXPECTED_TIERS["llama"],
        "attempts": 17,
        "failures": 7,
        "checked": 13,
        "bad_answers": 6,
        "bad_answer_rate": 0.4615,
        "calls": 10,
    }


async def test_proxy_report_text(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    code, text = await report_text(db, "24h", False, now=NOW)
    assert code == 0
    lines = text.splitlines()
    assert lines[3] == (
        "Checked answers: 12  passed: 11 (91.7%)  bad answers: 8 costing $0.001970  escalated: 3 (2 for bad answers)"
    )
    at = lines.index("Answer quality by tier (escalated: calls the tier answered after the primary's breaker opened)")
    assert lines[at : at + 5] == [
        "Answer quality by tier (escalated: calls the tier answered after the primary's breaker opened)",
        "tier    checked  bad  bad %   bad cost  escalated  for bad answers",
        "llama        11    5  45.5%  $0.000000          0                0",
        "kimi          5    2  40.0%  $0.001970          3                2",
        "ollama        3    1  33.3%  $0.000000          0                0",
    ]


async def test_proxy_report_json(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await _ledger(db)
    code, text = await report_text(db, "24h", True, now=NOW)
    doc = json.loads(text)
    assert code == 0
    assert _json_figures(doc) == _expected_json()


def test_the_proxy_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`proxy report --since all`, as a table and as JSON (the older call included)."""
    db = tmp_path / "ledger.db"
    asyncio.run(_ledger(db))
    assert main(["report", "--db", str(db), "--since", "all"]) == 0
    out = capsys.readouterr().out
    assert "Checked answers: 12  passed: 11 (91.7%)  bad answers: 9 costing $0.001970" in out
    assert "llama        13    6  46.2%  $0.000000          0                0" in out
    assert main(["report", "--db", str(db), "--since", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["answers_checked"], doc["answers_passed_pct"], doc["bad_answers"]) == (12, 91.67, 9)


def _json_figures(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    totals = {k: doc[k] for k in EXPECTED_TOTALS}
    tiers = {t["tier"]: {k: t[k] for k in EXPECTED_TIERS["llama"]} for t in doc["tiers"]}
    exact = (doc["exact"]["bad_answer_cost_usd"], {t["tier"]: t["exact"]["bad_answer_cost_usd"] for t in doc["tiers"]})
    assert exact == ("0.00197", {"llama": "0", "ollama": "0", "kimi": "0.00197"})
    return totals, tiers


def _expected_json() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Money as JSON numbers (rounded to the micro-dollar), everything else as in the Report."""

    def plain(d: dict[str, Any]) -> dict[str, Any]:
        return {k: float(v) if isinstance(v, Decimal) else v for k, v in d.items()}

    return plain(EXPECTED_TOTALS), {t: plain(f) for t, f in EXPECTED_TIERS.items()}


async def test_http_report(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    """GET /proxy/report over the same day, written through the running proxy's own ledger."""
    client = await make_proxy(tiers=tier_config(upstreams, kimi={"price": KIMI_PRICE}))
    ledger = client.app[STATE].ledger
    assert ledger is not None
    now = time.time()
    for r in quality_calls(now - 600, now - 300):
        ledger.submit(r)
    resp = await client.get("/proxy/report", params={"since": "24h"})
    assert resp.status == 200
    doc = check(resp, await resp.read(), "/proxy/report", "get")  # as proxy/openapi.yaml documents it
    assert _json_figures(doc) == _expected_json()
    # the same JSON as `proxy report --json`
    code, text = await report_text(ledger.store.location, "24h", True)
    cli = json.loads(text)
    assert code == 0 and _json_figures(cli) == _json_figures(doc)
