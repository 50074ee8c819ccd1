"""The economics run's client: the strategic planner's calls, one after another, and what it got.

Each call is a normal plan, a minor re-plan (`X-Replan: minor`) or a complex plan
(`X-Complexity: complex`); plain or streamed; asking for JSON the way the original planner does
(in the prompt, plus `X-Proxy-Check: json`) or with `response_format: json_schema`. The mix is
drawn from a seeded generator, so a seed always sends the same calls in the same order.

Every answer is judged here, independently of the proxy's gate: status 200, not cut at
max_tokens, and the content is a JSON plan of exactly the simulated tiers' shape (a goal and at
least one step, each with an integer id, a string action and a boolean done). The proxy's
`X-Proxy-Check` header is recorded beside the verdict, to count where the two disagree.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy.sim.answers import PLAN_SCHEMA

# (kind, share): one goal in twenty is complex; re-plans after an observation are most of the rest.
MIX: tuple[tuple[str, float], ...] = (("normal", 0.55), ("minor", 0.40), ("complex", 0.05))
_KIND_HEADERS = {"normal": {}, "minor": {"X-Replan": "minor"}, "complex": {"X-Complexity": "complex"}}
_SYSTEM = (
    "You are the strategic planner. Answer with one JSON object and nothing else: "
    '{"goal": string, "steps": [{"id": integer, "action": string, "done": boolean}, ...]}.'
)
_GOALS = ("ship the quarterly plan", "move the launch to March", "hire two engineers", "cut the cloud bill")
_PLAN_KEYS = frozenset(("goal", "steps"))
_STEP_KEYS = frozenset(("id", "action", "done"))


@dataclass(frozen=True, slots=True)
class Call:
    kind: str  # normal | minor | complex
    stream: bool
    ask: str  # "header": JSON asked for in the prompt + X-Proxy-Check: json; "schema": response_format


@dataclass(slots=True)
class Got:
    call: Call
    status: int
    problem: str | None  # None: a usable plan
    tier: str | None
    route: str | None
    check: str | None  # the X-Proxy-Check header as received


@dataclass
class LoadOutcome:
    got: list[Got] = field(default_factory=list)
    seconds: float = 0.0
    rate_asked: float = 0.0


def calls(n: int, seed: int) -> list[Call]:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    return [
        Call(rng.choices(kinds, weights)[0], rng.random() < 0.5, "header" if rng.random() < 0.5 else "schema")
        for _ in range(n)
    ]


def request(call: Call, i: int) -> tuple[bytes, dict[str, str]]:
    goal = _GOALS[i % len(_GOALS)]
    if call.kind == "minor":
        user = f"Plan #{i} to {goal} is under way. New observation: the review moved a day. Adjust the plan."
    else:
        user = f"Make a step-by-step plan (#{i}) to {goal}."
    doc: dict[str, Any] = {
        "model": "auto",
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 400,
        "temperature": 0.2,
    }
    headers = {"Content-Type": "application/json", **_KIND_HEADERS[call.kind]}
    if call.ask == "schema":
        doc["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}}
    else:
        headers["X-Proxy-Check"] = "json"
    if call.stream:
        doc["stream"] = True
    return orjson.dumps(doc), headers


def plan_problem(content: str, finish_reason: object) -> str | None:
    """Why this answer is not a usable plan, or None."""
    if finish_reason == "length":
        return "cut at max_tokens"
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict) or doc.keys() != _PLAN_KEYS or not isinstance(doc["goal"], str):
        return "JSON, not a plan"
    steps = doc["steps"]
    if not isinstance(steps, list) or not steps:
        return "a plan without steps"
    for s in steps:
        if not (isinstance(s, dict) and s.keys() == _STEP_KEYS and type(s["id"]) is int):
            return "a malformed step"
        if not (isinstance(s["action"], str) and isinstance(s["done"], bool)):
            return "a malformed step"
    return None


def judge(body: bytes, stream: bool) -> str | None:
    if not stream:
        try:
            choice = orjson.loads(body)["choices"][0]
            content = choice["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return "not a chat completion"
        return plan_problem(content if isinstance(content, str) else "", choice.get("finish_reason"))
    parts: list[str] = []
    finish: object = None
    done = False
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return "a stream event that is not JSON"
        if not isinstance(event, dict) or "error" in event:
            return "an error event in the stream"
        for c in event.get("choices") or ():
            piece = (c.get("delta") or {}).get("content")
            if isinstance(piece, str):
                parts.append(piece)
            finish = c.get("finish_reason") or finish
    if not done:
        return "a stream without [DONE]"
    return plan_problem("".join(parts), finish)


async def _one(session: aiohttp.ClientSession, url: str, call: Call, i: int) -> Got:
    data, headers = request(call, i)
    try:
        async with session.post(url, data=data, headers=headers) as resp:
            body = await resp.read()
            h = resp.headers
            problem = judge(body, call.stream) if resp.status == 200 else f"HTTP {resp.status}"
            check = h.get("X-Proxy-Check")
            return Got(call, resp.status, problem, h.get("X-Proxy-Tier"), h.get("X-Proxy-Route"), check)
    except (aiohttp.ClientError, TimeoutError) as e:
        return Got(call, 0, f"no answer: {type(e).__name__}", None, None, None)


async def send_all(base: str, planned: list[Call], rate: float, planners: int) -> LoadOutcome:
    """Send `planned` from `planners` planners, each waiting for its answer before its next call
    (the original planner is one of them), none faster than `rate` calls per second in all:
    call i goes out at its slot i / rate, or later when no planner is free. Returns what came back,
    in order."""
    url = f"{base}/v1/chat/completions"
    out = LoadOutcome(rate_asked=rate)
    results: list[Got | None] = [None] * len(planned)
    loop = asyncio.get_running_loop()
    next_call = iter(enumerate(planned))
    connector = aiohttp.TCPConnector(limit=planners)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = loop.time()

        async def planner() -> None:
            for i, call in next_call:  # shared: each call is taken by one planner
                wait = t0 + i / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                results[i] = await _one(session, url, call, i)

        await asyncio.gather(*(planner() for _ in range(planners)))
        out.seconds = loop.time() - t0
    out.got = [g for g in results if g is not None]
    return out


def summary(load: LoadOutcome) -> dict[str, Any]:
    """What the clients received: usable shares overall and per kind of call, the reasons, and
    where the proxy's X-Proxy-Check header and this client's verdict disagree."""
    got = load.got
    n = len(got)

    def share(items: list[Got]) -> float:
        return sum(g.problem is None for g in items) / len(items) if items else float("nan")

    by: dict[str, Any] = {}
    for label, key in (("kind", "kind"), ("stream", "stream"), ("ask", "ask")):
        values = sorted({str(getattr(g.call, key)) for g in got})
        by[label] = {
            v: {"calls": len(sel), "usable": share(sel)}
            for v in values
            if (sel := [g for g in got if str(getattr(g.call, key)) == v])
        }
    problems = Counter(g.problem for g in got if g.problem is not None)
    checks = Counter((g.check or "none").split(";")[0] for g in got)
    return {
        "calls": n,
        "seconds": round(load.seconds, 2),
        "rate_asked": load.rate_asked,
        "rate_achieved": n / load.seconds if load.seconds else 0.0,
        "usable": share(got),
        "unusable": n - sum(g.problem is None for g in got),
        "problems": dict(problems.most_common()),
        "by": by,
        "answered_by": dict(Counter(g.tier or "none" for g in got).most_common()),
        "routes": dict(Counter(g.route or "none" for g in got).most_common()),
        "check_header": dict(checks.most_common()),
        "passed_but_unusable": sum(g.check == "passed" and g.problem is not None for g in got),
        "failed_but_usable": sum((g.check or "").startswith("failed") and g.problem is None for g in got),
    }


def run_load(base: str, planned: list[Call], rate: float, planners: int) -> LoadOutcome:
    return asyncio.run(send_all(base, planned, rate, planners))
