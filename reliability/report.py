"""Run the reliability tests and turn what they recorded into RELIABILITY.md.

Three sources, all written by the tests themselves:

- pytest's --junitxml: each case's result (pass, xfail = known bug, fail, skip) and duration;
- $RELIABILITY_OBSERVATIONS (JSON lines, tests/support/faults.py `Observation`): per case, the
  fault in words, what the client got, the upstream hits and the ledger rows;
- $SOAK_RESULTS_JSON (tests/test_soak.py) and $FUZZ_REPORT (tests/test_fuzz.py, when that file
  exists; any JSON object, shown key by key; $FUZZ_RESULTS_JSON names the same file).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reliability.adversarial import FILES as ADVERSARIAL_FILES
from reliability.adversarial import section as adversarial_section

REPO = Path(__file__).resolve().parents[1]
FAULTS = "tests/test_faults.py"
SOAK = "tests/test_soak.py"
FUZZ = "tests/test_fuzz.py"
# The names the tests read (tests/support/faults.py OBSERVATIONS_ENV, tests/test_soak.py).
OBSERVATIONS_ENV = "RELIABILITY_OBSERVATIONS"
SOAK_ENV = "SOAK_RESULTS_JSON"
FUZZ_ENVS = ("FUZZ_REPORT", "FUZZ_RESULTS_JSON")

SECTIONS = (
    ("Upstream faults", "upstream"),
    ("Client faults", "client"),
    ("Process and disk faults", "process"),
)


@dataclass(frozen=True, slots=True)
class Case:
    nodeid: str
    file: str
    function: str
    param: str | None
    result: str  # pass, xfail, fail, skip
    message: str
    seconds: float

    @property
    def name(self) -> str:
        return self.param or self.function.removeprefix("test_").replace("_", "-")

    @property
    def section(self) -> str:
        if self.file != FAULTS:
            return self.file
        if self.function in ("test_upstream_fault", "test_unreachable_primary"):
            return "upstream"
        if self.function.startswith("test_client_"):
            return "client"
        return "process"


@dataclass(slots=True)
class Run:
    cases: list[Case]
    observations: dict[str, dict[str, Any]]
    soak: dict[str, Any] | None
    fuzz: Any
    fuzz_present: bool
    exit_code: int
    wall_seconds: float
    started: datetime
    commit: str
    files: list[str] = field(default_factory=list)


def run_suite(artifacts: Path | None, soak_requests: int | None, extra: list[str]) -> Run:
    """Run pytest on the reliability tests; collect everything they wrote."""
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        out = artifacts or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / f"{name}.json" for name in ("soak", "fuzz")}
        observations = out / "observations.jsonl"
        junit = out / "junit.xml"
        for p in (*paths.values(), observations, junit):
            p.unlink(missing_ok=True)
        files = [FAULTS, *ADVERSARIAL_FILES, SOAK]
        fuzz_present = (REPO / FUZZ).exists()
        if fuzz_present:
            files.append(FUZZ)
        env = {
            **os.environ,
            OBSERVATIONS_ENV: str(observations),
            SOAK_ENV: str(paths["soak"]),
            **dict.fromkeys(FUZZ_ENVS, str(paths["fuzz"])),
        }
        if soak_requests is not None:
            env["SOAK_REQUESTS"] = str(soak_requests)
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
        print("+", " ".join(cmd), flush=True)
        started = datetime.now(UTC)
        t0 = time.monotonic()
        code = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
        wall = time.monotonic() - t0
        return Run(
            cases=parse_junit(junit) if junit.exists() else [],
            observations=load_observations(observations),
            soak=_load_json(paths["soak"]),
            fuzz=_load_json(paths["fuzz"]),
            fuzz_present=fuzz_present,
            exit_code=code,
            wall_seconds=wall,
            started=started,
            commit=_commit(),
            files=files,
        )


def _load_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return {"unreadable": f"{path.name}: {e}"}


def load_observations(path: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                obs = json.loads(line)
                found[obs["nodeid"]] = obs
    return found


def parse_junit(path: Path) -> list[Case]:
    cases: list[Case] = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        file = classname.replace(".", "/") + ".py"
        function, _, param = name.partition("[")
        result, message = "pass", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                result, message = "fail", child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                result, message = ("xfail" if xfail else "skip"), child.get("message", "")
        cases.append(
            Case(
                nodeid=f"{file}::{name}",
                file=file,
                function=function,
                param=param.rstrip("]") or None,
                result=result,
                message=message,
                seconds=float(tc.get("time", "0") or 0),
            )
        )
    return cases


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------------- Markdown


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "—"


def _result(case: Case) -> str:
    return {
        "pass": "pass",
        "xfail": "**known bug** (xfail)",
        "fail": "**FAIL**",
        "skip": f"skipped: {case.message.removeprefix('Skipped: ')}",
    }[case.result]


def _hits(hits: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in hits.items()) if hits else "—"


def _counts(cases: list[Case]) -> str:
    names = {"pass": "pass", "xfail": "known bugs", "fail": "fail", "skip": "skipped"}
    found = {r: sum(c.result == r for c in cases) for r in names}
    return ", ".join(f"{found[r]} {n}" for r, n in names.items() if found[r])


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def render(run: Run) -> str:
    lines: list[str] = []
    add = lines.append
    counts = {r: sum(c.result == r for c in run.cases) for r in ("pass", "xfail", "fail", "skip")}
    add("# Reliability")
    add("")
    add("<!-- Generated by `python -m reliability` (reliability/report.py); do not edit by hand. -->")
    add("")
    add(
        "Regenerate with **`python -m reliability`** from the repository root (test extras installed: "
        "`pip install -e '.[test]'`; Linux; root for the read-only, disk-full and tmpfs cases, which are "
        "skipped otherwise). It runs `tests/test_faults.py`, `tests/test_adversarial.py` and the other checks of the "
        "money and secret promises, `tests/test_soak.py` and, when it exists, "
        "`tests/test_fuzz.py` against the real `proxy serve` process and rewrites this file. A longer soak: "
        "`python -m reliability --soak-requests 100000`."
    )
    add("")
    add(
        f"Last run: {run.started:%Y-%m-%d %H:%M} UTC, commit {run.commit}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; pytest exit code {run.exit_code} after {run.wall_seconds:.1f} s "
        f"({', '.join(f'`{f}` {sum(c.seconds for c in run.cases if c.file == f):.1f} s' for f in run.files)})."
    )
    add("")
    add(
        f"**{len(run.cases)} cases: {counts['pass']} pass, {counts['xfail']} known bugs (strict xfail), "
        f"{counts['fail']} fail, {counts['skip']} skipped**"
        + (" (" + "; ".join(f"`{f}`: {_counts([c for c in run.cases if c.file == f])}" for f in run.files) + ")")
        + "."
    )
    add("")
    _known_bugs(run, add)
    add("## Fault matrix")
    add("")
    add(
        "Each case goes through `proxy serve` in front of three simulated tiers, chain "
        "`llama -> ollama -> kimi`: tier timeout 0.5 s, stream idle timeout 0.3 s, 2 attempts per tier and 5 "
        "per request, backoff 10-50 ms, request deadline 3 s, `max_response_bytes` 32 KiB, "
        "`body_read_timeout_seconds` 0.3 s, `idle_timeout_seconds` 2 s. Each checks the client's answer "
        "(status, OpenAI error format, "
        "`X-Proxy-Tier`/`X-Proxy-Attempts`, the SSE error event once a stream has started), the upstream hits, "
        "the ledger rows (`requests` outcome/status, `attempts` `tier:outcome`) and that a normal request is "
        "served afterwards. *Client got* and *ledger* are what this run observed, also for known bugs."
    )
    add("")
    for title, key in SECTIONS:
        cases = [c for c in run.cases if c.section == key]
        if not cases:
            continue
        add(f"### {title}")
        add("")
        add("| case | fault and expected handling | result | client got | upstream hits | ledger |")
        add("|---|---|---|---|---|---|")
        for c in cases:
            obs = run.observations.get(c.nodeid, {})
            extra = obs.get("extra") or {}
            got = obs.get("client", "")
            if "seconds" in extra:
                got = f"{got} in {extra['seconds']} s"
            if "llama_raw_bytes_sent" in extra:
                got += f" (llama wrote {extra['llama_raw_bytes_sent']:,} bytes before the proxy gave up)"
            add(
                f"| `{c.name}` | {_cell(obs.get('description', c.function))} | {_result(c)} | {_cell(got)} "
                f"| {_cell(_hits(obs.get('hits', {})))} | {_cell(obs.get('ledger', ''))} |"
            )
        add("")
    adversarial_section(run.cases, run.observations, add)
    _soak(run, add)
    _fuzz(run, add)
    return "\n".join(lines).rstrip() + "\n"


def _known_bugs(run: Run, add: Any) -> None:
    bugs = [c for c in run.cases if c.result == "xfail" and c.file != FUZZ]
    failed = [c for c in run.cases if c.result == "fail"]
    if failed:
        add("## Failing")
        add("")
        for c in failed:
            add(f"- `{c.nodeid}`: {_cell(c.message.splitlines()[0] if c.message else 'failed')}")
        add("")
    if bugs:
        add("## Known bugs (fault matrix and soak)")
        add("")
        add(
            "Each is a test asserting the correct behaviour, marked `xfail(strict=True)` until the proxy is fixed "
            "(the fuzzing's own are listed under Fuzzing):"
        )
        add("")
        for c in bugs:
            add(f"- `{c.name}`: {_cell(c.message.removeprefix('reason: '))}")
        add("")


def _soak(run: Run, add: Any) -> None:
    add("## Soak with random faults")
    add("")
    case = next((c for c in run.cases if c.file == SOAK), None)
    s = run.soak
    if case is None or s is None:
        add("Not run." if case is None else f"Result: {_result(case)}; it wrote no numbers.")
        add("")
        return
    led, ans, rss, fds = s["ledger"], s["answer_seconds"], s["rss_kb"], s["open_fds"]
    rates = ", ".join(f"{k.replace('_', ' ')} {_pct(v)}" for k, v in s["fault_rates"].items())
    drawn = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s["faults_drawn"].items())
    add(
        f"`tests/test_soak.py` (`SOAK_REQUESTS`, `SOAK_CONCURRENCY`, `SOAK_SEED`): **{_result(case)}** in "
        f"{case.seconds:.1f} s."
    )
    add("")
    add("| | |")
    add("|---|---|")
    rows = [
        (
            "requests",
            f"{s['requests']:,} (after a warm-up of {s['warmup_requests']:,}) at concurrency {s['concurrency']}, "
            f"half streaming, seed {s['seed']}",
        ),
        ("fault rates per upstream hit", rates),
        ("faults drawn (warm-up included)", drawn),
        (
            "tier timeout / request deadline",
            f"{s['tier_timeout_seconds']} s / {s['request_deadline_seconds']} s",
        ),
        ("upstream hits", _hits(s["upstream_hits"])),
        ("answers", ", ".join(f"{k} {v:,}" for k, v in s["outcomes"].items())),
        ("invalid answers (neither a completion, a finished stream nor an OpenAI error)", s["invalid"]),
        (
            "time to answer, all requests",
            f"p50 {ans['p50']} s, p99 {ans['p99']} s, max {ans['max']} s (limit {ans['limit']} s)",
        ),
        ("throughput", f"{s['requests_per_second']:,} requests/s over {s['seconds']} s"),
        (
            "ledger `requests` rows",
            f"{led['requests_rows']:,} for {led['requests_sent']:,} requests sent; spilled {led['spilled_rows']}; "
            f"**rows lost: {led['rows_lost']}**",
        ),
        ("ledger `attempts` rows", f"{led['attempts_rows']:,} for {led['upstream_hits']:,} upstream hits"),
        (
            "proxy RSS after warm-up / during / after soak",
            f"{rss['after_warmup']:,} kB / "
            + ", ".join(f"{p['rss_kb']:,} kB at {p['requests']:,}" for p in rss.get("during", []))
            + f" / {rss['after_soak']:,} kB",
        ),
        (
            "proxy open fds after warm-up / after soak",
            f"{fds['after_warmup']} / {fds['after_soak']}: upstream keep-alive pool "
            f"{fds['upstream_pool_after_warmup']} / {fds['upstream_pool_after_soak']}, everything else "
            f"{fds['other_after_warmup']} / {fds['other_after_soak']}",
        ),
        ("exit code after SIGTERM", s["exit_code"]),
        ("unhandled exceptions in the proxy's log", s.get("unhandled_exceptions_logged", "not counted")),
    ]
    for k, v in rows:
        add(f"| {k} | {_cell(v)} |")
    add("")
    add(
        "RSS is compared with the level after a warm-up of the same shape (the allocator keeps the arenas it "
        "grew): allowed +10% + 8 MiB for soaks up to 10,000 requests. At any length the last quarter may add at "
        "most 8 MiB over the highest level before it: long soaks rise in steps and level off (80,000 requests: "
        "52 -> 77 MB, flat over the last 20,000; tracemalloc saw < 1 MB of Python objects added per 15,000 "
        "requests), while a leak of more than ~330 bytes per request over 100,000 requests would fail. "
        "Descriptors other than pooled upstream connections must come back within 5; idle upstream connections "
        "stay pooled for 30 s, at most one per concurrent request per tier."
    )
    add("")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix or "value", value)]


def _fuzz(run: Run, add: Any) -> None:
    add("## Fuzzing")
    add("")
    if not run.fuzz_present:
        add(f"Not run: `{FUZZ}` is not in this checkout.")
        add("")
        return
    cases = [c for c in run.cases if c.file == FUZZ]
    add(f"`{FUZZ}`: {len(cases)} tests ({_counts(cases)}) in {sum(c.seconds for c in cases):.1f} s.")
    add("")
    if run.fuzz is None:
        add(f"It wrote no counts to `${FUZZ_ENVS[0]}`.")
        add("")
    else:
        add("| count | value |")
        add("|---|---|")
        for k, v in _flatten(run.fuzz):
            shown = f"{len(v)} (below)" if isinstance(v, list) and v and k == "failed_tests" else v
            if isinstance(shown, list):
                shown = ", ".join(str(x) for x in shown) or "none"
            add(f"| {_cell(k)} | {_cell(shown)} |")
        add("")
    reasons: dict[str, list[str]] = {}
    for c in cases:
        if c.result == "xfail":
            reasons.setdefault(c.message.removeprefix("reason: "), []).append(c.name)
    if reasons:
        add("Known bugs the fuzzing pins (strict xfail), by reason:")
        add("")
        for reason, names in reasons.items():
            add(f"- {_cell(reason)} ({len(names)}: {', '.join(f'`{_cell(n)}`' for n in names)})")
        add("")
    failed = [c for c in cases if c.result == "fail"]
    if failed:
        add("Failing: " + ", ".join(f"`{c.nodeid}`" for c in failed))
        add("")
