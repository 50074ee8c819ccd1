"""`proxy report`: the cost report as a table or JSON, with the exit code the command returns."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal

import orjson

from proxy.config import Config
from proxy.ledger.engine import store_for
from proxy.ledger.postgres import PostgresStore
from proxy.ledger.pricing import round_micro
from proxy.ledger.report import Report, parse_since
from proxy.ledger.report_read import build_report
from proxy.ledger.report_source import Target, source_for


def _usd(d: Decimal) -> str:
    return f"${round_micro(d):f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


_COLUMNS = (
    "tier",
    "paid",
    "calls",
    "fallback",
    "attempts",
    "failed",
    "p50 ms",
    "p95 ms",
    "ttft p50",
    "ttft p95",
    "prompt tok",
    "compl tok",
    "cost",
)


_QUALITY_COLUMNS = ("tier", "checked", "bad", "bad %", "bad cost", "escalated", "for bad answers")
_ENDPOINT_COLUMNS = ("endpoint", "calls", "errors", "cancelled", "prompt tok", "compl tok", "cost")


def _table(rows: Iterable[Sequence[str]], columns: Sequence[str] = _COLUMNS) -> list[str]:
    rows = [columns, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def render_table(report: Report) -> str:
    window = "all time" if report.window_start is None else f"since {report.window_start}"
    free = "-" if report.free_call_pct is None else f"{report.free_call_pct:.1f}%"
    lines = [
        f"Cost report, {report.since} ({window})",
        f"Requests: {report.requests}  answered: {report.answered}  errors: {report.errors}  "
        f"client cancelled: {report.client_cancelled}",
        f"Paid cost: {_usd(report.cost_usd)}  Estimated savings: {_usd(report.savings_usd)}  Free calls: {free}",
        _quality_line(report),
        "",
    ]
    if not report.tiers:
        return "\n".join([*lines, "No requests in this window."])
    rows = [
        (
            t.tier,
            "yes" if t.paid else "no",
            str(t.calls),
            _pct(t.fallback_rate),
            str(t.attempts),
            str(t.failures),
            _ms(t.latency_p50_ms),
            _ms(t.latency_p95_ms),
            _ms(t.ttft_p50_ms),
            _ms(t.ttft_p95_ms),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            _usd(t.cost_usd),
        )
        for t in report.tiers
    ]
    return "\n".join([*lines, *_table(rows), *_quality_table(report), *_endpoint_table(report)])


def _endpoint_table(report: Report) -> list[str]:
    """Requests per OpenAI endpoint (the path under /v1), whichever tier answered them."""
    if not report.endpoints:
        return []
    rows = [
        (
            e.endpoint,
            str(e.calls),
            str(e.errors),
            str(e.client_cancelled),
            str(e.prompt_tokens),
            str(e.completion_tokens),
            _usd(e.cost_usd),
        )
        for e in report.endpoints
    ]
    return ["", "Requests by endpoint (/v1/...)", *_table(rows, _ENDPOINT_COLUMNS)]


def _quality_line(report: Report) -> str:
    passed = "-" if report.answers_passed_pct is None else f"{report.answers_passed_pct:.1f}%"
    return (
        f"Checked answers: {report.answers_checked}  passed: {report.answers_passed} ({passed})  "
        f"bad answers: {report.bad_answers} costing {_usd(report.bad_answer_cost_usd)}  "
        f"escalated: {report.escalated} ({report.escalated_bad_answers} for bad answers)"
    )


def _quality_table(report: Report) -> list[str]:
    """Plan quality by tier: what share of its checked answers was bad, and what that cost."""
    shown = [t for t in report.tiers if t.checked or t.bad_answers or t.escalated]
    if not shown:
        return []
    rows = [
        (
            t.tier,
            str(t.checked),
            str(t.bad_answers),
            _pct(t.bad_answer_rate),
            _usd(t.bad_answer_cost_usd),
            str(t.escalated),
            str(t.escalated_bad_answers),
        )
        for t in shown
    ]
    title = "Answer quality by tier (escalated: calls the tier answered after the primary's breaker opened)"
    return ["", title, *_table(rows, _QUALITY_COLUMNS)]


async def report_text(db: Target | Config, since: str, as_json: bool, *, now: float | None = None) -> tuple[int, str]:
    """`report_main` for callers already inside an event loop."""
    try:
        parse_since(since, time.time())
    except ValueError as e:
        return 2, str(e)
    # The config's own ledger: its file, or its PostgreSQL with `ledger.password_env`.
    target = store_for(db) if isinstance(db, Config) else db
    try:
        report = await build_report(target, since, now=now)
    except FileNotFoundError as e:
        return 1, str(e)
    except (sqlite3.Error, OSError) as e:
        return 1, f"cannot read ledger {source_for(target).location}: {e}"
    finally:
        if isinstance(target, PostgresStore):
            await target.close()
    if as_json:
        return 0, orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode()
    return 0, render_table(report)


def report_main(db: str | Config, since: str, as_json: bool) -> tuple[int, str]:
    """`proxy report`: (exit code, text). 2 for a bad --since, 1 when the ledger cannot be read.
    `db`: `--db` (a file or a postgresql:// URL), else the config (`ledger.url` or `ledger.path`)."""
    return asyncio.run(report_text(db, since, as_json))
