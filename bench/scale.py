"""`python -m bench.scale [--rounds N]` (and a phase of `python -m bench`): the scale-out figures.

- Workers: throughput of `proxy serve --workers 2` against one worker (`proxy serve`), both
  unpinned on this 2-core machine with the default config (SQLite ledger; the workers share
  budgets, client limits and breakers through their private redis-server), wrk at 32 in flight.
  nginx and wrk stay on the load core, as in the main run, so they take their share of it from
  the second worker. Goal: at least 1.8x.
- Shared backends: one worker on the proxy core with `ledger.url` (a real PostgreSQL) and
  `state.url` (a real redis-server on loopback TCP) against the SQLite default, at 1 in flight:
  p50 latency and the proxy's CPU per request (Redis and PostgreSQL run on the load core, as a
  remote server would cost the proxy nothing but the round trips). Goal: added p50 within 0.2 ms.

The two servers of each comparison are up at once (the idle one costs nothing) and short runs
alternate between them, ABBA, so that the machine's drift (±30% within minutes here) hits both
alike; a figure is the median over runs, a ratio or difference the median of each run against
its neighbour of the other server. PostgreSQL and Redis are the tests' own
starters (tests/support), so the bench needs the test extras and Debian's postgresql and
redis-server (installed when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import load, targets, upstream
from bench.procs import LOAD_CORE, PROXY_CORE, Service, cpu_seconds, ensure_apt, free_port, pin_self, pinned, say

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKERS_GOAL = 1.8
P50_GOAL_MS = 0.2
WARMUP_S = 4


@dataclass(frozen=True)
class ScalePlan:
    rounds: int = 10  # throughput runs per server
    tput_s: float = 3
    tput_connections: int = 32
    latency_runs: int = 12  # latency runs per server
    latency_s: float = 3


FULL_SCALE = ScalePlan()
QUICK_SCALE = ScalePlan(2, 1.5, 32, 2, 1.5)


@dataclass(frozen=True)
class Upstreams:
    fast: str
    paced: str
    pg_url: str
    redis_url: str


def _config(up: Upstreams, workdir: Path, port: int, *, shared: bool) -> Path:
    path = targets.proxy_config(up.fast, up.paced, workdir, port)
    if shared:
        doc = yaml.safe_load(path.read_text())
        doc["ledger"] = {"url": up.pg_url}
        doc["state"] = {"url": up.redis_url}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _serve(up: Upstreams, workdir: Path, *, workers: int = 1, shared: bool = False, pin: bool = False) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(_config(up, workdir, port, shared=shared))]
    argv += ["--port", str(port), "--workers", str(workers)]
    # The bench runs on the load core and its children inherit that: unpinned means every core.
    argv = pinned(PROXY_CORE, argv) if pin else ["taskset", "-c", f"0-{(os.cpu_count() or 1) - 1}", *argv]
    env = {**os.environ, "BENCH_KIMI_KEY": "sk-bench-unused"}
    return Service(f"proxy-w{workers}", argv, port, workdir / "proxy.log", env).start(health="/readyz")


def _target(svc: Service) -> load.Target:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "plan my day"}]}).encode()
    return load.Target("proxy", f"http://127.0.0.1:{svc.port}/v1/chat/completions", body)


def _measure(tool: str, svc: Service, workdir: Path, connections: int, seconds: float) -> dict[str, float]:
    c0 = cpu_seconds(svc.pid)
    r = load.run(tool, _target(svc), workdir, connections=connections, seconds=seconds)
    cpu = cpu_seconds(svc.pid) - c0
    return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "cpu_ms": _per(cpu, r)}


def _alternate(
    tool: str, pair: dict[str, Service], workdir: Path, runs: int, connections: int, seconds: float
) -> dict[str, list[dict[str, float]]]:
    """Both servers are up; short runs alternate between them (ABBA: neither always goes first),
    so that the machine's drift hits both alike."""
    names = list(pair)
    for svc in pair.values():
        # Warm-up: a fresh `--workers 2` serves at half speed for its first seconds (connection
        # pools to the upstream and to its Redis, first calls of every code path, in each worker).
        load.run(tool, _target(svc), workdir, connections=max(connections, 4), seconds=WARMUP_S)
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            rows[name].append(_measure(tool, pair[name], workdir, connections, seconds))
    return rows


def _per(cpu: float, r: load.LoadResult) -> float:
    return cpu / max(r.requests, 1) * 1000


@contextlib.contextmanager
def backends(workdir: Path) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database and a redis-server on loopback, both on the load core."""
    from tests.support.postgres import remove, start_server
    from tests.support.redis_server import RedisServer

    pg = start_server()
    redis = RedisServer.start_in(workdir / "redis")
    try:
        yield pg.new_database(), redis.url
    finally:
        redis.kill()
        remove(pg)


def run(tool: str, fast: str, paced: str, workdir: Path, plan: ScalePlan) -> dict[str, Any]:
    ensure_apt({"redis-server": "redis-server", "pg_ctlcluster": "postgresql"})
    rows: dict[str, list[dict[str, float]]] = {"one_worker": [], "two_workers": [], "sqlite": [], "shared": []}
    with backends(workdir) as (pg_url, redis_url), contextlib.ExitStack() as stack:
        up = Upstreams(fast, paced, pg_url, redis_url)
        workers = {"one_worker": _serve(up, workdir / "w1"), "two_workers": _serve(up, workdir / "w2", workers=2)}
        for svc in workers.values():
            stack.callback(svc.stop)
        say(f"scale: --workers 2 against one worker, {plan.rounds} runs each, alternating")
        rows |= _alternate(tool, workers, workdir, plan.rounds, plan.tput_connections, plan.tput_s)
        for svc in workers.values():
            svc.stop()
        backends_pair = {
            "sqlite": _serve(up, workdir / "sqlite", pin=True),
            "shared": _serve(up, workdir / "shared", shared=True, pin=True),
        }
        for svc in backends_pair.values():
            stack.callback(svc.stop)
        say(f"scale: PostgreSQL + Redis against the SQLite default, {plan.latency_runs} runs each, alternating")
        rows |= _alternate(tool, backends_pair, workdir, plan.latency_runs, 1, plan.latency_s)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    # Paired: each run against the other server's run next to it, then the median of those.
    ratios = [w2["rps"] / w1["rps"] for w1, w2 in zip(rows["one_worker"], rows["two_workers"], strict=True)]
    added = [b["p50_ms"] - a["p50_ms"] for a, b in zip(rows["sqlite"], rows["shared"], strict=True)]
    cpu = [b["cpu_ms"] - a["cpu_ms"] for a, b in zip(rows["sqlite"], rows["shared"], strict=True)]
    ratio, p50 = statistics.median(ratios), statistics.median(added)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": plan.__dict__,
        "rows": rows,
        "medians": med,
        "workers_ratio": ratio,
        "workers_ratio_range": [min(ratios), max(ratios)],
        "workers_ok": ratio >= WORKERS_GOAL,
        "shared_added_p50_ms": p50,
        "shared_added_p50_range_ms": [min(added), max(added)],
        "shared_ok": p50 <= P50_GOAL_MS,
        "shared_cpu_delta_ms": statistics.median(cpu),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def _row(label: str, m: dict[str, float], *, rps: bool) -> str:
    cells = [f"{m['rps']:,.0f}"] if rps else []
    cells += [f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}", f"{m['cpu_ms']:.3f}", f"{m['errors']:.0f}"]
    return "| " + " | ".join([label, *cells]) + " |"


def _span(r: list[float], unit: str) -> str:
    return f"pairs from {r[0]:+.3f}{unit} to {r[1]:+.3f}{unit}" if unit != "x" else f"pairs {r[0]:.2f}x to {r[1]:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    m, plan = doc["medians"], doc["plan"]
    ok = {True: "met", False: "**not met**"}
    workers = "\n".join(
        [
            _row("`proxy serve` (one worker, unpinned)", m["one_worker"], rps=True),
            _row("`proxy serve --workers 2`", m["two_workers"], rps=True),
        ]
    )
    shared = "\n".join(
        [
            _row("SQLite ledger, state in the process (default)", m["sqlite"], rps=False),
            _row("`ledger.url` PostgreSQL + `state.url` Redis", m["shared"], rps=False),
        ]
    )
    runs = f"{plan['rounds']} x {plan['tput_s']:g} s and {plan['latency_runs']} x {plan['latency_s']:g} s a server"
    ratio = f"**{doc['workers_ratio']:.2f}x**"
    ratio_note = f"{_span(doc['workers_ratio_range'], 'x')}; goal: at least {WORKERS_GOAL}x: {ok[doc['workers_ok']]}"
    added = f"**{doc['shared_added_p50_ms']:+.3f} ms**"
    added_note = (
        f"{_span(doc['shared_added_p50_range_ms'], ' ms')}; goal: within {P50_GOAL_MS} ms: {ok[doc['shared_ok']]}"
    )
    return f"""## Scale-out: several workers, PostgreSQL and Redis (`python -m bench.scale`)

Both servers of each comparison up at once, short runs alternating between them ({runs};
method in bench/scale.py); the tables show medians over runs. Measured {doc["when"]}, load
average at the end {" ".join(doc["loadavg"])}.

| | req/s at {plan["tput_connections"]} in flight | p50 ms | p99 ms | CPU ms / request | errors |
|---|---|---|---|---|---|
{workers}

`--workers 2` serves {ratio} one worker's requests per second (median of each run against its
neighbour; {ratio_note}). CPU per request counts every process of the server (the supervisor,
the workers and their private redis-server).

| one worker on the proxy core, 1 in flight | p50 ms | p99 ms | CPU ms / request | errors |
|---|---|---|---|---|
{shared}

PostgreSQL and Redis add {added} to p50 (median of each run against its neighbour;
{added_note}) and {doc["shared_cpu_delta_ms"]:+.3f} ms of the proxy's CPU per request.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ScalePlan.rounds, help="runs per server (both comparisons)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    plan = QUICK_SCALE if args.quick else ScalePlan(rounds=args.rounds, latency_runs=args.rounds)
    pin_self(LOAD_CORE)  # as `python -m bench`: wrk, nginx, PostgreSQL and Redis inherit the load core
    ensure_apt({"nginx": "nginx", "wrk": "wrk"})
    tool = load.load_tool()
    workdir = RESULTS / "tmp" / f"scale-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        fast, kind = upstream.start_fast_upstream(workdir)
        stack.callback(fast.stop, signal.SIGQUIT if kind == "nginx" else signal.SIGTERM)
        paced = upstream.start_paced_upstream(workdir)
        stack.callback(paced.stop)
        doc = run(tool, f"http://127.0.0.1:{fast.port}", f"http://127.0.0.1:{paced.port}", workdir, plan)
    (RESULTS / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
