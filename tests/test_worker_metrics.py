"""/metrics under `proxy serve --workers N` (proxy/ops/worker_metrics.py): one scrape of any
worker covers every worker, each sample labelled worker="<index>", each family's HELP and TYPE
once; a worker that is dead or does not answer is left out and counted, never a failed scrape;
without --workers the exposition is as it always was, with no worker label."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.ops.metrics import Metrics, Snapshot
from proxy.ops.worker_metrics import MISSING, Worker, families, merge, serve_worker_metrics
from tests.conftest import Upstream, make_config, tier_config
from tests.support.faults import KIMI_ENV, SimThread
from tests.support.proc import ProxyProc, start_proxy
from tests.support.redis_server import redis_binary
from tests.support.server import ProxyTestServer
from tests.test_workers import config_for, post, workers

Client = TestClient[web.Request, web.Application]
KEY = "sk-metrics-0123456789abcdef"
AUTH = {"keys": [{"name": "ops", "secret_env": "OPS_KEY"}]}
GOOD = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "plan"}]}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A connection per request: the kernel spreads connections, not requests, over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        yield s


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory: a Unix socket's path must fit in 108 bytes, which tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="wm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def scrape(session: aiohttp.ClientSession, proc: ProxyProc) -> tuple[str, str, float]:
    """(text, the answering worker's pid or "" without --workers, seconds taken)."""
    t0 = time.monotonic()
    async with session.get(f"{proc.url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
        assert r.status == 200, text[:500]
        return text, r.headers.get("X-Proxy-Worker", ""), time.monotonic() - t0


def values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name`, with its labels."""
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def by_worker(text: str, name: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for labels, value in values(text, name):
        out[labels["worker"]] += value
    return dict(out)


def missing(text: str) -> float:
    [(labels, value)] = values(text, MISSING)
    assert labels == {}
    return value


def sockets_dir(proc: ProxyProc) -> Path:
    m = re.search(r"metrics sockets in (\S+)\)", proc.log_text())
    assert m, proc.log_text()[-2000:]
    return Path(m.group(1))


def parsed(text: str, worker: str | None = None) -> list[tuple[str, str, str, str, tuple[tuple[str, str], ...], float]]:
    """Every sample with its family's name, type and help, labelled worker=`worker` if given."""
    out = []
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            labels = {**s.labels, **({"worker": worker} if worker is not None else {})}
            out.append((f.name, f.type, f.documentation, s.name, tuple(sorted(labels.items())), s.value))
    return sorted(out)


def test_the_merge_is_what_prometheus_clients_parser_reads_with_a_worker_label_added() -> None:
    """The line-by-line merge against the parser, on a real exposition (histograms, process
    metrics, gauges read at scrape time) with a label value and a help text that need escaping."""
    texts = []
    for n in range(2):
        m = Metrics(lambda: Snapshot({}, None, None, ("llama", "kimi")))
        odd = PromCounter("odd", 'help with \\ and "quotes"\nand a newline', ["v"], registry=m.registry)
        odd.labels('a{b} c="d"\\e\nf').inc(n + 1)
        if n == 1:
            PromCounter("only_in_one", "a family one worker has", registry=m.registry).inc()
        texts.append(m.render()[0].decode())
    body = merge([families(texts[0], 0), families(texts[1], 1)], 1).decode()
    expected = sorted([*parsed(texts[0], "0"), *parsed(texts[1], "1")])
    assert [s for s in parsed(body) if s[0] != MISSING] == expected
    assert values(body, MISSING) == [({}, 1.0)]
    assert [v for labels, v in values(body, "odd_total")] == [1.0, 2.0], "in worker order"
    assert body.count("# HELP process_cpu_seconds_total ") == 1 and body.count("# TYPE odd_total ") == 1
    with pytest.raises(ValueError, match="before the first # HELP"):
        families("odd_total 1.0\n", 0)


async def test_one_scrape_of_either_worker_counts_every_workers_requests(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    redis_binary()  # the supervisor's private state; skipped (or failed in .ci/run) without it
    sims.reset()
    proc = await workers(tmp_path, config_for(sims, tmp_path))
    try:
        where = sockets_dir(proc)
        assert stat.S_IMODE(where.stat().st_mode) == 0o700, "only this user can reach the sockets"
        for i in (0, 1):
            st = (where / f"worker-{i}.sock").stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        answers = await asyncio.gather(*(post(session, proc) for _ in range(40)))
        assert all(status == 200 for status, _, _ in answers)
        served = Counter(pid for _, _, pid in answers)
        assert len(served) == 2, f"the requests were spread over both workers: {served}"
        scrapes: list[tuple[str, str, float]] = []
        while len({pid for _, pid, _ in scrapes}) < 2 and len(scrapes) < 40:
            scrapes.append(await scrape(session, proc))
    finally:
        assert await proc.stop() == 0, proc.log_text()[-3000:]
    assert len({pid for _, pid, _ in scrapes}) == 2, "scrapes landed on both workers"
    for text, pid, _ in scrapes:
        counts = by_worker(text, "proxy_requests_total")
        assert sorted(counts) == ["0", "1"], f"scrape by {pid}: {counts}"
        assert sum(counts.values()) == 40, f"scrape by {pid}: {counts}"
        assert sorted(counts.values()) == sorted(served.values()), f"each worker's own count: {counts} {served}"
        assert sum(by_worker(text, "proxy_upstream_latency_seconds_count").values()) == 40
        assert sorted(by_worker(text, "process_resident_memory_bytes")) == ["0", "1"]
        assert missing(text) == 0
        order = [labels["worker"] for labels, _ in values(text, "process_start_time_seconds")]
        assert order == ["0", "1"], f"the same text whichever worker answers: in worker order, {order}"
    text = scrapes[-1][0]
    for kind in ("HELP", "TYPE"):
        names = [line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} ")]
        assert len(names) > 20 and len(names) == len(set(names)), f"# {kind} once per family"
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), "each family in one block"
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            assert f.name == MISSING or s.labels.get("worker") in ("0", "1"), s
    assert not where.exists(), "the supervisor removes the sockets' directory"


def live_workers(proc: ProxyProc) -> set[int]:
    """The supervisor's children that are workers (the other one is the private redis-server)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if ppid == proc.pid and b"redis" not in cmd:
            out.add(int(entry))
    return out


def dead(pid: int) -> bool:
    """Exited (a zombie until the supervisor reaps it: its descriptors are closed already)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_worker_killed_with_sigkill_leaves_every_scrape_answering_at_once(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    redis_binary()
    sims.reset()
    proc = await workers(tmp_path, config_for(sims, tmp_path))
    saw: list[tuple[set[str], float]] = []
    try:
        answers = await asyncio.gather(*(post(session, proc) for _ in range(20)))
        pids = {int(pid) for _, _, pid in answers if pid}
        assert pids == live_workers(proc), "both workers answered"
        started = by_worker((await scrape(session, proc))[0], "process_start_time_seconds")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        while victim in live_workers(proc) and not dead(victim):
            await asyncio.sleep(0.005)  # its listening socket is closed: no connection lands there
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text, pid, took = await scrape(session, proc)
            assert pid != str(victim)
            assert took < 0.9, f"a dead worker is not waited for: {took:.2f} s"
            present = set(by_worker(text, "process_start_time_seconds"))
            saw.append((present, missing(text)))
            assert present and len(present) + missing(text) == 2, f"each worker present or counted: {saw[-1]}"
            if present == {"0", "1"}:
                break
            await asyncio.sleep(0.05)
    finally:
        code = await proc.stop()
    log = proc.log_text()
    assert code == 0, log[-3000:]
    assert saw[-1] == ({"0", "1"}, 0), f"the restarted worker is back in the scrape: {saw}"
    now = by_worker(text, "process_start_time_seconds")
    assert sum(now[i] != started[i] for i in ("0", "1")) == 1, f"one worker is new: {started} -> {now}"
    assert f"(pid {victim}) was killed by SIGKILL: restarting it" in log
    if any(gap for _, gap in saw):  # unless the new worker was up before the first scrape
        assert "left out of /metrics (proxy_metrics_workers_missing): worker " in log


async def test_without_workers_the_metrics_have_no_worker_label(
    sims: SimThread, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sims.reset()
    proc = await start_proxy(tmp_path, config_for(sims, tmp_path), KIMI_ENV)
    try:
        answers = await asyncio.gather(*(post(session, proc) for _ in range(5)))
        assert [a[0] for a in answers] == [200] * 5 and {a[2] for a in answers} == {None}
        text, _, _ = await scrape(session, proc)
    finally:
        assert await proc.stop() == 0, proc.log_text()[-3000:]
    assert 'worker="' not in text and MISSING not in text
    assert sum(v for _, v in values(text, "proxy_requests_total")) == 5
    assert "metrics sockets" not in proc.log_text()


async def _proxy_app(
    aiohttp_client: Callable[..., Awaitable[Client]], upstreams: dict[str, Upstream], worker: Worker, **sections: Any
) -> Client:
    config = make_config({"tiers": tier_config(upstreams), **sections}, {"OPS_KEY": KEY})
    app = create_app(config, with_ledger=False)
    serve_worker_metrics(app, worker, timeout=0.2)
    return await aiohttp_client(ProxyTestServer(app))


async def test_a_worker_that_does_not_answer_is_left_out_counted_and_logged_once(
    aiohttp_client: Callable[..., Awaitable[Client]],
    upstreams: dict[str, Upstream],
    sockets: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three workers in this process: 0 answers the scrape, 1 accepts and never answers, 2 is not
    there yet and then is."""
    caplog.set_level(logging.INFO, "proxy")
    first = await _proxy_app(aiohttp_client, upstreams, Worker(0, 3, sockets), auth=AUTH)
    stuck: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stuck.append(writer)

    hung = await asyncio.start_unix_server(never_answer, path=str(sockets / "worker-1.sock"))
    try:
        for _ in range(3):
            assert (await first.post("/v1/chat/completions", json=CHAT, headers=GOOD)).status == 200
        assert (await first.get("/metrics")).status == 401, "the auth on /metrics is unchanged"
        for _ in range(2):
            t0 = time.monotonic()
            resp = await first.get("/metrics", headers=GOOD)
            text = await resp.text()
            assert resp.status == 200 and 0.2 <= time.monotonic() - t0 < 0.6, "waited the timeout, no longer"
            assert missing(text) == 2 and by_worker(text, "proxy_requests_total") == {"0": 3.0}
        warnings = [r.getMessage() for r in caplog.records if "left out of /metrics" in r.getMessage()]
        assert len(warnings) == 1, f"logged when the set changes, not per scrape: {warnings}"
        assert "worker 1: no answer within 0.2 s" in warnings[0] and "worker 2: " in warnings[0]

        third = await _proxy_app(aiohttp_client, upstreams, Worker(2, 3, sockets))
        for _ in range(2):
            assert (await third.post("/v1/chat/completions", json=CHAT)).status == 200
        text = await (await first.get("/metrics", headers=GOOD)).text()
        assert missing(text) == 1 and by_worker(text, "proxy_requests_total") == {"0": 3.0, "2": 2.0}
        assert text.count("# HELP proxy_requests_total ") == 1
        assert any("worker 2 answering again" in r.getMessage() for r in caplog.records)

        unix = aiohttp.UnixConnector(path=str(sockets / "worker-2.sock"))
        async with aiohttp.ClientSession(connector=unix) as s:
            async with s.get("http://w/metrics") as r:
                own = await r.text()
                assert r.status == 200 and 'worker="' not in own, "a worker's own text, unlabelled"
            for path in ("/v1/models", "/healthz", "/readyz"):
                async with s.get(f"http://w{path}") as r:
                    assert r.status == 404, f"only /metrics on the worker's socket, not {path}"
    finally:
        for w in stuck:
            w.close()
        hung.close()
        await hung.wait_closed()
