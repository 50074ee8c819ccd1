"""Helpers for the fault matrix (tests/test_faults.py) and the soak (tests/test_soak.py).

- `SimThread`: simulated upstream tiers (proxy.sim) on an event loop of their own in a
  background thread, so one set of upstreams can outlive pytest's per-test event loops and a
  module-scoped `proxy serve` process can sit in front of them. Each `Sim` can also be told to
  answer with raw bytes (`RawReply`) for faults aiohttp would never produce itself (a truncated
  SSE line, an HTML error page, an endless event), and `SimThread.blackhole()` accepts TCP
  connections and never reads from them.
- `proxy_config()`: the `proxy serve` (tests/support/proc.py) configuration in front of them.
- `chat()`: one client request that records what came back (`Answer`), never raising.
- Ledger reads that wait for the background writer (`ledger_rows`, `count_rows`).
- `Observation`: what a test saw, appended as JSON lines to $RELIABILITY_OBSERVATIONS for the
  RELIABILITY.md generator (`python -m reliability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.sim import SIM_SETTINGS, SIM_STATS, Behaviour, SimSettings, SimStats, create_sim_app
from tests.support.proc import ProxyProc
from tests.support.secret_scan import KIMI_KEY

MSG = [{"role": "user", "content": "plan the next step"}]
KIMI_ENV = {"TEST_KIMI_KEY": KIMI_KEY}  # proxy_config's kimi tier reads its key from it
OBSERVATIONS_ENV = "RELIABILITY_OBSERVATIONS"

_T = TypeVar("_T")


# ---------------------------------------------------------------------------- raw upstream replies


@dataclass(frozen=True, slots=True)
class RawReply:
    """Bytes written straight to the upstream socket instead of an HTTP answer.

    `endless`: after `data`, keep writing this chunk until the proxy hangs up. `close`: close the
    connection afterwards (else leave it open and silent until the proxy gives up)."""

    data: bytes
    endless: bytes | None = None
    close: bool = True


def http_head(status: int = 200, content_type: str = "application/json", **headers: str) -> bytes:
    """A raw HTTP/1.1 status line and headers; without Content-Length the body ends at EOF."""
    reason = {200: "OK", 500: "Internal Server Error"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sse_chunk(content: str | None = None, *, role: bool = False, finish: bool = False) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    doc = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "raw",
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if finish else None}],
    }
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def chunked(*parts: bytes, terminate: bool = True) -> bytes:
    """Parts in HTTP chunked encoding; terminate=False leaves out the final 0-length chunk."""
    out = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts if p)
    return out + (b"0\r\n\r\n" if terminate else b"")


# ---------------------------------------------------------------------------- simulated upstreams


@dataclass
class Sim:
    """One simulated tier served by a SimThread. Mutate it only between requests (reset())."""

    name: str
    url: str
    settings: SimSettings
    stats: SimStats
    owner: SimThread
    queue: deque[Behaviour | RawReply] = field(default_factory=deque)
    # Asked for each chat request the queue does not cover; a Behaviour overrides the default.
    chooser: Callable[[], Behaviour | None] | None = None
    raw_bytes_sent: int = 0

    @property
    def hits(self) -> int:
        return self.stats.hits

    def always(self, behaviour: Behaviour) -> None:
        self.settings.default = behaviour

    def script(self, *items: Behaviour | RawReply) -> None:
        """Answers for the next requests, in order; then `settings.default` again."""
        self.queue.extend(items)

    def reset(self) -> None:
        self.owner.run(self._reset())

    async def _reset(self) -> None:
        for _ in range(200):  # let an abandoned handler notice its client went away
            if self.stats.active == 0:
                break
            await asyncio.sleep(0.01)
        self.settings.default = Behaviour()
        self.settings.script.clear()
        self.settings.failure_rate = 0.0
        self.queue.clear()
        self.chooser = None
        self.stats.hits = self.stats.cancelled = 0
        self.stats.requests.clear()
        self.raw_bytes_sent = 0

    async def wait_idle(self, timeout: float = 2.0) -> bool:
        """From the test's loop: until no request is active on this sim."""
        deadline = time.monotonic() + timeout
        while self.stats.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.stats.active == 0


@dataclass
class Blackhole:
    """Accepts TCP connections and never reads or answers."""

    url: str
    accepted: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


_SIM = web.AppKey("fault_sim", Sim)


@web.middleware
async def _scripted(request: web.Request, handler: Any) -> web.StreamResponse:
    sim = request.app[_SIM]
    if request.method != "POST" or not request.path.endswith("/chat/completions"):
        resp: web.StreamResponse = await handler(request)
        return resp
    if not sim.queue:
        chosen = sim.chooser() if sim.chooser is not None else None
        if chosen is not None:
            request.app[SIM_SETTINGS].script.appendleft(chosen)
        resp = await handler(request)
        return resp
    item = sim.queue.popleft()
    if isinstance(item, Behaviour):
        request.app[SIM_SETTINGS].script.appendleft(item)
        resp = await handler(request)
        return resp
    sim.stats.hits += 1
    sim.stats.active += 1
    try:
        await request.read()
        transport = request.transport
        assert transport is not None
        transport.write(item.data)
        sim.raw_bytes_sent += len(item.data)
        if item.endless is not None:
            while not transport.is_closing():
                if transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.001)
                    continue
                transport.write(item.endless)
                sim.raw_bytes_sent += len(item.endless)
                await asyncio.sleep(0)
        elif not item.close:
            while not transport.is_closing():
                await asyncio.sleep(0.02)
        transport.close()
    finally:
        sim.stats.active -= 1
    return web.Response()  # the transport is closed: aiohttp drops this quietly


class SimThread:
    """An event loop in a daemon thread hosting simulated tiers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="fault-sims", daemon=True)
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []
        self._holes: list[Blackhole] = []
        self.sims: dict[str, Sim] = {}
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def add(self, name: str, **settings: Any) -> Sim:
        sim = self.run(self._add(name, SimSettings(name=name, **settings)))
        self.sims[name] = sim
        return sim

    async def _add(self, name: str, settings: SimSettings) -> Sim:
        app = create_sim_app(settings)
        app.middlewares.append(_scripted)
        sim = Sim(name, "", settings, app[SIM_STATS], self)
        app[_SIM] = sim
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        sim.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        return sim

    def blackhole(self) -> Blackhole:
        return self.run(self._blackhole())

    async def _blackhole(self) -> Blackhole:
        hole = Blackhole(url="")

        async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hole.accepted += 1
            hole.writers.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self._servers.append(server)
        self._holes.append(hole)
        hole.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        return hole

    def reset(self) -> None:
        for sim in self.sims.values():
            sim.reset()

    def hits(self) -> dict[str, int]:
        return {name: sim.hits for name, sim in self.sims.items()}

    def close(self) -> None:
        async def stop() -> None:
            for hole in self._holes:
                for w in hole.writers:
                    w.close()
            for server in self._servers:
                server.close()
            for runner in self._runners:
                await runner.cleanup()

        try:
            self.run(stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# ---------------------------------------------------------------------------- the proxy process


def tiers_for(urls: Mapping[str, str], timeout: float = 0.5, **overrides: dict[str, Any]) -> dict[str, Any]:
    """llama, ollama and kimi (paid, keyed) at the given base URLs."""
    tiers: dict[str, Any] = {
        "llama": {"base_url": urls["llama"], "model": "llama3.1:8b"},
        "ollama": {"base_url": urls["ollama"], "model": "qwen2.5:7b"},
        "kimi": {"base_url": urls["kimi"], "model": "kimi-k2.5", "paid": True, "api_key_env": "TEST_KIMI_KEY"},
    }
    for t in tiers.values():
        t.update(timeout_seconds=timeout, stream_idle_timeout_seconds=0.3, connect_timeout_seconds=0.5)
    for name, changes in overrides.items():
        tiers[name] = {**tiers[name], **changes}
    return tiers


def proxy_config(
    urls: Mapping[str, str],
    db: Path,
    *,
    tiers: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config for fast fault tests: sub-second timeouts, breakers effectively off, small limits."""
    config: dict[str, Any] = {
        "tiers": tiers or tiers_for(urls),
        "routing": {"escalate_after_failures": 1000, "open_breakers_on_outage": False},
        "retries": {
            "max_fallback_retries": 2,
            "max_total_retries": 5,
            "backoff_initial_seconds": 0.01,
            "backoff_max_seconds": 0.05,
            "request_deadline_seconds": 3.0,
        },
        "server": {
            "max_response_bytes": 32768,
            "body_read_timeout_seconds": 0.3,
            "idle_timeout_seconds": 2.0,
            "shutdown_timeout_seconds": 5,
        },
        "ledger": {"path": str(db), "busy_timeout_ms": 50},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def port_of(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


# ---------------------------------------------------------------------------- the client side


@dataclass
class Answer:
    """What one client request got back. `failure` is set when no HTTP answer arrived in time."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float
    failure: str | None = None

    @property
    def stream(self) -> bool:
        return self.headers.get("Content-Type", "").startswith("text/event-stream")

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[Any]:
        """The data events: parsed JSON, b"[DONE]", or the raw bytes when not JSON."""
        out: list[Any] = []
        for event in self.body.replace(b"\r\n", b"\n").split(b"\n\n"):
            lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
            if not lines:
                continue
            payload = b"\n".join(lines)
            if payload == b"[DONE]":
                out.append(payload)
                continue
            try:
                out.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                out.append(payload)
        return out

    @property
    def tier(self) -> str | None:
        return self.headers.get("X-Proxy-Tier")

    @property
    def attempts(self) -> int | None:
        raw = self.headers.get("X-Proxy-Attempts")
        return int(raw) if raw is not None else None


def request_id(prefix: str) -> str:
    clean = "".join(c if c.isalnum() or c in "._:-" else "-" for c in prefix)[:80]
    return f"{clean}-{uuid.uuid4().hex[:10]}"


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": MSG, "stream": stream, **extra}


async def chat(
    session: aiohttp.ClientSession,
    proxy: ProxyProc | str,
    *,
    stream: bool = False,
    rid: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """POST a chat completion and read the whole answer; never raises for transport failures."""
    url = proxy.chat_url if isinstance(proxy, ProxyProc) else proxy
    sent = dict(headers or {})
    if rid is not None:
        sent["X-Request-Id"] = rid
    t0 = time.monotonic()
    try:
        async with session.post(
            url, json=chat_body(stream), headers=sent, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.read()
            return Answer(resp.status, dict(resp.headers), body, time.monotonic() - t0)
    except (aiohttp.ClientError, TimeoutError) as e:
        return Answer(0, {}, b"", time.monotonic() - t0, failure=f"{type(e).__name__}: {e}")


def openai_error(doc: Any) -> dict[str, Any]:
    """Assert `doc` is exactly OpenAI's error shape; returns the inner object."""
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    return err


def describe_answer(a: Answer) -> str:
    """One line for RELIABILITY.md: what the client got."""
    if a.failure is not None:
        return f"no answer ({a.failure})"
    via = f" from {a.tier}" if a.tier else ""
    tries = f", {a.attempts} attempt(s)" if a.attempts is not None else ""
    if a.stream:
        evs = a.events()
        if evs and evs[-1] == b"[DONE]":
            end = "ends with [DONE]"
        elif evs and isinstance(evs[-1], dict) and "error" in evs[-1]:
            end = f"ends with an error event ({evs[-1]['error'].get('code')})"
        else:
            end = "ends with neither [DONE] nor an error event"
        return f"{a.status} stream{via}{tries}: {len(evs)} data events, {end}"
    try:
        doc = a.json()
    except orjson.JSONDecodeError:
        return f"{a.status} non-JSON body{via}{tries}"
    if isinstance(doc, dict) and "error" in doc and isinstance(doc["error"], dict):
        return f"{a.status} OpenAI error `{doc['error'].get('code')}`{via}{tries}"
    if isinstance(doc, dict) and "choices" in doc:
        return f"{a.status} completion{via}{tries}"
    return f"{a.status} other JSON{via}{tries}"


# ---------------------------------------------------------------------------- the ledger


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=1.0)
    conn.row_factory = sqlite3.Row
    return conn


def ledger_rows(db: Path, rid: str, timeout: float = 3.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request row and its attempt rows, waiting for the background writer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with contextlib.closing(_connect(db)) as conn:
                req = conn.execute("SELECT * FROM requests WHERE id = ?", (rid,)).fetchone()
                if req is not None:
                    atts = conn.execute("SELECT * FROM attempts WHERE request_id = ? ORDER BY n", (rid,)).fetchall()
                    return dict(req), [dict(a) for a in atts]
        except sqlite3.OperationalError:
            pass  # not created yet, or busy
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for request {rid} in {db} after {timeout}s")
        time.sleep(0.02)


def count_rows(db: Path, table: str = "requests", where: str = "1") -> int:
    with contextlib.closing(_connect(db)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0])


def wait_count(db: Path, expected: int, table: str = "requests", timeout: float = 5.0) -> int:
    """Poll until `table` has `expected` rows (or the timeout); returns the last count seen."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        try:
            seen = count_rows(db, table)
        except sqlite3.OperationalError:
            seen = -1
        if seen == expected:
            return seen
        time.sleep(0.03)
    return seen


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def spill_lines(db: Path) -> int:
    path = Path(f"{db}.spill.jsonl")
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


@pytest.fixture
def observe(request: pytest.FixtureRequest) -> Iterator[Observation]:
    """The case's Observation, saved at teardown (import this fixture into a test module)."""
    obs = observation_for(request)
    yield obs
    obs.save()


def observation_for(request: Any) -> Observation:
    """An Observation for a pytest item: described by its `case` parameter or its docstring."""
    node = request.node
    callspec = getattr(node, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    text = getattr(case, "description", None) or (node.function.__doc__ or node.name).strip().split("\n\n")[0]
    return Observation(node.nodeid, " ".join(text.split()))


def summarize_ledger(req: Mapping[str, Any], atts: Iterable[Mapping[str, Any]]) -> str:
    steps = ", ".join(f"{a['tier']}:{a['outcome']}" for a in atts)
    return f"request {req['outcome']}/{req['status']}; attempts [{steps}]"


# ---------------------------------------------------------------------------- observations


@dataclass
class Observation:
    """What one case saw, for RELIABILITY.md; saved at teardown whatever the test's result."""

    nodeid: str
    description: str
    fault: str = ""
    client: str = ""
    hits: dict[str, int] = field(default_factory=dict)
    ledger: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        path = os.environ.get(OBSERVATIONS_ENV)
        if not path:
            return
        line = json.dumps(
            {
                "nodeid": self.nodeid,
                "description": self.description,
                "fault": self.fault,
                "client": self.client,
                "hits": self.hits,
                "ledger": self.ledger,
                "extra": self.extra,
            }
        )
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


async def drip_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float) -> float:
    """Send a header line every 50 ms, never ending the request head (a slowloris client), until
    the server closes the connection; how long that took. TimeoutError after `seconds`."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(seconds):
        while True:
            try:
                writer.write(b"X-Drip: 1\r\n")
                await writer.drain()
                if await asyncio.wait_for(reader.read(1024), 0.05) == b"":
                    return loop.time() - t0
            except TimeoutError:
                continue
            except ConnectionError:
                return loop.time() - t0
