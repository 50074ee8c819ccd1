"""`python -m bench [--quick] [--with-litellm] [--profile] [--no-scale]`: one run, the same load several ways.

direct (the upstream itself), proxy (`proxy serve` with the ledger on), floor (a bare aiohttp
forwarder), litellm (LiteLLM's proxy with the same upstream and a fallback list); then the
scale-out figures (bench/scale.py: `--workers 2`, PostgreSQL + Redis). Results: bench/results/results-{full,quick}.json,
a chart next to it, and BENCHMARKS.md (full runs). See BENCHMARKS.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import gatecost, load, report, scale, targets, upstream
from bench.procs import (
    LOAD_CORE,
    PROXY_CORE,
    Service,
    busy_seconds,
    cpu_seconds,
    ensure_apt,
    memory_mb,
    own_seconds,
    pin_self,
    pinned,
    say,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
USER_TEXT = "Plan my day: three meetings, a launch review at 11 and a budget call; keep lunch free."


@dataclass(frozen=True)
class Plan:
    warmup_s: float = 2
    latency_rounds: int = 5
    latency_s: float = 3
    throughput_s: float = 10
    stream_tput_s: float = 6
    rate_iterations: int = 6
    rate_s: float = 4
    timing_rounds: int = 3
    timing_concurrency: int = 16
    timing_s: float = 5
    hold_levels: tuple[int, ...] = (32, 64, 128, 256, 512)
    hold_s: float = 6
    profile_s: float = 10
    quiet_wait_s: float = 30  # longest wait for other work on the machine to stop before a phase
    spare_s: float = 150  # total time for such waits and for re-running disturbed phases
    gate_rounds: int = 10  # the quality gate's cost: rounds of checked and unchecked at once
    gate_s: float = 2
    gate_reps: int = 20_000  # ... and in-process repetitions per block
    scale: scale.ScalePlan = scale.FULL_SCALE  # --workers 2, PostgreSQL + Redis (bench/scale.py)


QUIET_SHARE = 0.05  # share of the machine's CPU other processes may use during a phase

QUICK = Plan(1, 2, 1, 2, 1, 3, 1, 1, 8, 1.5, (32,), 1.5, 4, 5, 10, 2, 1, 2_000, scale.QUICK_SCALE)


@dataclass
class System:
    name: str
    service: Service
    plain: load.Target
    sse: load.Target  # canned SSE from nginx, for stream throughput
    paced_url: str
    paced_model: str
    stream_pid: int  # the process serving the paced streams (for direct: the paced upstream)
    headers: dict[str, str] = field(default_factory=dict)
    completed: int = 0  # responses finished, for the ledger check
    abandoned: int = 0  # at most this many were in flight when a wrk run stopped
    errors: int = 0  # in the fixed-load runs
    overload_errors: int = 0  # in rate-search and stream-holding steps

    def count(self, r: load.LoadResult, *, overload: bool = False) -> None:
        self.completed += r.requests
        self.abandoned += r.connections
        if overload:
            self.overload_errors += r.errors
        else:
            self.errors += r.errors


class QueueSampler:
    """The proxy's ledger queue depth (GET /metrics) every 100 ms while it is saturated: the
    writer must keep up with the proxy's highest rate, so the queue must stay short."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._depths: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with urllib.request.urlopen(self._url, timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("proxy_ledger_queue_depth "):
                    self._depths.append(float(line.split()[1]))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        d = sorted(self._depths)
        if not d:
            return {"samples": 0}
        return {"samples": len(d), "median": d[len(d) // 2], "max": d[-1]}


def body(model: str, stream: bool = False) -> bytes:
    doc: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": "You plan days."}, {"role": "user", "content": USER_TEXT}],
        "max_tokens": 256,
        "temperature": 0.2,
    }
    if stream:
        doc |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(doc, separators=(",", ":")).encode()


def make_system(name: str, svc: Service, models: tuple[str, str, str], headers: dict[str, str]) -> System:
    base = f"http://127.0.0.1:{svc.port}"
    plain_url = f"{base}/v1/chat/completions"
    sse_url = f"{base}/stream/v1/chat/completions" if name == "direct" else plain_url
    return System(
        name=name,
        service=svc,
        plain=load.Target(name, plain_url, body(models[0]), headers),
        sse=load.Target(name, sse_url, body(models[1], stream=True), headers),
        paced_url=plain_url,
        paced_model=models[2],
        stream_pid=svc.pid,
        headers=headers,
    )


def streams(sys_: System, concurrency: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.streams", "--url", sys_.paced_url, "--concurrency", str(concurrency)]
    argv += ["--seconds", str(seconds), "--body", body(sys_.paced_model, stream=True).decode()]
    for k, v in sys_.headers.items():
        argv += ["--header", f"{k}: {v}"]
    r = subprocess.run(pinned(LOAD_CORE, argv), capture_output=True, text=True, timeout=seconds + 180, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"stream client failed: {r.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if values else float("nan")


class Bench:
    def __init__(self, plan: Plan, tool: str, workdir: Path, systems: list[System], twin: Service) -> None:
        self.plan, self.tool, self.workdir, self.systems = plan, tool, workdir, systems
        self.twin = twin  # a second proxy like the first, for the quality gate's simultaneous A/B
        self.results: dict[str, Any] = {}

    def wrk(self, s: System, target: load.Target, c: int, seconds: float, rate: float | None = None) -> load.LoadResult:
        r = load.run(self.tool, target, self.workdir, connections=c, seconds=seconds, rate=rate)
        s.count(r, overload=rate is not None)
        return r

    def run_all(self, profile: bool) -> dict[str, Any]:
        p = self.plan
        say("warm-up")
        for s in self.systems:
            self.wrk(s, s.plain, 8, p.warmup_s)
        phases = [self.latency, self.throughput, self.gate_cost, self.rates, self.stream_timing, self.stream_holding]
        if profile:
            phases.append(self.profile)
        # Last: wrk cuts the streams in flight when it stops, which the proxy may hold against a tier.
        phases.append(self.stream_throughput)
        pids = {s.service.pid for s in self.systems} | {s.stream_pid for s in self.systems} | {self.twin.pid}
        spare = self.plan.spare_s  # time the whole run may spend waiting for quiet and re-running
        for phase in phases:
            # A phase disturbed by other work on the machine is run once more while time allows
            # (not the last phase: it trips the proxy's breakers, so a rerun would differ).
            for attempt in (1, 2):
                spare -= self.wait_quiet(pids, min(spare, self.plan.quiet_wait_s))
                share, took = self.measured(phase, pids, attempt)
                if share <= QUIET_SHARE or attempt == 2 or phase == self.stream_throughput or took > spare:
                    break
                spare -= took
                say(f"  other processes used {share:.0%} of the machine: running {phase.__name__} again")
            if share > QUIET_SHARE:
                say(f"  WARNING: other processes used {share:.0%} of the machine during {phase.__name__}")
            self.note_breakers(phase.__name__)
        return self.results

    def measured(self, phase: Callable[[], None], pids: set[int], attempt: int) -> tuple[float, float]:
        """Run a phase; record how much CPU other processes (or, as steal, other VMs) used meanwhile."""
        (busy0, steal0), own0, t0 = busy_seconds(), own_seconds(pids), time.monotonic()
        phase()
        (busy, steal), wall = busy_seconds(), time.monotonic() - t0
        foreign = busy - busy0 - (own_seconds(pids) - own0)
        share = (max(foreign, 0.0) + steal - steal0) / (wall * (os.cpu_count() or 1))
        self.results.setdefault("interference", {})[phase.__name__] = {
            "foreign_cpu_s": foreign,
            "steal_s": steal - steal0,
            "wall_s": wall,
            "share": share,
            "attempt": attempt,
        }
        return share, wall

    @staticmethod
    def wait_quiet(pids: set[int], limit: float) -> float:
        """Wait (up to `limit` s) for a second in which other processes use < QUIET_SHARE of the
        machine; returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 + 1 <= limit:
            (busy0, _), own0 = busy_seconds(), own_seconds(pids)
            time.sleep(1.0)
            foreign = busy_seconds()[0] - busy0 - (own_seconds(pids) - own0)
            if foreign / (os.cpu_count() or 1) < QUIET_SHARE:
                return time.monotonic() - t0
        if limit >= 1:
            say(f"  the machine stayed busy with other work for {limit:.0f}s: going on")
        return time.monotonic() - t0

    def note_breakers(self, phase: str) -> None:
        """The proxy's circuit breakers after each phase (GET /readyz), to see what tripped them."""
        proxy = next(s for s in self.systems if s.name == "proxy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proxy.service.port}/readyz", timeout=5) as r:
                tiers = json.load(r)["tiers"]
        except (OSError, ValueError, KeyError) as e:
            tiers = {"error": str(e)}
        states = {t: v.get("breaker") for t, v in tiers.items() if isinstance(v, dict)}
        self.results.setdefault("proxy_breakers_after", {})[phase] = states
        tripped = [t for t, st in states.items() if st != "closed"]
        if tripped:
            say(f"  note: proxy breakers not closed after {phase}: {', '.join(f'{t}={states[t]}' for t in tripped)}")

    def latency(self) -> None:
        say(f"1 request in flight: {self.plan.latency_rounds} interleaved rounds of {self.plan.latency_s:g}s")
        rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.systems}
        for _ in range(self.plan.latency_rounds):
            for s in self.systems:
                rounds[s.name].append(self.wrk(s, s.plain, 1, self.plan.latency_s).to_dict())
        self.results["latency_1"] = {
            name: {
                "p50_ms": _median([r["p50_ms"] for r in rs]),
                "p99_ms": _median([r["p99_ms"] for r in rs]),
                "rounds": rs,
            }
            for name, rs in rounds.items()
        }
        for name, v in self.results["latency_1"].items():
            say(f"  {name:8} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")

    def throughput(self) -> None:
        say(f"32 in flight, {self.plan.throughput_s:g}s")
        tput, res = {}, {}
        for s in self.systems:
            pid = s.service.pid
            cpu0 = cpu_seconds(pid)
            sampler = QueueSampler(s.service.port) if s.name == "proxy" else None
            r = self.wrk(s, s.plain, 32, self.plan.throughput_s)
            if sampler is not None:
                self.results["ledger_queue_at_saturation"] = sampler.stop()
            cpu = cpu_seconds(pid) - cpu0
            tput[s.name] = r.to_dict()
            res[s.name] = {"cpu_ms_per_request": cpu * 1000 / max(r.requests, 1), "cpu_s": cpu, **memory_mb(pid)}
            say(
                f"  {s.name:8} {r.rps:8.0f} req/s (p99 {r.p99_ms:.2f} ms, errors {r.errors}), "
                f"{res[s.name]['cpu_ms_per_request']:.3f} CPU ms/req"
            )
        self.results |= {"throughput_32": tput, "resources": res}

    def gate_cost(self) -> None:
        p = self.plan
        say(f"quality gate: in-process, then {p.gate_rounds} rounds of {p.gate_s:g}s checked and unchecked at once")
        micro = gatecost.micro(p.gate_reps)
        proxy = next(s for s in self.systems if s.name == "proxy")
        e2e = gatecost.phase(self, proxy, self.twin, p.gate_rounds, p.gate_s)
        self.results["gate_cost"] = {"micro": micro, "e2e": e2e}
        say(
            f"  in-process: unchecked {micro['unchecked_us']:.2f} us, checked 2 KB + schema "
            f"{micro['checked_2kb_schema_us']:.1f} us (held stream {micro['checked_2kb_schema_stream_us']:.1f} us)"
        )
        say(
            f"  proxy CPU/request: checked {e2e['checked_cpu_us']:.0f} us, unchecked {e2e['unchecked_cpu_us']:.0f} us, "
            f"added {e2e['added_cpu_us']:.1f} us (rounds {e2e['added_cpu_us_rounds']})"
        )

    def stream_throughput(self) -> None:
        say(f"canned SSE streams, 32 in flight, {self.plan.stream_tput_s:g}s")
        out = {}
        for s in self.systems:
            pid = s.service.pid
            cpu0 = cpu_seconds(pid)
            r = self.wrk(s, s.sse, 32, self.plan.stream_tput_s)
            self.results["resources"][s.name]["cpu_ms_per_stream"] = (
                (cpu_seconds(pid) - cpu0) * 1000 / max(r.requests, 1)
            )
            out[s.name] = r.to_dict()
            say(f"  {s.name:8} {r.rps:8.0f} streams/s (p99 {r.p99_ms:.2f} ms, errors {r.errors})")
        self.results["stream_throughput_32"] = out

    def rates(self) -> None:
        say("highest constant rate with p99 < 10 ms (bisection below the 32-in-flight throughput)")
        out = {}
        for s in self.systems:
            ceiling = self.results["throughput_32"][s.name]["rps"]
            rs = load.rate_search(
                self.tool,
                s.plain,
                self.workdir,
                ceiling=ceiling,
                limit_ms=10.0,
                iterations=self.plan.rate_iterations,
                seconds=self.plan.rate_s,
            )
            for step in rs.steps:
                s.count(step, overload=True)
            out[s.name] = rs.to_dict()
        self.results["rate_p99_10ms"] = out

    def stream_timing(self) -> None:
        p = self.plan
        say(f"paced streams, {p.timing_concurrency} in flight: {p.timing_rounds} interleaved rounds of {p.timing_s:g}s")
        rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.systems}
        for _ in range(p.timing_rounds):
            for s in self.systems:
                r = streams(s, p.timing_concurrency, p.timing_s)
                s.completed += r["streams"] + r["errors"]
                s.errors += r["errors"]
                rounds[s.name].append(r)
        out = {}
        for name, rs in rounds.items():
            out[name] = {
                "ttft_p50_ms": _median([r["ttft_ms"].get("p50", float("nan")) for r in rs]),
                "gap_p50_ms": _median([r["gap_ms"].get("p50", float("nan")) for r in rs]),
                "gap_p99_ms": _median([r["gap_ms"].get("p99", float("nan")) for r in rs]),
                # round-to-round spread: how far apart two runs of the same thing land
                "gap_p50_spread_ms": _spread([r["gap_ms"].get("p50", float("nan")) for r in rs]),
                "rounds": rs,
            }
            v = out[name]
            ttft, g50, g99 = v["ttft_p50_ms"], v["gap_p50_ms"], v["gap_p99_ms"]
            say(f"  {name:8} ttft p50 {ttft:.3f} ms, gap p50 {g50:.3f} ms, gap p99 {g99:.3f} ms")
        self.results["stream_timing"] = out

    def stream_holding(self) -> None:
        """Step concurrency; a step is held with no errors and gap p99 at most 5 ms above direct's at
        that step; where direct's own gap p99 passes 30 ms the load core is the limit and a step
        counts as inconclusive (see report.derive_held). A system stops at its first failed step."""
        p = self.plan
        say(f"paced streams held: concurrency {', '.join(map(str, p.hold_levels))}, {p.hold_s:g}s each")
        out: dict[str, Any] = {s.name: {"levels": []} for s in self.systems}
        failed: set[str] = set()
        for c in p.hold_levels:
            ref_p99 = math.inf
            for s in self.systems:
                if s.name in failed:
                    continue
                pid = s.stream_pid
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                r = streams(s, c, p.hold_s)
                r["server_cpu_util"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
                s.completed += r["streams"] + r["errors"]
                s.overload_errors += r["errors"]
                if s.name == "direct":
                    ref_p99 = r["gap_ms"].get("p99", math.inf)
                ok, saturated = report.level_verdict(r, ref_p99)
                out[s.name]["levels"].append(r)
                if not ok and s.name != "direct":
                    failed.add(s.name)
                verdict = "reference" if s.name == "direct" else "held" if ok else "NOT held"
                if saturated:
                    verdict += " (inconclusive: load side saturated)"
                say(
                    f"  {s.name:8} {c:4} streams: gap p99 {r['gap_ms'].get('p99', math.nan):7.2f} ms "
                    f"(+{r['added_gap_p99_ms']:.2f}), errors {r['errors']}, "
                    f"server CPU {r['server_cpu_util'] * 100:.0f}% -> {verdict}"
                )
        self.results["streams_held"] = out
        report.derive_held(self.results)

    def profile(self) -> None:
        self.results["profile"] = self._profile(self.plan.profile_s)

    def _profile(self, seconds: float) -> dict[str, Any] | None:
        proxy = next(s for s in self.systems if s.name == "proxy")
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            say(f"py-spy is missing: installing it into {sys.prefix} (optional dependency group `bench`)")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
            if not Path(spy).exists():
                say("py-spy could not be installed: no profile")
                return None
        raw = self.workdir / "proxy-profile.txt"
        say(f"profiling the proxy with py-spy for {seconds:g}s at 32 in flight")
        argv = [spy, "record", "--pid", str(proxy.service.pid), "--format", "raw", "--nonblocking"]
        argv += ["--duration", str(int(seconds)), "--rate", "250", "-o", str(raw)]
        with subprocess.Popen(pinned(LOAD_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as spy_proc:
            time.sleep(1.0)
            r = self.wrk(proxy, proxy.plain, 32, seconds - 1)
            _, err = spy_proc.communicate(timeout=seconds + 60)
        if not raw.exists():
            say(f"py-spy wrote no profile: {err.decode()[-500:]}")
            return None
        summary = report.summarize_profile(raw.read_text())
        summary |= {"rps_while_profiling": r.rps, "raw": str(raw)}
        say(f"  {summary['samples']} samples at {r.rps:.0f} req/s; top own time:")
        for name, share in summary["self"][:8]:
            say(f"    {share:6.1%}  {name}")
        return summary


def _ensure_pip(dist: str, module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        say(f"{dist} is missing: installing it into {sys.prefix} (optional dependency group `bench`)")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", dist], capture_output=True, check=False)
        return r.returncode == 0
    return True


def machine(fast_kind: str, tool: str, with_litellm: bool) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def deb(name: str) -> str | None:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True, check=False)
        return r.stdout.strip() or None if r.returncode == 0 else None

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": pkg("aiohttp"),
        "uvloop": pkg("uvloop"),
        "nginx": deb("nginx") if fast_kind == "nginx" else None,
        "wrk": deb("wrk") if tool == "wrk" else None,
        "hey": deb("hey") if tool == "hey" else None,
        "litellm": targets.litellm_installed_version() if with_litellm else None,
        "proxy_commit": commit.stdout.strip() or None,
        "proxy_uncommitted_changes": bool(
            subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "proxy"], capture_output=True, text=True
            ).stdout.strip()
        ),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "upstream": fast_kind,
        "load_tool": tool,
        "pinning": {"proxy_and_litellm": f"core {PROXY_CORE}", "upstream_load_clients": f"core {LOAD_CORE}"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 minute)")
    parser.add_argument("--with-litellm", action="store_true", help="also measure LiteLLM's proxy (installs it)")
    parser.add_argument("--profile", action="store_true", help="finish with a py-spy profile of the proxy")
    parser.add_argument("--no-scale", action="store_true", help="skip --workers 2 and PostgreSQL + Redis")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    started = time.monotonic()
    pin_self(LOAD_CORE)
    ensure_apt({"nginx": "nginx", "wrk": "wrk"})
    if shutil.which("wrk") is None:
        ensure_apt({"hey": "hey"})
    tool = load.load_tool()
    _ensure_pip("matplotlib", "matplotlib")
    if args.with_litellm:
        targets.ensure_litellm()
    kind = "quick" if args.quick else "full"
    workdir = RESULTS / "tmp" / datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    say(f"scratch dir (configs, logs): {workdir}")

    with contextlib.ExitStack() as stack:
        fast, fast_kind = upstream.start_fast_upstream(workdir)
        stack.callback(fast.stop, signal.SIGQUIT if fast_kind == "nginx" else signal.SIGTERM)
        paced = upstream.start_paced_upstream(workdir)
        stack.callback(paced.stop)
        fast_url, paced_url = f"http://127.0.0.1:{fast.port}", f"http://127.0.0.1:{paced.port}"
        direct = make_system("direct", fast, ("llama3.1:8b", "llama3.1:8b", "llama3.1:8b"), {})
        direct.paced_url, direct.stream_pid = f"{paced_url}/v1/chat/completions", paced.pid
        proxy_svc = targets.start_proxy(fast_url, paced_url, workdir)
        stack.callback(proxy_svc.stop)
        (workdir / "twin").mkdir()
        twin = targets.start_proxy(fast_url, paced_url, workdir / "twin")
        stack.callback(twin.stop)
        systems = [direct, make_system("proxy", proxy_svc, ("auto", "sse", "paced"), {})]
        floor = targets.start_floor(fast_url, paced_url, workdir)
        stack.callback(floor.stop)
        systems.append(make_system("floor", floor, ("auto", "sse", "paced"), {}))
        if args.with_litellm:
            ll = targets.start_litellm(fast_url, paced_url, workdir)
            stack.callback(ll.stop)
            auth = {"Authorization": f"Bearer {targets.LITELLM_KEY}"}
            systems.append(make_system("litellm", ll, ("bench", "bench-sse", "bench-paced"), auth))
        say(f"upstream: {fast_kind}; load: {tool}; systems: {', '.join(s.name for s in systems)}")
        bench = Bench(plan, tool, workdir, systems, twin)
        results: dict[str, Any] = {"meta": machine(fast_kind, tool, args.with_litellm) | {"run": kind}}
        results |= bench.run_all(args.profile)
        if not args.no_scale:
            Bench.wait_quiet({s.service.pid for s in systems}, plan.quiet_wait_s)
            results["scale"] = scale.run(tool, fast_url, paced_url, workdir / "scale", plan.scale)
        results["resources_after"] = {s.name: memory_mb(s.service.pid) for s in systems}
        code = proxy_svc.stop(signal.SIGTERM)
        proxy = systems[1]
        rows = targets.ledger_rows(workdir)
        results["ledger"] = {
            "rows": rows,
            "completed": proxy.completed,
            "max_abandoned": proxy.abandoned,
            "proxy_exit_code": code,
            "status": "n/a"
            if rows is None
            else ("ok" if proxy.completed <= rows <= proxy.completed + proxy.abandoned else "MISMATCH"),
        }
        log = (workdir / "proxy.log").read_text(errors="replace")
        results["proxy_log"] = {"tracebacks": log.count("Traceback"), "errors": log.count(" ERROR ")}
        results["errors"] = {s.name: {"fixed_load": s.errors, "overload_steps": s.overload_errors} for s in systems}
        results["meta"]["plan"] = plan.__dict__ | {"hold_levels": list(plan.hold_levels)}
        results["meta"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
        results["checks"] = report.checks(results)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"results-{kind}.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart = RESULTS / f"chart-{kind}.png"
    report.chart(results, chart)
    text = report.markdown(results, out.relative_to(ROOT), chart.relative_to(ROOT))
    if kind == "full":
        (ROOT / "BENCHMARKS.md").write_text(text)
    print(report.table(results))
    print(report.checks_text(results))
    say(f"wrote {out.relative_to(ROOT)}, {chart.relative_to(ROOT)}" + (", BENCHMARKS.md" if kind == "full" else ""))
    say(f"done in {results['meta']['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
