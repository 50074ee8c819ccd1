"""What the quality gate costs: in-process with many repetitions, and through `proxy serve`.

- In-process (`micro`): `QualityGate.check_for` + `Check.judge` on a ~2 KB JSON plan answer
  with a json_schema, the same for a held stream (assembled from its deltas first), and what an
  unchecked request pays: the X-Proxy-Check header lookup and a `check_for` that finds nothing to
  check. Blocks of repetitions, the cases interleaved block by block; the median block.
- Through the proxy (`phase`, one of `python -m bench`'s phases): wrk against the `plan2k` tier
  (nginx answers a canned ~2 KB JSON plan completion), the same json_schema request checked
  (no header: the gate validates it) and unchecked (`X-Proxy-Check: off`), sent at the same time
  at the same rate to two identical `proxy serve` processes on the proxy core, which swap roles
  every round; CPU per request of each from /proc, and the median of the per-round differences,
  so the machine's drift over minutes (and any difference between the two processes) cancels out.

`python -m bench.gatecost` prints the in-process figures alone.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from proxy.config import QualitySpec
from proxy.gateway.assembly import StreamAssembly
from proxy.gateway.quality import CHECK_VALUES, QualityGate
from proxy.gateway.routing import _choice
from proxy.sim.answers import PLAN_SCHEMA

if TYPE_CHECKING:
    from bench.__main__ import Bench, System
    from bench.procs import Service

PLAN_TIER = "plan2k"  # the bench proxy's tier on nginx's canned plan route
_ACTIONS = ("gather the facts for", "draft the brief on", "review the budget of", "schedule the launch of")
_CREATED = 1735689600


def plan_content(size: int = 2048) -> str:
    """A JSON plan (valid against PLAN_SCHEMA) of about `size` bytes."""
    steps: list[dict[str, Any]] = []
    doc = {"goal": "ship the quarterly plan on time and within budget", "steps": steps}
    while len(json.dumps(doc, separators=(",", ":"))) < size - 60:
        i = len(steps) + 1
        steps.append({"id": i, "action": f"{_ACTIONS[i % len(_ACTIONS)]} workstream {i}", "done": i % 3 == 0})
    return json.dumps(doc, separators=(",", ":"))


def plan_completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench-plan",
        "object": "chat.completion",
        "created": _CREATED,
        "model": "llama3.1:8b",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": plan_content(), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 180, "completion_tokens": 610, "total_tokens": 790},
    }


def plan_completion_body() -> bytes:
    return json.dumps(plan_completion(), separators=(",", ":")).encode()


def plan_stream_body(deltas: int = 32) -> bytes:
    """The same answer as an SSE stream of `deltas` content pieces (for the held-stream case)."""
    content = plan_content()
    size = -(-len(content) // deltas)
    head = {"id": "chatcmpl-bench-plan", "object": "chat.completion.chunk", "created": _CREATED, "model": "llama3.1:8b"}

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        doc = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": content[i : i + size]}) for i in range(0, len(content), size)]
    events += [event({}, "stop"), b"data: [DONE]\n\n"]
    return b"".join(events)


def schema_body(model: str) -> bytes:
    doc = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You plan projects. Answer with the plan as JSON."},
            {"role": "user", "content": "Plan the quarter: the launch, the budget review, the hiring."},
        ],
        "max_tokens": 1024,
        "response_format": {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _headers(extra: dict[str, str]) -> CIMultiDict[str]:
    base = {"Host": "127.0.0.1:8080", "User-Agent": "OpenAI/Python 1.99.0", "Content-Type": "application/json"}
    return CIMultiDict({**base, "Accept": "application/json", "Content-Length": "412", **extra})


def micro(reps: int = 20_000, blocks: int = 9) -> dict[str, Any]:
    """CPU microseconds per call of the gate's work, median of `blocks` interleaved blocks."""
    gate = QualityGate(QualitySpec())
    plain = orjson.loads(
        b'{"model":"auto","messages":[{"role":"user","content":"Plan my day."}],"max_tokens":256,"temperature":0.2}'
    )
    checked = orjson.loads(schema_body("auto"))
    answer = plan_completion()
    stream = plan_stream_body()
    no_header, off = _headers({}), _headers({"X-Proxy-Check": "off"})

    def unchecked() -> object:  # what every request pays: the header, then nothing to check
        return gate.check_for(plain, _choice(no_header, "X-Proxy-Check", CHECK_VALUES))

    def checked_off() -> object:  # X-Proxy-Check: off on a schema request
        return gate.check_for(checked, _choice(off, "X-Proxy-Check", CHECK_VALUES))

    def schema_answer() -> object:
        check = gate.check_for(checked, _choice(no_header, "X-Proxy-Check", CHECK_VALUES))
        assert check is not None
        return check.judge(answer)

    def schema_stream() -> object:
        check = gate.check_for(checked, _choice(no_header, "X-Proxy-Check", CHECK_VALUES))
        assert check is not None
        assembly = StreamAssembly()
        assembly.feed(stream)
        return check.judge(assembly.doc())

    assert schema_answer() is None and schema_stream() is None, "the canned plan must pass the gate"
    cases: dict[str, Callable[[], object]] = {
        "unchecked_us": unchecked,
        "off_us": checked_off,
        "checked_2kb_schema_us": schema_answer,
        "checked_2kb_schema_stream_us": schema_stream,
    }
    per: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(blocks):
        for name, fn in cases.items():
            n = reps if "unchecked" in name or "off" in name else max(reps // 10, 1)
            t0 = time.thread_time_ns()  # CPU time: other work on the machine does not count
            for _ in range(n):
                fn()
            per[name].append((time.thread_time_ns() - t0) / n / 1000)
    out: dict[str, Any] = {k: statistics.median(v) for k, v in per.items()}
    out["blocks"] = {k: [round(x, 4) for x in v] for k, v in per.items()}
    out["answer_bytes"] = len(answer["choices"][0]["message"]["content"])
    out["stream_bytes"] = len(stream)
    out["reps"] = reps
    return out


def _check_header(url: str, body: bytes, headers: dict[str, str]) -> str | None:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        value: str | None = r.headers.get("X-Proxy-Check")
        return value


def phase(
    bench: Bench, proxy: System, twin: Service, rounds: int, seconds: float, rate: float = 400.0, connections: int = 8
) -> dict[str, Any]:
    """CPU per request of `proxy serve` for the schema-checked 2 KB answer against the same
    unchecked, measured at the same moments: the bench's proxy and an identical twin, both on
    the proxy core, each loaded at `rate` by its own wrk, one sent the checked request and the
    other the unchecked one, swapping every round. Drift of the machine hits both alike, and a
    difference between the two processes cancels over the swaps."""
    from bench import load
    from bench.procs import cpu_seconds

    body = schema_body(PLAN_TIER)
    urls = {"proxy": proxy.plain.url, "twin": f"http://127.0.0.1:{twin.port}/v1/chat/completions"}
    pids = {"proxy": proxy.service.pid, "twin": twin.pid}
    variants = {"checked": {}, "unchecked": {"X-Proxy-Check": "off"}}
    headers = {name: _check_header(urls["proxy"], body, h) for name, h in variants.items()}
    per: dict[str, list[float]] = {name: [] for name in variants}
    diffs: list[float] = []
    errors = 0
    for r in range(rounds):
        roles = {"proxy": "checked", "twin": "unchecked"} if r % 2 == 0 else {"proxy": "unchecked", "twin": "checked"}
        targets = {p: load.Target(f"gate-{p}", urls[p], body, variants[v]) for p, v in roles.items()}
        cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
        results: dict[str, load.LoadResult] = {}
        with ThreadPoolExecutor(1) as pool:  # the twin's wrk runs while the proxy's does
            twin_run = pool.submit(
                load.run,
                bench.tool,
                targets["twin"],
                bench.workdir,
                connections=connections,
                seconds=seconds,
                rate=rate,
            )
            results["proxy"] = bench.wrk(proxy, targets["proxy"], connections, seconds, rate)
            results["twin"] = twin_run.result()
        cpu = {p: (cpu_seconds(pid) - cpu0[p]) * 1e6 / max(results[p].requests, 1) for p, pid in pids.items()}
        errors += sum(res.errors for res in results.values())
        for p, v in roles.items():
            per[v].append(cpu[p])
        diffs.append(per["checked"][-1] - per["unchecked"][-1])
    return {
        "checked_cpu_us": statistics.median(per["checked"]),
        "unchecked_cpu_us": statistics.median(per["unchecked"]),
        "added_cpu_us": statistics.median(diffs),
        "added_cpu_us_rounds": [round(d, 1) for d in diffs],
        "cpu_us_rounds": {k: [round(x, 1) for x in v] for k, v in per.items()},
        "check_header": headers,
        "errors": errors,
        "connections": connections,
        "rate": rate,
        "rounds": rounds,
        "seconds": seconds,
    }


def main() -> None:
    out = micro()
    for k in ("unchecked_us", "off_us", "checked_2kb_schema_us", "checked_2kb_schema_stream_us"):
        print(f"{k:32} {out[k]:8.3f} us")
    print(f"answer {out['answer_bytes']} bytes, stream {out['stream_bytes']} bytes")


if __name__ == "__main__":
    main()
