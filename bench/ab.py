"""`python -m bench.ab REV [--rounds 4]`: added latency and CPU per request of the proxy at REV
against the working tree, measured in one run, alternating the two so that the machine's drift
(±30% over minutes here) hits both alike.

Each round starts, for each side in turn, the canned nginx upstream and `proxy serve` from that
side's tree (REV is checked out with `git worktree add --detach` into bench/results/tmp; its
`proxy` and `bench` packages are imported through PYTHONPATH), then runs wrk at 1 in flight four
times. Reported: the medians over all rounds of p50 latency and of the proxy's CPU per request,
and their differences (working tree minus REV), to bench/results/ab.json and BENCHMARKS.md. A REV
needs the bench of 18fc672 or later (the functions `_measure` calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_MEASURE = """
import contextlib, json, signal, sys
from pathlib import Path
from bench import load, targets, upstream
from bench.__main__ import make_system
from bench.procs import LOAD_CORE, cpu_seconds, pin_self

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
pin_self(LOAD_CORE)
rows = []
with contextlib.ExitStack() as stack:
    fast, kind = upstream.start_fast_upstream(out)
    stack.callback(fast.stop, signal.SIGQUIT if kind == "nginx" else signal.SIGTERM)
    paced = upstream.start_paced_upstream(out)
    stack.callback(paced.stop)
    svc = targets.start_proxy(f"http://127.0.0.1:{fast.port}", f"http://127.0.0.1:{paced.port}", out)
    stack.callback(svc.stop)
    s = make_system("proxy", svc, ("auto", "sse", "paced"), {})
    load.run("wrk", s.plain, out, connections=4, seconds=2)
    for _ in range(4):
        c0 = cpu_seconds(svc.pid)
        r = load.run("wrk", s.plain, out, connections=1, seconds=5)
        rows.append({"p50_ms": r.p50_ms, "cpu_ms": (cpu_seconds(svc.pid) - c0) / (r.rps * 5) * 1000})
print(json.dumps(rows))
"""


def _measure(tree: Path, scratch: Path) -> list[dict[str, float]]:
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(scratch)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows: list[dict[str, float]] = json.loads(run.stdout.strip().splitlines()[-1])
    return rows


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(r["p50_ms"] for r in rows),
        "cpu_ms": statistics.median(r["cpu_ms"] for r in rows),
        "samples": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    sha = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True, check=True)
    base_sha = sha.stdout.strip()
    scratch = RESULTS / "tmp" / f"ab-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    base_tree = scratch / "base"
    scratch.mkdir(parents=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], cwd=ROOT, check=True)
    sides: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    try:
        for i in range(args.rounds):
            for name, tree in (("base", base_tree), ("head", ROOT)):
                sides[name] += _measure(tree, scratch / f"{name}-{i}")
                last = sides[name][-4:]
                print(
                    f"[ab] round {i + 1} {name}: p50 {statistics.median(r['p50_ms'] for r in last):.3f} ms", flush=True
                )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    base, head = _summary(sides["base"]), _summary(sides["head"])
    doc: dict[str, Any] = {
        "base": base_sha,
        "head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "base_summary": base,
        "head_summary": head,
        "p50_delta_ms": head["p50_ms"] - base["p50_ms"],
        "cpu_delta_ms": head["cpu_ms"] - base["cpu_ms"],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    (RESULTS / "ab.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"[ab] 1 in flight, medians of {base['samples']:.0f} samples each: p50 {base['p50_ms']:.3f} -> "
        f"{head['p50_ms']:.3f} ms ({doc['p50_delta_ms']:+.3f}); CPU/request {base['cpu_ms']:.3f} -> "
        f"{head['cpu_ms']:.3f} ms ({doc['cpu_delta_ms']:+.3f}); wrote bench/results/ab.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
