"""What the quality gate's end-to-end tests share (tests/test_quality_e2e.py, tests/test_quality_smollm2.py):
the client's pydantic models, the simulated tiers' good and bad answers, the real `proxy serve`
in front of them, an openai SDK client that keeps every response's headers, and ledger reads."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
from pydantic import BaseModel, Field

from proxy.sim import Behaviour
from proxy.sim.answers import plan_json
from tests.support.faults import KIMI_ENV, SimThread, ledger_rows, proxy_config, tiers_for
from tests.support.proc import ProxyProc

# ---------------------------------------------------------------------------- the client's models


class Step(BaseModel):
    id: int
    action: str
    done: bool


class Plan(BaseModel):
    """What the planner asks for; the simulated tiers' good plans (sim/answers.py) are these."""

    goal: str
    steps: list[Step]


class Save(BaseModel):
    """A tool, offered with openai.pydantic_function_tool (strict: both arguments required)."""

    path: str
    text: str


class Brief(BaseModel):
    """A plan small enough for a 135M model to write under llama.cpp's grammar in a few dozen tokens."""

    goal: str = Field(max_length=60)
    done: bool


# ---------------------------------------------------------------------------- simulated answers

PLAN = plan_json(random.Random(7))
GOOD = Behaviour(content=PLAN)
PROSE = Behaviour(content=f"Sure! Here is the plan:\n{PLAN}\nAnything else?")
CUT = Behaviour(content=PLAN[:25], finish_reason="length")
SAVED = Behaviour(tool_calls=[("Save", '{"path": "notes.txt", "text": "ship it"}')])
SAVE_MISSING_TEXT = Behaviour(tool_calls=[("Save", '{"path": "notes.txt"}')])
KIMI_PRICE = {"input_per_mtok": 1, "output_per_mtok": 2}


# ---------------------------------------------------------------------------- the proxy and its client


@dataclass
class Proxies:
    """`proxy serve` processes for one test, each with its own ledger; all stopped at the end."""

    tmp_path: Path
    sims: SimThread
    started: list[ProxyProc] = field(default_factory=list)

    def start(self, tiers: dict[str, Any] | None = None, **sections: dict[str, Any]) -> ProxyProc:
        """In front of the SimThread's llama, ollama and kimi (sub-second timeouts; kimi paid
        and priced), `tiers` changing some of them, `sections` added to the config."""
        urls = {name: sim.url for name, sim in self.sims.sims.items()}
        changes = {"kimi": {"price": KIMI_PRICE}}
        for name, values in (tiers or {}).items():
            changes[name] = {**changes.get(name, {}), **values}
        workdir = self.tmp_path / f"proxy-{len(self.started)}"
        config = proxy_config(urls, workdir / "ledger.db", tiers=tiers_for(urls, **changes), **sections)
        proc = ProxyProc.start(workdir, config, KIMI_ENV)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.started:
            proc.terminate()


@contextmanager
def proxies(tmp_path: Path, sims: SimThread) -> Iterator[Proxies]:
    made = Proxies(tmp_path, sims)
    try:
        yield made
    finally:
        made.stop()


@dataclass
class Seen:
    """Every HTTP response an SDK client got: its status and headers (stream helpers included)."""

    responses: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, str]:
        assert self.responses, "the client got no response"
        return self.responses[-1][1]

    def hook(self) -> Callable[[Any], None]:
        # The response is the SDK's HTTP library's (httpx2 in openai 3.x): only status and headers are read.
        def record(response: Any) -> None:
            self.responses.append((response.status_code, {k.lower(): v for k, v in response.headers.items()}))

        return record


def sdk(proxy: ProxyProc, seen: Seen, timeout: float = 10.0) -> openai.OpenAI:
    """The openai SDK against `proxy`: no retries of its own (they would hide the proxy's)."""
    http = openai.DefaultHttpxClient(event_hooks={"response": [seen.hook()]})
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0, timeout=timeout, http_client=http
    )


# ---------------------------------------------------------------------------- what came back


def data_events(raw: bytes) -> list[Any]:
    """A stream's data events: parsed JSON, or b"[DONE]"."""
    out: list[Any] = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[6:]
            out.append(payload if payload == b"[DONE]" else orjson.loads(payload))
    return out


def streamed_text(events: list[Any]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e.get("choices", []))


def ledger(proc: ProxyProc, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request row and its attempt rows (waiting for the ledger's writer)."""
    return ledger_rows(proc.db, rid, timeout=5.0)


def assert_check_recorded(req: Mapping[str, Any], atts: list[dict[str, Any]], result: str | None) -> None:
    """What the ledger says the gate found (requests.check_result, attempts.checked)."""
    assert req["check_result"] == result, req
    judged = [a["outcome"] in ("ok", "invalid_output") for a in atts] if result is not None else [False] * len(atts)
    assert [bool(a["checked"]) for a in atts] == judged, atts


def outcomes(atts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["tier"], a["outcome"]) for a in atts]
