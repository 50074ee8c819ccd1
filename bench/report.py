"""Results JSON -> figures, pass/fail checks, the BENCHMARKS.md text, the chart, a profile summary.

`python -m bench.report bench/results/results-full.json` rebuilds BENCHMARKS.md and the chart.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import report_gate

NAMES = ("direct", "proxy", "floor", "litellm")
COLOURS = {"direct": "#7f7f7f", "proxy": "#1f77b4", "floor": "#2ca02c", "litellm": "#d62728"}
NAN = float("nan")
NOMINAL_GAP_MS = 20.0  # the paced upstream's delay between events
GAP_SLACK_MS = 5.0  # how far above direct's gap p99 a held stream's gap p99 may go
SATURATED_MS = 30.0  # direct's own gap p99 above this: the load core, not the server, is the limit


def _get(d: Any, *keys: str, default: Any = NAN) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def systems(results: dict[str, Any]) -> list[str]:
    return [n for n in NAMES if n in results.get("throughput_32", {})]


def level_verdict(level: dict[str, Any], ref_p99: float) -> tuple[bool, bool]:
    """(ok, load side saturated) for one stream-holding step, against direct's gap p99 at that step."""
    level["added_gap_p99_ms"] = level["gap_ms"].get("p99", math.inf) - ref_p99
    ok = level["errors"] == 0 and level["added_gap_p99_ms"] <= GAP_SLACK_MS
    saturated = ref_p99 > SATURATED_MS
    level["held"], level["load_side_saturated"] = ok and not saturated, saturated
    return ok, saturated


def derive_held(results: dict[str, Any]) -> None:
    """Per system: the highest concurrency held before the first failed step; steps where direct
    itself was over SATURATED_MS count as inconclusive rather than held."""
    held = results.get("streams_held", {})
    ref = {lv["concurrency"]: lv["gap_ms"].get("p99", math.inf) for lv in _get(held, "direct", "levels", default=[])}
    for v in held.values():
        v["held"], v["inconclusive_from"] = 0, None
        for lv in v["levels"]:
            ok, saturated = level_verdict(lv, ref.get(lv["concurrency"], math.inf))
            if not ok:
                break
            if saturated:
                v["inconclusive_from"] = v["inconclusive_from"] or lv["concurrency"]
            else:
                v["held"], v["inconclusive_from"] = lv["concurrency"], None


def figures(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One flat dict of figures per system; `added_*` are differences against direct."""
    derive_held(results)
    out: dict[str, dict[str, float]] = {}
    for n in systems(results):
        held = _get(results, "streams_held", n, "held", default=0)
        out[n] = {
            "lat_p50": _get(results, "latency_1", n, "p50_ms"),
            "lat_p99": _get(results, "latency_1", n, "p99_ms"),
            "rps32": _get(results, "throughput_32", n, "rps"),
            "rps32_p99": _get(results, "throughput_32", n, "p99_ms"),
            "rate10": _get(results, "rate_p99_10ms", n, "best_rps"),
            "rate10_lowest": _get(results, "rate_p99_10ms", n, "lowest_tried"),
            "streams_s": _get(results, "stream_throughput_32", n, "rps"),
            "cpu_ms": _get(results, "resources", n, "cpu_ms_per_request"),
            "cpu_ms_stream": _get(results, "resources", n, "cpu_ms_per_stream"),
            "peak_rss": _get(results, "resources_after", n, "peak_rss_mb"),
            "rss_after": _get(results, "resources_after", n, "rss_mb"),
            "ttft": _get(results, "stream_timing", n, "ttft_p50_ms"),
            "gap_p50": _get(results, "stream_timing", n, "gap_p50_ms"),
            "gap_p99": _get(results, "stream_timing", n, "gap_p99_ms"),
            "gap_spread": _get(results, "stream_timing", n, "gap_p50_spread_ms"),
            "held": float(held),
            "errors": float(_get(results, "errors", n, "fixed_load", default=0)),
            "overload_errors": float(_get(results, "errors", n, "overload_steps", default=0)),
        }
    if "direct" in out:
        d = out["direct"]
        for f in out.values():
            for k in ("lat_p50", "lat_p99", "ttft", "gap_p50", "gap_p99"):
                f[f"added_{k}"] = f[k] - d[k]
    return out


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    f = figures(results)
    p = f.get("proxy", {})
    ll = f.get("litellm")
    ledger = results.get("ledger", {})

    def c(name: str, value: str, target: str, ok: bool | None) -> dict[str, Any]:
        return {"check": name, "value": value, "target": target, "pass": ok}

    us = 1000.0
    spread = f["direct"]["gap_spread"] * us
    out = [
        c("added latency p50 (1 in flight)", f"{p['added_lat_p50']:.3f} ms", "<= 0.4 ms", p["added_lat_p50"] <= 0.4),
        c("added latency p99 (1 in flight)", f"{p['added_lat_p99']:.3f} ms", "<= 1.5 ms", p["added_lat_p99"] <= 1.5),
        c("throughput, 32 in flight", f"{p['rps32']:,.0f} req/s", ">= 2,500 req/s", p["rps32"] >= 2500),
    ]
    if ll is not None:
        ratio = p["rps32"] / ll["rps32"] if ll["rps32"] else math.inf
        out.append(c("throughput vs LiteLLM", f"{ratio:.1f}x", ">= 20x", ratio >= 20))
    else:
        out.append(c("throughput vs LiteLLM", "n/a (run with --with-litellm)", ">= 20x", None))
    out += [
        c("proxy CPU per request", f"{p['cpu_ms']:.3f} ms", "<= 0.4 ms", p["cpu_ms"] <= 0.4),
        c("proxy RSS after the run", f"{p['rss_after']:.1f} MB", "<= 80 MB", p["rss_after"] <= 80),
        c(
            "stream per-chunk gap added p50",
            f"{p['added_gap_p50'] * us:.0f} us (round-to-round spread of direct: {spread:.0f} us)",
            "<= 50 us",
            p["added_gap_p50"] * us <= 50,
        ),
        c("paced streams held (added gap p99 <= 5 ms)", _held_text(results, "proxy"), ">= 256", p["held"] >= 256),
        c("errors (fixed-load runs)", f"{p['errors']:.0f}", "0", p["errors"] == 0),
    ]
    queue = results.get("ledger_queue_at_saturation", {})
    if queue.get("samples"):
        out.append(
            c(
                "ledger queue at saturation (32 in flight)",
                f"max {queue['max']:.0f}, median {queue['median']:.0f} rows ({queue['samples']} samples)",
                "<= 1,000 rows",
                queue["max"] <= 1000,
            )
        )
    status = ledger.get("status", "n/a")
    if status == "n/a":
        out.append(c("lost ledger rows", "ledger: n/a (proxy serve wrote no ledger)", "0", None))
    else:
        lost = ledger["completed"] - ledger["rows"]
        detail = f"{ledger['rows']} rows for {ledger['completed']} completed (+ <= {ledger['max_abandoned']} cut)"
        out.append(c("lost ledger rows", f"{max(lost, 0)} ({detail})", "0", status == "ok"))
    return out + report_gate.checks(results)


def _held_text(results: dict[str, Any], name: str) -> str:
    v = _get(results, "streams_held", name, default={})
    text = f"{v.get('held', 0):.0f}"
    if v.get("inconclusive_from"):
        text += f" ({v['inconclusive_from']} and up: inconclusive, the load core was saturated)"
    return text


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def checks_text(results: dict[str, Any]) -> str:
    lines = ["Targets (the proxy):"]
    lines += [f"  [{_mark(c['pass']):4}] {c['check']}: {c['value']} (target {c['target']})" for c in results["checks"]]
    return "\n".join(lines)


def _fmt(v: float, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _cell(fig: dict[str, float], key: str, digits: int) -> str:
    if key == "rate10" and fig[key] == 0:
        return f"< {fig['rate10_lowest']:,.0f}"  # even the lowest rate tried was over the limit
    return _fmt(fig.get(key, NAN), digits)


def _ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x" if a / b < 100 else f"{a / b:,.0f}x"


_ROWS = (  # key, label, digits
    ("lat_p50", "latency, 1 in flight, p50 (ms)", 3),
    ("lat_p99", "latency, 1 in flight, p99 (ms)", 3),
    ("added_lat_p50", "added latency p50 (ms)", 3),
    ("added_lat_p99", "added latency p99 (ms)", 3),
    ("rps32", "throughput, 32 in flight (req/s)", 0),
    ("rps32_p99", "  p99 at 32 in flight (ms)", 2),
    ("rate10", "highest rate with p99 < 10 ms (req/s)", 0),
    ("streams_s", "canned SSE streams/s, 32 in flight", 0),
    ("cpu_ms", "server CPU per request (ms)", 3),
    ("cpu_ms_stream", "server CPU per canned stream (ms)", 3),
    ("peak_rss", "server peak RSS (MB)", 1),
    ("rss_after", "server RSS after the run (MB)", 1),
    ("ttft", "paced stream TTFT p50 (ms)", 3),
    ("added_ttft", "added TTFT p50 (ms)", 3),
    ("gap_p50", "per-chunk gap p50 (ms)", 3),
    ("gap_p99", "per-chunk gap p99 (ms)", 3),
    ("added_gap_p50", "added gap p50 (ms)", 3),
    ("added_gap_p99", "added gap p99 (ms)", 3),
    ("held", "paced streams held (of 32..512)", 0),
    ("errors", "errors, fixed-load runs", 0),
    ("overload_errors", "errors, overload steps", 0),
)
_NO_RATIO = {"added_lat_p50", "added_lat_p99", "added_ttft", "added_gap_p50", "added_gap_p99", "errors"}
_NO_RATIO |= {"overload_errors", "held", "gap_p50", "gap_p99"}


def table(results: dict[str, Any]) -> str:
    f = figures(results)
    names = list(f)
    others = [n for n in names if n != "direct"]
    head = ["figure", *names, *(f"{n} / direct" for n in others)]
    if "floor" in f:
        head.append("proxy / floor")
    if "litellm" in f:
        head.append("proxy / litellm")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, digits in _ROWS:
        row = [label, *("(reference)" if (key, n) == ("held", "direct") else _cell(f[n], key, digits) for n in names)]
        if key in _NO_RATIO:
            row += ["-"] * (len(head) - len(row))
        else:
            row += [_ratio(f[n][key], f["direct"][key]) for n in others]
            if "floor" in f:
                row.append(_ratio(f["proxy"][key], f["floor"][key]))
            if "litellm" in f:
                row.append(_ratio(f["proxy"][key], f["litellm"][key]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _hold_table(results: dict[str, Any]) -> str:
    held = results.get("streams_held", {})
    lines = ["| streams | " + " | ".join(f"{n} gap p99 (ms) | {n} CPU" for n in held) + " |"]
    lines.append("|---|" + "---|---|" * len(held))
    levels = sorted({lv["concurrency"] for v in held.values() for lv in v["levels"]})
    for c in levels:
        cells = []
        for v in held.values():
            lv = next((x for x in v["levels"] if x["concurrency"] == c), None)
            if lv is None:
                cells += ["-", "-"]
                continue
            mark = "" if lv["held"] else " (saturated load side)" if lv.get("load_side_saturated") else " (not held)"
            errors = f", {lv['errors']} errors" if lv["errors"] else ""
            cells += [
                f"{_get(lv, 'gap_ms', 'p99'):.2f} (+{lv['added_gap_p99_ms']:.2f}){errors}{mark}",
                f"{lv['server_cpu_util'] * 100:.0f}%",
            ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _profile_text(prof: dict[str, Any] | None) -> str:
    if not prof:
        return ""
    lines = [
        "## Where the proxy's time goes (py-spy, 32 in flight)",
        "",
        f"{prof['samples']} samples while serving {prof['rps_while_profiling']:,.0f} req/s. "
        "Share of samples by package (leaf frame):",
        "",
        "| package | share |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1%} |" for k, v in prof["by_package"]]
    lines += ["", "Top functions by own time:", "", "| function | own | with callees |", "|---|---|---|"]
    incl = dict(prof["inclusive"])
    lines += [f"| `{k}` | {v:.1%} | {incl.get(k, 0):.1%} |" for k, v in prof["self"][:15]]
    lines += ["", "Top proxy functions with callees:", "", "| function | with callees |", "|---|---|"]
    lines += [f"| `{k}` | {v:.1%} |" for k, v in prof["inclusive"] if "proxy/" in k][:12]
    return "\n".join(lines) + "\n"


# Written by hand: what limits the proxy and what was tried; kept below the generated figures.
ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"


def markdown(results: dict[str, Any], json_path: Path, chart_path: Path) -> str:
    from bench import scale

    analysis = ANALYSIS.read_text() if ANALYSIS.exists() else ""
    scaled = "\n" + scale.markdown(results["scale"]) if "scale" in results else ""
    return _generated(results, json_path, chart_path) + scaled + ("\n" + analysis if analysis else "")


def _generated(results: dict[str, Any], json_path: Path, chart_path: Path) -> str:
    m = results["meta"]
    plan = m.get("plan", {})
    checks_md = "\n".join(
        f"| {c['check']} | {c['value']} | {c['target']} | **{_mark(c['pass'])}** |" for c in results["checks"]
    )
    fallbacks = []
    if m.get("upstream") != "nginx":
        fallbacks.append("nginx was missing: the fast upstream was the built-in `proxy.sim`.")
    if m.get("load_tool") != "wrk":
        fallbacks.append("wrk was missing: load came from hey (per-worker `-q` rate limit, csv percentiles).")
    ledger = results.get("ledger", {})
    noise = results.get("interference", {})
    worst = max(noise.items(), key=lambda kv: kv[1]["share"], default=None)
    noise_text = (
        f"Other processes on the machine used at most {worst[1]['share']:.1%} of its CPU during a phase "
        f"({worst[0]}); load average {' '.join(m['loadavg_at_start'])} at the start."
        if worst
        else ""
    )
    tripped = {
        phase: ", ".join(f"{t} {st}" for t, st in states.items() if st != "closed")
        for phase, states in results.get("proxy_breakers_after", {}).items()
    }
    breaker_text = "; ".join(f"after {ph}: {txt}" for ph, txt in tripped.items() if txt) or "none"
    log = results.get("proxy_log", {})
    dirty = " plus uncommitted changes under proxy/" if m.get("proxy_uncommitted_changes") else ""
    return f"""# Benchmarks

```sh
python -m bench --with-litellm    # full run, ~7 min + LiteLLM install once; writes this file
python -m bench --quick           # smoke test, < 1 min (results-quick.json, no BENCHMARKS.md)
python -m bench --profile         # adds a py-spy profile of the proxy at 32 in flight
python -m bench.report {json_path}   # rebuild this file and the chart from the JSON
python -m bench.economics [--runs 3]   # the original design's economics, ~2 min a run: bench/results/economics.json
```

Run from the repository root in an environment with the project installed (`pip install -e .`).
Extra Python packages, installed on first use when missing: `matplotlib` (chart), `py-spy`
(`--profile`) — the optional-dependency group `bench`. Debian packages `nginx` and `wrk` are
installed with apt-get when running as root and missing. LiteLLM gets its own virtualenv
(`bench/.litellm-venv`, `litellm[proxy]=={m.get("litellm") or "pinned in bench/targets.py"}`).

Generated from `{json_path}` ({m["run"]} run, {m["date"]}, {m["wall_seconds"]:.0f} s).
Machine: {m["cpu"]}, {m["cores"]} cores, Linux {m["kernel"]}, Python {m["python"]}, aiohttp {m["aiohttp"]},
uvloop {m["uvloop"]}, nginx {m["nginx"]}, wrk {m["wrk"] or "-"}, hey {m["hey"] or "-"},
LiteLLM {m["litellm"] or "not run"}; proxy at commit {m["proxy_commit"]}{dirty}.
{" ".join(fallbacks)}
{noise_text}

![latency and throughput: direct, proxy, LiteLLM]({chart_path})

## Results

{table(results)}

"added" figures are differences against direct; ratios are against direct (last column: proxy
against LiteLLM). Server CPU and RSS are of the process under test: nginx (master + worker) for
direct, `proxy serve`, LiteLLM's process tree.

## Targets

| target | value | goal | |
|---|---|---|---|
{checks_md}

Ledger: {ledger.get("status")}; rows {ledger.get("rows")}, responses completed through the proxy
{ledger.get("completed")}, at most {ledger.get("max_abandoned")} requests cut in flight when wrk runs
ended (each may or may not have a row); `proxy serve` exit code after SIGTERM: {ledger.get("proxy_exit_code")}.
Proxy circuit breakers left open by a phase: {breaker_text}. Proxy log: {log.get("errors")} ERROR
lines, {log.get("tracebacks")} tracebacks.

{report_gate.gate_section(results)}
{report_gate.economics_section(report_gate.load_economics())}
{report_gate.ab_section()}
## Paced streams held by one core

64 deltas 20 ms apart from `proxy.sim` in its own process; concurrency stepped, {plan.get("hold_s")} s
each; a step is held with no errors and a gap p99 at most {GAP_SLACK_MS:g} ms above direct's at the same
concurrency (the stream clients and the paced upstream share the load core, so direct's own gap p99
grows with concurrency too; where it passes {SATURATED_MS:g} ms the load core is the limit and the step
is inconclusive). A system stops at its first step not held. CPU = the server's CPU time / wall time
during the step (for direct: the paced upstream's).

{_hold_table(results)}

{_profile_text(results.get("profile"))}
## Method

- **Upstream**: nginx, 1 worker, pinned to core 1, answering `POST /v1/chat/completions` with a
  1.4 KB chat completion and `POST /stream/v1/chat/completions` with a canned 16 KB SSE stream
  (role chunk, 64 deltas, finish chunk, usage chunk, `[DONE]`), both `return 200` from memory,
  config written to a temp dir, nginx run in the foreground with its own pid/log paths.
  The paced upstream is `proxy.sim` (`Behaviour(chunk_delay=0.02, chunks=64)`,
  `record_requests=False`) in its own process on core 1.
- **Systems**: *direct* = the upstream itself. *proxy* = `proxy serve --config <generated> --port P`
  on core 0 (`taskset -c 0`), ledger on (a temp dir), tiers llama/ollama/kimi all on the upstream
  (`sse` and `paced` tiers pinned by model name for the stream tests). *litellm* = `litellm --config
  <generated> --num_workers 1` on core 0, `LITELLM_LOCAL_MODEL_COST_MAP=True`, master key, no
  database, access log off, deployments `bench` and `bench-fallback` on the same upstream with
  `fallbacks: [{{bench: [bench-fallback]}}]`, `num_retries: 1`.
- **Load**: wrk, 1 thread on core 1, Lua POST script; its `done()` prints p50/p90/p99/p99.9 from
  `latency:percentile()`. Same request body (about 230 bytes) for all three.
- **Added latency, 1 in flight**: `wrk -c1` for {plan.get("latency_s")} s per round,
  {plan.get("latency_rounds")} rounds interleaved direct, proxy, litellm, direct, ...; median of
  the round p50s and median of the round p99s; added = system - direct.
- **Throughput**: `wrk -c32` for {plan.get("throughput_s")} s (closed loop, 32 in flight).
- **Highest rate with p99 < 10 ms**: no wrk2 in Debian, so the Lua script paces requests: its
  `delay()` hands out slots of a fixed schedule (monotonic clock via LuaJIT ffi) across 32
  connections, so the offered rate is constant while fewer than 32 are in flight (1 ms timer
  granularity: sends come in small bursts). Bisection, {plan.get("rate_iterations")} steps of
  {plan.get("rate_s")} s, between 0 and the 32-in-flight throughput; a step passes when p99 < 10 ms,
  no errors and >= 97% of the asked rate was sent. Latency counts from the actual send, so
  queueing behind a full set of 32 connections is not counted (no coordinated-omission correction).
- **CPU and memory**: utime+stime from `/proc/PID/stat` (whole process tree) before and after the
  32-in-flight run, divided by the requests it completed; VmHWM (peak) and VmRSS from
  `/proc/PID/status` after all load.
- **Stream timing**: a bare asyncio client (`bench/streams.py`, its own process on core 1)
  timestamps every read carrying SSE events; {plan.get("timing_concurrency")} paced streams in
  flight for {plan.get("timing_s")} s, {plan.get("timing_rounds")} interleaved rounds, medians of
  the rounds. TTFT is from the request's send to the first event; gaps are between reads with
  events (the nominal gap is 20 ms: "added" = system - direct). Clients ask for usage
  (`stream_options.include_usage`), so the proxy relays every event unchanged.
- **Errors**: non-2xx, socket errors and timeouts (wrk), and failed or cut streams. "Fixed-load"
  runs are warm-up, latency, throughput and stream timing; rate-search and holding steps drive
  the systems into overload on purpose and are counted apart.
- **Logging**: `proxy serve` at its default level, as users run it: one access line per request
  (to a file). LiteLLM runs with uvicorn's access log off, which favours LiteLLM.
- **Order**: warm-up, latency, throughput, rate search, stream timing, streams held, profile, and
  last the canned-SSE throughput, because wrk cuts the streams in flight when it stops (the
  proxy's breakers are read from `/readyz` after every phase to show what that does).
- **A shared machine**: before each phase the run waits (up to {plan.get("quiet_wait_s")} s) for a second in
  which other processes use under 5% of the CPU, and measures what they used during the phase
  (`/proc/stat` task time minus that of the bench's own processes, plus steal); a phase disturbed
  by more than 5% is run once more while {plan.get("spare_s")} s of spare time last. Per phase in the JSON
  (`interference`).
- **Profile** (`--profile`): `py-spy record --format raw --nonblocking --rate 250` on core 1 for
  {plan.get("profile_s")} s during an extra `wrk -c32` run; shares of samples by leaf frame ("own") and by
  frames anywhere on the stack ("with callees"). The aiosqlite rows are the ledger's writer
  thread: SQLite runs in C, so its time shows on the Python frame that called it.
"""


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    f = figures(results)
    names = list(f)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = results["meta"]
    fig.suptitle(
        f"direct vs proxy vs LiteLLM ({m['run']} run, {m['date'][:10]}): proxy and LiteLLM pinned to one core "
        f"of {m['cores']} ({m['cpu']}); upstream and load on the other"
    )

    def bars(ax: Any, groups: list[tuple[str, str]], title: str, unit: str, digits: int) -> None:
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [f[n][k] for k, _ in groups]
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            rects = ax.bar(xs, vals, width, label=n, color=COLOURS[n])
            ax.bar_label(rects, labels=[_cell(f[n], k, digits) for k, _ in groups], fontsize=8, padding=2)
            for x, (k, _) in zip(xs, groups, strict=True):
                if f[n][k] == 0:  # a log axis has no room for 0: say it in words
                    ax.annotate(
                        _cell(f[n], k, digits),
                        (x, 0),
                        xycoords=("data", "axes fraction"),
                        xytext=(0, 4),
                        textcoords="offset points",
                        ha="center",
                        fontsize=8,
                        color=COLOURS[n],
                    )
        ax.set_xticks(range(len(groups)), [label for _, label in groups])
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=9)
        ax.margins(y=0.15)

    latency = [("lat_p50", "p50"), ("lat_p99", "p99")]
    bars(axes[0][0], latency, "Latency, 1 request in flight (lower is better)", "ms", 3)
    bars(
        axes[0][1],
        [("rps32", "32 in flight"), ("rate10", "max rate, p99 < 10 ms"), ("streams_s", "SSE streams/s, 32 in flight")],
        "Throughput (higher is better)",
        "requests/s",
        0,
    )
    ax = axes[1][0]
    for n in names:
        steps = _get(results, "rate_p99_10ms", n, "steps", default=[])
        pts = sorted((s["rps"], s["p99_ms"]) for s in steps)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLOURS[n], label=n)
    ax.axhline(10, color="black", linestyle="--", linewidth=1, label="10 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests/s sent (constant rate, 32 connections)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("p99 latency vs offered rate (rate search steps)")
    ax.legend(fontsize=9)
    ax = axes[1][1]
    for n in names:
        levels = _get(results, "streams_held", n, "levels", default=[])
        if levels:
            ax.plot(
                [lv["concurrency"] for lv in levels],
                [_get(lv, "gap_ms", "p99") for lv in levels],
                "o-",
                color=COLOURS[n],
                label=n,
            )
    ax.axhline(20, color="grey", linestyle=":", linewidth=1, label="nominal gap 20 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    levels = sorted({lv["concurrency"] for v in results.get("streams_held", {}).values() for lv in v["levels"]})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("paced streams in flight")
    ax.set_ylabel("per-chunk gap p99 (ms)")
    ax.set_title("Paced SSE streams: per-chunk gap p99")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_LINE = re.compile(r":\d+\)$")


def summarize_profile(raw: str) -> dict[str, Any]:
    """py-spy `--format raw` (collapsed stacks) -> shares by leaf function, with callees, by package."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(fr) for fr in stack.split(";") if not fr.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
        pkg[_package(frames[-1])] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "by_package": []}
    return {
        "samples": total,
        "self": [(k, v / total) for k, v in own.most_common(25)],
        "inclusive": [(k, v / total) for k, v in incl.most_common(60)],
        "by_package": [(k, v / total) for k, v in pkg.most_common(12)],
    }


def _short(frame: str) -> str:
    """`func (/long/path/site-packages/aiohttp/web.py:12)` -> `func (aiohttp/web.py)`."""
    frame = _LINE.sub(")", frame)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            return head + "(" + tail.split(marker, 1)[1]
    return frame


def _package(frame: str) -> str:
    inner = frame.partition("(")[2]
    top = inner.split("/", 1)[0].rstrip(")")
    return top if "/" in inner else "stdlib/other"


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results-full.json")
    results = json.loads(path.read_text())
    results["checks"] = checks(results)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart_path = path.with_name(path.name.replace("results-", "chart-").replace(".json", ".png"))
    chart(results, chart_path)
    root = Path(__file__).resolve().parent.parent
    if results["meta"]["run"] == "full":
        text = markdown(results, path.resolve().relative_to(root), chart_path.resolve().relative_to(root))
        (root / "BENCHMARKS.md").write_text(text)
    print(table(results))
    print(checks_text(results))


if __name__ == "__main__":
    main()
