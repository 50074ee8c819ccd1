"""The economics run's figures from the proxy's ledger: plain SQL on the SQLite file.

Money is summed in the exact integer columns (nano-dollars). `baseline_nano_usd` is what the
baseline paid tier (Kimi) would have charged for each request's tokens (docs/ledger.md), so
`1 - cost / baseline` is the saving against sending every call to Kimi.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

TOTALS = """
SELECT count(*),
       coalesce(sum(paid = 1), 0),
       coalesce(sum(outcome = 'ok'), 0),
       coalesce(sum(cost_nano_usd), 0),
       coalesce(sum(baseline_nano_usd), 0),
       coalesce(sum(attempts), 0)
FROM requests
"""
# Requests that spent money: at least one attempt on a paid tier (a bad Kimi answer followed by
# a good free one still cost a Kimi call).
PAID_ATTEMPTED = "SELECT count(DISTINCT request_id) FROM attempts WHERE tier IN ({tiers})"
ROUTES = "SELECT route, count(*), coalesce(sum(paid = 1), 0) FROM requests GROUP BY route ORDER BY count(*) DESC"
ANSWERED_BY = "SELECT coalesce(tier, 'none'), count(*) FROM requests GROUP BY tier ORDER BY count(*) DESC"
ATTEMPTS = """
SELECT tier, count(*), coalesce(sum(outcome = 'ok'), 0), coalesce(sum(outcome = 'invalid_output'), 0),
       coalesce(sum(cost_nano_usd), 0)
FROM attempts GROUP BY tier ORDER BY tier
"""


def figures(db: Path, paid_tiers: tuple[str, ...]) -> dict[str, Any]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        n, paid, ok, cost, baseline, attempts = conn.execute(TOTALS).fetchone()
        marks = ", ".join("?" for _ in paid_tiers)
        paid_attempted = conn.execute(PAID_ATTEMPTED.format(tiers=marks), paid_tiers).fetchone()[0]
        routes = {r: {"calls": c, "paid": p} for r, c, p in conn.execute(ROUTES)}
        answered = dict(conn.execute(ANSWERED_BY).fetchall())
        per_tier = {
            t: {
                "attempts": a,
                "ok": good,
                "invalid_output": bad,
                "bad_share_of_answers": bad / (good + bad) if good + bad else None,
                "cost_usd": c / 1e9,
            }
            for t, a, good, bad, c in conn.execute(ATTEMPTS)
        }
        columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        checks = None
        if "check_result" in columns:  # added by a later migration; reported when there
            q = "SELECT coalesce(check_result, 'none'), count(*) FROM requests GROUP BY 1 ORDER BY 2 DESC"
            checks = dict(conn.execute(q).fetchall())
    return {
        "requests": n,
        "ok": ok,
        "attempts": attempts,
        "attempts_per_request": attempts / n if n else None,
        "answered_paid": paid,
        "paid_share": paid / n if n else None,  # answered by a paid tier
        "paid_attempted": paid_attempted,
        "paid_attempted_share": paid_attempted / n if n else None,  # spent money on a paid tier at all
        "cost_usd": cost / 1e9,
        "baseline_usd": baseline / 1e9,
        "saved_share": 1 - cost / baseline if baseline else None,
        "routes": routes,
        "answered_by": answered,
        "attempts_by_tier": per_tier,
        "check_result": checks,
    }
