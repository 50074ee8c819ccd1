"""`python -m bench.economics`: the original design's economics, measured through `proxy serve`.

Three simulated tiers (`bench/econ_tiers.py`, their own process) answer JSON plans that are bad
at the original design's rates: Llama 12.5%, Ollama 25%, Kimi 3.5% (half prose around the JSON,
half JSON cut at max_tokens). A real `proxy serve` sits in front of them with the original
`strategic_planner:` block. A client (`bench/econ_client.py`) is the planner: its mix of calls,
one after another, each answer judged as it arrives; the proxy's ledger gives the money
(`bench/econ_ledger.py`). The calls go once through the quality gate (the default), then the
first `--off-requests` of the same calls with `quality: {enabled: false}`, to show what the gate
buys. `bench/econ_model.py` runs the same routing rules in-process on many more calls: the
figure the measured usable share scatters around.

The original planner makes 10-100 calls a day; this sends hundreds a second. The breaker's
cooldown (30 s by default) is scaled down by the same factor, so that it spans as many calls as
it would at `--calls-per-day` (100: the busy end, which makes escalations most frequent): a
small fraction of one call, so the call after a breaker opens probes the primary again, as the
real planner's next call would.

Results go to bench/results/economics.json (or --out); `python -m bench.report` and the full
`python -m bench` render them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import econ_client, econ_ledger, econ_model, report_gate
from bench.econ_tiers import TierSpec
from bench.procs import (
    LOAD_CORE,
    PROXY_CORE,
    Service,
    cpu_seconds,
    free_port,
    own_seconds,
    pin_self,
    pinned,
    python_module_argv,
    ready,
    say,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "economics.json"
COMMAND = "python -m bench.economics"
BAD_ANSWER_RATES = (("llama", 0.125), ("ollama", 0.25), ("kimi", 0.035))
REAL_COOLDOWN_S = 30.0  # routing.breaker_cooldown_seconds' default; the original block does not set it
_KIMI_KEY_ENV = "ECON_KIMI_KEY"


def cooldown_for(rate: float, calls_per_day: float) -> tuple[float, float]:
    """(scaled cooldown in seconds, the factor): as many calls per cooldown as at calls_per_day."""
    factor = rate / (calls_per_day / 86400.0)
    return REAL_COOLDOWN_S / factor, factor


def proxy_config(workdir: Path, name: str, ports: dict[str, int], port: int, cooldown: float, gate: bool) -> Path:
    """The proxy's config file `workdir/NAME.yaml`, its ledger `workdir/NAME.db`."""
    doc: dict[str, Any] = {
        # The original system's block, as its users have it (only the URLs point at the simulators).
        "strategic_planner": {
            "primary_llm": "llama",
            "kimi_timeout_seconds": 5,
            "llama_timeout_seconds": 30,
            "ollama_timeout_seconds": 20,
            "max_fallback_retries": 2,
            "max_total_retries": 5,
            "use_llama_for_minor_replans": True,
            "escalate_after_failures": 3,
            "llama_model": "llama3.1:8b",
            "llama_url": f"http://127.0.0.1:{ports['llama']}",
            "ollama_model": "qwen2.5:7b",
            "ollama_url": f"http://127.0.0.1:{ports['ollama']}",
            "recovery_threshold": 1,
        },
        # Kimi keeps its real default prices (proxy/config/schema.py); only where it is and its key.
        "kimi": {"enabled": True, "base_url": f"http://127.0.0.1:{ports['kimi']}/v1", "api_key_env": _KIMI_KEY_ENV},
        # New sections: the scaled cooldown (see the module doc), where to listen, a scratch ledger.
        "routing": {"breaker_cooldown_seconds": cooldown},
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": 10},
        "ledger": {"path": str(workdir / f"{name}.db")},
    }
    if not gate:
        doc["quality"] = {"enabled": False}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_tiers(workdir: Path, seed: int) -> tuple[Service, dict[str, int]]:
    specs = [TierSpec(name, free_port(), rate) for name, rate in BAD_ANSWER_RATES]
    argv = python_module_argv("bench.econ_tiers", "--seed", str(seed), *(s.arg() for s in specs))
    svc = Service("econ-tiers", pinned(LOAD_CORE, argv), specs[0].port, workdir / f"tiers-{seed}.log")
    svc.start(health="/health")
    for s in specs[1:]:
        if not ready(s.port, "/health"):
            svc.stop()
            raise RuntimeError(f"simulated tier {s.name} did not come up; see {svc.log}")
    return svc, {s.name: s.port for s in specs}


def start_proxy(config: Path, port: int, log: Path) -> Service:
    exe = shutil.which("proxy") or str(Path(sys.executable).parent / "proxy")
    argv = pinned(PROXY_CORE, [exe, "serve", "--config", str(config), "--port", str(port)])
    env = {**os.environ, _KIMI_KEY_ENV: "sk-econ-simulated"}
    return Service("proxy", argv, port, log, env).start(health="/readyz")


def one_config(args: argparse.Namespace, workdir: Path, seed: int, gate: bool, cooldown: float) -> dict[str, Any]:
    """Fresh tiers (seeded), a fresh proxy and ledger, the seed's calls (the first --off-requests
    of them with the gate off); the figures."""
    label = "on" if gate else "off"
    name = f"proxy-{seed}-gate-{label}"
    tiers, ports = start_tiers(workdir, seed)
    try:
        port = free_port()
        config = proxy_config(workdir, name, ports, port, cooldown, gate)
        proxy = start_proxy(config, port, workdir / f"{name}.log")
        try:
            planned = econ_client.calls(args.requests if gate else min(args.off_requests, args.requests), seed)
            cpu0 = {"proxy": cpu_seconds(proxy.pid), "tiers": cpu_seconds(tiers.pid), "client": own_seconds(set())}
            load = econ_client.run_load(f"http://127.0.0.1:{port}", planned, args.rate, args.planners)
            cpu = {
                "proxy": cpu_seconds(proxy.pid) - cpu0["proxy"],
                "tiers": cpu_seconds(tiers.pid) - cpu0["tiers"],
                "client": own_seconds(set()) - cpu0["client"],
            }
        finally:
            code = proxy.stop()
    finally:
        tiers.stop()
    ledger = econ_ledger.figures(workdir / f"{name}.db", ("kimi",))
    client = econ_client.summary(load)
    busy = {k: v / load.seconds for k, v in cpu.items()}  # share of one core during the load
    out = {
        "client": client,
        "ledger": ledger,
        "ledger_rows_match_calls": ledger["requests"] == client["calls"],
        "proxy_exit_code": code,
        "cpu_busy": busy,
    }
    if not out["ledger_rows_match_calls"]:
        say(f"  WARNING: {ledger['requests']} ledger rows for {client['calls']} calls")
    say(
        f"  gate {label:3}: usable {client['usable']:.3%} ({client['unusable']} of {client['calls']} not), "
        f"paid {ledger['paid_attempted_share']:.2%}, saved {ledger['saved_share']:.2%}, "
        f"{client['rate_achieved']:.0f} calls/s; CPU busy: " + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
    )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    cooldown, factor = cooldown_for(args.rate, args.calls_per_day)
    say(
        f"{args.runs} run(s) of {args.requests} calls with the gate on and {args.off_requests} with it off, at most "
        f"{args.rate:g}/s; breaker cooldown {REAL_COOLDOWN_S:g} s / {factor:,.0f} = {cooldown * 1e3:.3f} ms "
        f"(as at {args.calls_per_day:g} calls/day)"
    )
    model = [
        econ_model.expected(args.model_calls, args.seed, econ_client.MIX, BAD_ANSWER_RATES, after)
        for after in (3, 10**9)
    ]
    say(
        f"the rules in-process, {args.model_calls:,} calls: "
        f"usable {model[0]['usable']:.3%}, paid {model[0]['paid']:.2%}"
    )
    with tempfile.TemporaryDirectory(prefix="econ-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = []
        for r in range(args.runs):
            seed = args.seed + r
            say(f"run {r + 1} (seed {seed})")
            gates = {f"gate_{g}": one_config(args, workdir, seed, g == "on", cooldown) for g in ("on", "off")}
            runs.append({"seed": seed, **gates})
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join([COMMAND, *args.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
        },
        "params": {
            "requests": args.requests,
            "off_requests": min(args.off_requests, args.requests),
            "rate": args.rate,
            "planners": args.planners,
            "seed": args.seed,
            "calls_per_day": args.calls_per_day,
            "cooldown_s": cooldown,
            "cooldown_factor": factor,
            "real_cooldown_s": REAL_COOLDOWN_S,
            "mix": dict(econ_client.MIX),
            "bad_answer_rates": dict(BAD_ANSWER_RATES),
            "streamed_share": 0.5,
            "schema_share": 0.5,
        },
        "runs": runs,
        "model": {"breaker": model[0], "no_breaker": model[1]},
    }
    results["spread"] = {g: report_gate.spread(runs, g) for g in ("gate_on", "gate_off")}
    results["checks"] = report_gate.economics_checks(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="calls per run, gate on")
    parser.add_argument("--off-requests", type=int, default=5_000, help="calls per run, gate off (the first ones)")
    parser.add_argument("--rate", type=float, default=400.0, help="calls per second at most")
    parser.add_argument("--planners", type=int, default=1, help="planners calling at once, each one call at a time")
    parser.add_argument("--runs", type=int, default=1, help="runs, seeds --seed, --seed+1, ...")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calls-per-day", type=float, default=100.0, help="the real planner's rate (for the cooldown)")
    parser.add_argument("--model-calls", type=int, default=200_000, help="calls of the in-process model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", metavar="DIR", help="keep configs, logs and ledgers in DIR")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    pin_self(LOAD_CORE)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(report_gate.economics_text(results))
    say(f"wrote {args.out}")
    return 0 if all(c["pass"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
