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

Each round starts every configuration afresh, in turn, so the machine's drift (±30% over minutes
here) hits them alike; figures are medians over rounds. PostgreSQL and Redis are the tests' own
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


@dataclass(frozen=True)
class ScalePlan:
    rounds: int = 3
    tput_s: float = 6
    tput_connections: int = 32
    latency_runs: int = 3
    latency_s: float = 4


FULL_SCALE = ScalePlan()
QUICK_SCALE = ScalePlan(1, 2, 32, 1, 1.5)


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


def _throughput(tool: str, up: Upstreams, workdir: Path, plan: ScalePlan, workers: int) -> dict[str, float]:
    svc = _serve(up, workdir, workers=workers)
    try:
        t = _target(svc)
        load.run(tool, t, workdir, connections=plan.tput_connections, seconds=1)  # warm-up
        c0 = cpu_seconds(svc.pid)
        r = load.run(tool, t, workdir, connections=plan.tput_connections, seconds=plan.tput_s)
        cpu = cpu_seconds(svc.pid) - c0
        return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "cpu_ms": _per(cpu, r)}
    finally:
        svc.stop()


def _latency(tool: str, up: Upstreams, workdir: Path, plan: ScalePlan, *, shared: bool) -> list[dict[str, float]]:
    svc = _serve(up, workdir, shared=shared, pin=True)
    try:
        t = _target(svc)
        load.run(tool, t, workdir, connections=4, seconds=1)  # warm-up: connections, prepared statements
        rows = []
        for _ in range(plan.latency_runs):
            c0 = cpu_seconds(svc.pid)
            r = load.run(tool, t, workdir, connections=1, seconds=plan.latency_s)
            rows.append(
                {
                    "p50_ms": r.p50_ms,
                    "p99_ms": r.p99_ms,
                    "errors": r.errors,
                    "cpu_ms": _per(cpu_seconds(svc.pid) - c0, r),
                }
            )
        return rows
    finally:
        svc.stop()


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
    with backends(workdir) as (pg_url, redis_url):
        up = Upstreams(fast, paced, pg_url, redis_url)
        for i in range(plan.rounds):
            say(f"scale: round {i + 1}/{plan.rounds}")
            rows["one_worker"].append(_throughput(tool, up, workdir / f"w1-{i}", plan, 1))
            rows["two_workers"].append(_throughput(tool, up, workdir / f"w2-{i}", plan, 2))
            rows["sqlite"] += _latency(tool, up, workdir / f"sqlite-{i}", plan, shared=False)
            rows["shared"] += _latency(tool, up, workdir / f"shared-{i}", plan, shared=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    ratio = med["two_workers"]["rps"] / med["one_worker"]["rps"]
    added = med["shared"]["p50_ms"] - med["sqlite"]["p50_ms"]
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": plan.__dict__,
        "rows": rows,
        "medians": med,
        "workers_ratio": ratio,
        "workers_ok": ratio >= WORKERS_GOAL,
        "shared_added_p50_ms": added,
        "shared_ok": added <= P50_GOAL_MS,
        "shared_cpu_delta_ms": med["shared"]["cpu_ms"] - med["sqlite"]["cpu_ms"],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def _row(label: str, m: dict[str, float], *, rps: bool) -> str:
    cells = [f"{m['rps']:,.0f}"] if rps else []
    cells += [f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}", f"{m['cpu_ms']:.3f}", f"{m['errors']:.0f}"]
    return "| " + " | ".join([label, *cells]) + " |"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["medians"]
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
    return f"""## Scale-out: several workers, PostgreSQL and Redis (`python -m bench.scale`)

Medians over {doc["plan"]["rounds"]} rounds; in each round every configuration is started afresh, in turn
(method in bench/scale.py). Measured {doc["when"]}, load average at the end {" ".join(doc["loadavg"])}.

| | req/s at {doc["plan"]["tput_connections"]} in flight | p50 ms | p99 ms | CPU ms / request | errors |
|---|---|---|---|---|---|
{workers}

`--workers 2` serves **{doc["workers_ratio"]:.2f}x** one worker's requests per second (goal: at least
{WORKERS_GOAL}x: {ok[doc["workers_ok"]]}). CPU per request counts every process of the server (the
supervisor, the workers and their private redis-server).

| one worker on the proxy core, 1 in flight | p50 ms | p99 ms | CPU ms / request | errors |
|---|---|---|---|---|
{shared}

PostgreSQL and Redis add **{doc["shared_added_p50_ms"]:+.3f} ms** to p50 (goal: within {P50_GOAL_MS} ms:
{ok[doc["shared_ok"]]}) and {doc["shared_cpu_delta_ms"]:+.3f} ms of the proxy's CPU per request.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ScalePlan.rounds)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    plan = QUICK_SCALE if args.quick else ScalePlan(rounds=args.rounds)
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
