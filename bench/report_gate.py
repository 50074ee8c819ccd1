"""The quality gate's part of BENCHMARKS.md: what the gate costs (from `python -m bench`'s results)
and the original design's economics (from `python -m bench.economics`'s results file)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ECONOMICS = Path(__file__).resolve().parent / "results" / "economics.json"
TARGETS = {"usable": 0.999, "paid": 0.10, "saved": 0.90}  # the economics run, gate on
UNCHECKED_SHARE = 0.01  # "nothing measurable": under 1% of the proxy's CPU per request
CHECKED_US = 50.0


def _check(name: str, value: str, target: str, ok: bool | None) -> dict[str, Any]:
    return {"check": name, "value": value, "target": target, "pass": ok}


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    gate = results.get("gate_cost")
    if not gate:
        return []
    micro, e2e = gate["micro"], gate["e2e"]
    cpu_us = e2e["unchecked_cpu_us"]
    share = micro["unchecked_us"] / cpu_us if cpu_us else math.nan
    rounds = e2e["added_cpu_us_rounds"]
    spread = f"rounds {min(rounds):.0f} to {max(rounds):.0f} us" if rounds else "no rounds"
    return [
        _check(
            "quality gate, request with no check (in-process)",
            f"{micro['unchecked_us']:.2f} us = {share:.2%} of the proxy's {cpu_us:.0f} us CPU per request",
            f"< {UNCHECKED_SHARE:.0%} (nothing measurable)",
            share < UNCHECKED_SHARE,
        ),
        _check(
            "quality gate, checked 2 KB JSON + schema (in-process)",
            f"{micro['checked_2kb_schema_us']:.1f} us CPU",
            f"<= {CHECKED_US:g} us",
            micro["checked_2kb_schema_us"] <= CHECKED_US,
        ),
        _check(
            "quality gate, checked 2 KB JSON + schema (proxy CPU/request, checked - unchecked)",
            f"{e2e['added_cpu_us']:.1f} us = {e2e['added_cpu_us'] / cpu_us:.1%} of the request "
            f"(median of {len(rounds)} rounds; {spread})",
            f"<= {CHECKED_US:g} us",
            e2e["added_cpu_us"] <= CHECKED_US,
        ),
    ]


def gate_section(results: dict[str, Any]) -> str:
    gate = results.get("gate_cost")
    if not gate:
        return ""
    m, e = gate["micro"], gate["e2e"]
    head = e.get("check_header", {})
    share = e["added_cpu_us"] / e["unchecked_cpu_us"] if e["unchecked_cpu_us"] else math.nan
    cases = (
        ("no check asked (X-Proxy-Check looked up, `check_for` finds nothing), in-process", m["unchecked_us"], 2),
        ("json_schema request with `X-Proxy-Check: off`, in-process", m["off_us"], 2),
        (
            f"checked {m['answer_bytes']:,} B JSON plan + schema (`check_for` + `judge`), in-process",
            m["checked_2kb_schema_us"],
            1,
        ),
        (
            f"the same answer as a held stream ({m['stream_bytes']:,} B of SSE, assembled, then judged), in-process",
            m["checked_2kb_schema_stream_us"],
            1,
        ),
        (f"`proxy serve`, that request checked (`X-Proxy-Check: {head.get('checked')}`)", e["checked_cpu_us"], 0),
        (
            f"`proxy serve`, the same with `X-Proxy-Check: off` (answer header: {head.get('unchecked') or 'none'})",
            e["unchecked_cpu_us"],
            0,
        ),
    )
    rows = "\n".join(f"| {label} | {value:,.{digits}f} us |" for label, value, digits in cases)
    return f"""## What the quality gate costs

| case | CPU per request |
|---|---|
{rows}
| **added by the check through the proxy** (median of paired rounds) | **{e["added_cpu_us"]:.1f} us** |

In-process: `QualityGate.check_for` + `Check.judge` (bench/gatecost.py), blocks of
{m["reps"]:,} calls (a tenth of that for the checked cases), the cases interleaved block by block,
CPU time of the thread, median block. Through the proxy: the bench's `proxy serve` and an
identical second one, both on the proxy core, each sent {e["rate"]:g} requests/s by its own wrk
({e["connections"]} connections) at the same time, one the checked request and the other the same
request with `X-Proxy-Check: off`, against the `plan2k` tier (nginx returning a canned completion
whose content is the plan); they swap roles every round, {e["rounds"]} rounds of {e["seconds"]:g} s. CPU of
each process from /proc per request; checked - unchecked per round:
{", ".join(f"{d:.0f}" for d in e["added_cpu_us_rounds"])} us ({share:.1%} of the unchecked request's CPU at the median).
"""


def spread(runs: list[dict[str, Any]], gate: str) -> dict[str, dict[str, float]]:
    picks = {
        "usable": [r[gate]["client"]["usable"] for r in runs],
        "paid": [r[gate]["ledger"]["paid_attempted_share"] for r in runs],
        "paid_answered": [r[gate]["ledger"]["paid_share"] for r in runs],
        "saved": [r[gate]["ledger"]["saved_share"] for r in runs],
    }
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in picks.items()}


def economics_checks(econ: dict[str, Any]) -> list[dict[str, Any]]:
    """The three targets, held by the worst run with the gate on."""
    s, t = econ["spread"]["gate_on"], TARGETS
    u, p, v = s["usable"]["min"], s["paid"]["max"], s["saved"]["min"]
    of = f"worst of {len(econ['runs'])} run(s)"
    return [
        _check(f"usable answers received ({of})", f"{u:.3%}", f">= {t['usable']:.1%}", u >= t["usable"]),
        _check(f"calls that paid ({of})", f"{p:.2%}", f"<= {t['paid']:.0%}", p <= t["paid"]),
        _check(f"saved against all-Kimi ({of})", f"{v:.2%}", f">= {t['saved']:.0%}", v >= t["saved"]),
    ]


def economics_text(econ: dict[str, Any]) -> str:
    head = ("run", "seed", "gate", "calls", "usable", "paid", "saved", "escalated", "calls/s")
    lines = ["{:>4} {:>5}  {:4} {:>6} {:>9} {:>7} {:>7} {:>9} {:>7}".format(*head)]
    for i, r in enumerate(econ["runs"]):
        for g in ("on", "off"):
            c, led = r[f"gate_{g}"]["client"], r[f"gate_{g}"]["ledger"]
            esc = led["routes"].get("escalated", {}).get("calls", 0)
            lines.append(
                f"{i + 1:>4} {r['seed']:>5}  {g:4} {c['calls']:>6} {c['usable']:>9.3%} "
                f"{led['paid_attempted_share']:>7.2%} {led['saved_share']:>7.2%} {esc:>9} {c['rate_achieved']:>7.0f}"
            )
    m = econ["model"]["breaker"]
    lines.append(f"  the rules in-process ({m['calls']:,} calls): usable {m['usable']:.3%}, paid {m['paid']:.2%}")
    lines += [f"  [{_mark(c['pass'])}] {c['check']}: {c['value']} (target {c['target']})" for c in econ["checks"]]
    return "\n".join(lines)


def load_economics(path: Path = ECONOMICS) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v * 100:.{digits}f}%"


def economics_section(econ: dict[str, Any] | None) -> str:
    if not econ:
        return (
            "## The original design's economics\n\nNot measured yet: run `python -m bench.economics`, "
            "then `python -m bench.report`.\n"
        )
    p, runs = econ["params"], econ["runs"]
    rows = []
    for i, r in enumerate(runs):
        for g in ("on", "off"):
            c, led = r[f"gate_{g}"]["client"], r[f"gate_{g}"]["ledger"]
            esc = led["routes"].get("escalated", {}).get("calls", 0)
            rows.append(
                f"| {i + 1} (seed {r['seed']}) | {g} | {c['calls']:,} | {_pct(c['usable'], 3)} ({c['unusable']} not) "
                f"| {_pct(led['paid_attempted_share'])} | {_pct(led['saved_share'])} | {esc} "
                f"| {led['attempts_per_request']:.3f} | {c['rate_achieved']:.0f} |"
            )
    s_on, s_off = econ["spread"]["gate_on"], econ["spread"]["gate_off"]

    def span(s: dict[str, Any], key: str, digits: int = 2) -> str:
        return f"{_pct(s[key]['min'], digits)} - {_pct(s[key]['max'], digits)}"

    checks_md = "\n".join(
        f"| {c['check']} | {c['value']} | {c['target']} | **{_mark(c['pass'])}** |" for c in econ["checks"]
    )
    first = runs[0]["gate_on"]["ledger"]["attempts_by_tier"]
    seen = ", ".join(f"{t} {_pct(v['bad_share_of_answers'], 1)}" for t, v in first.items())
    mix = ", ".join(f"{k} {v:.0%}" for k, v in p["mix"].items())
    rates = ", ".join(f"{k} {v:.1%}" for k, v in p["bad_answer_rates"].items())
    per_cooldown = p["cooldown_s"] * runs[0]["gate_on"]["client"]["rate_achieved"]
    mb, mn = econ["model"]["breaker"], econ["model"]["no_breaker"]
    on_attempts = statistics.median(r["gate_on"]["ledger"]["attempts_per_request"] for r in runs)
    return f"""## The original design's economics

```sh
{econ["meta"]["command"]}
```

({econ["meta"]["date"]}.) `proxy serve` with the original `strategic_planner:` block (primary llama,
Kimi paid at its default prices, `escalate_after_failures: 3`, `max_fallback_retries: 2`,
`max_total_retries: 5`) in front of three simulated tiers whose JSON plans are bad at the original
design's rates ({rates}; half prose around the JSON, half JSON cut at max_tokens). Calls: {mix};
half streamed; half ask for JSON in the prompt with `X-Proxy-Check: json`, half with
`response_format: json_schema`. {p["planners"]} planner(s), each waiting for its answer before the next
call, at most {p["rate"]:g} calls/s; {p["requests"]:,} calls per run with the gate on, then the first
{p["off_requests"]:,} of the same calls with `quality: {{enabled: false}}`.

The original planner makes 10-100 calls a day; here the breaker cooldown ({p["real_cooldown_s"]:g} s) is
divided by {p["cooldown_factor"]:,.0f} to {p["cooldown_s"] * 1e3:.3f} ms (`routing.breaker_cooldown_seconds`), so
it spans as many calls as at {p["calls_per_day"]:g} calls a day ({per_cooldown:.3f} calls at the rate reached):
the call after a breaker opens probes the primary again, as the real planner's next call would.

Usable = what the client received was a 200 whose content is a JSON plan of the right shape and
not cut short (judged by the client itself, bench/econ_client.py). Paid = calls that made at least
one attempt on Kimi. Saved = 1 - `sum(cost_nano_usd)` / `sum(baseline_nano_usd)` over the ledger's
requests (the baseline is what Kimi would have charged for each call's tokens).

| run | gate | calls | usable | paid | saved | escalated | attempts/call | calls/s |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Spread over {len(runs)} runs: gate on usable {span(s_on, "usable", 3)}, paid {span(s_on, "paid")}, saved
{span(s_on, "saved")}; gate off usable {span(s_off, "usable", 3)}, paid {span(s_off, "paid")}, saved
{span(s_off, "saved")}. Bad answers the gate saw per tier (run 1): {seen}. With one planner a seed
gives the same figures on every run of the command: each tier answers from its own seeded
generator, in the order the calls reach it.

What the gate buys: usable answers from {_pct(s_off["usable"]["median"], 1)} to {_pct(s_on["usable"]["median"], 3)}
(median run) for {on_attempts:.3f} upstream attempts per call instead of 1, and no more paid calls:
the paid share is the complex calls (Kimi first) plus the few calls on which both free tiers
answered badly. No call was escalated: with one call at a time and the cooldown over by the next
call, the primary's breaker never keeps a later call from it, as with the real planner's calls
minutes apart against a 30 s cooldown. What keeps the answers usable is failover within a call
(two Llama attempts, then two Ollama, then Kimi), not the breaker's escalation across calls.

The count of unusable answers in a run is small, so the measured share scatters. What it scatters
around comes from the same rules run in-process on {mb["calls"]:,} calls (`bench/econ_model.py`: the
proxy's own `make_plan`, `Failover` and breakers, each attempt bad at its tier's rate, the cooldown
over by the next call): usable {_pct(mb["usable"], 3)}, paid {_pct(mb["paid"])}; by kind
{", ".join(f"{k} {_pct(v, 3)}" for k, v in mb["usable_by_kind"].items())}. With the breaker out of reach
(`escalate_after_failures` 10^9) usable is {_pct(mn["usable"], 3)} (minor re-plans
{_pct(mn["usable_by_kind"].get("minor"), 3)}): a bad answer that opens a tier's breaker also ends that
tier's retries within the same request, and a minor re-plan cannot make that up on Kimi.

| target (gate on) | value | goal | |
|---|---|---|---|
{checks_md}
"""


def ab_section() -> str:
    """`python -m bench.ab REV`'s last result (bench/results/ab.json), when there is one."""
    path = Path(__file__).resolve().parent / "results" / "ab.json"
    if not path.exists():
        return ""
    ab = json.loads(path.read_text())
    base, head = ab["base_summary"], ab["head_summary"]
    return f"""
## Against an earlier commit, in one run

`python -m bench.ab {ab["base"][:7]} --rounds {ab["rounds"]}` ({ab["when"]}, load average
{" ".join(ab["loadavg"])} at the end): `proxy serve` at {ab["base"][:7]} and at {ab["head"][:7]}
alternately, each round starting both afresh against the same nginx upstream, wrk at 1 in flight,
4 runs of 5 s per side per round; medians of {base["samples"]:.0f} runs a side.

| | {ab["base"][:7]} | {ab["head"][:7]} | change |
|---|---|---|---|
| latency p50, 1 in flight (ms) | {base["p50_ms"]:.3f} | {head["p50_ms"]:.3f} | {ab["p50_delta_ms"]:+.3f} |
| proxy CPU per request (ms) | {base["cpu_ms"]:.3f} | {head["cpu_ms"]:.3f} | {ab["cpu_delta_ms"]:+.3f} |
"""
