"""`/metrics` under `proxy serve --workers N`: one scrape of any worker covers all N.

The kernel hands each connection to one worker (SO_REUSEPORT), so a scrape of the port used to
see one worker at a time and its counters jumped between the workers' values. Now:

- **Each worker serves its own exposition on a Unix socket**, `<dir>/worker-<index>.sock`, in a
  directory the supervisor makes with mode 0700 (only this user can connect). It is a separate
  aiohttp app with one route, GET /metrics, and no other: nothing there is reachable over TCP,
  and the proxy's routes are not reachable there.
- **The worker that answers /metrics** renders its own and fetches the others' concurrently, each
  within PEER_TIMEOUT_SECONDS, adds `worker="<index>"` to every sample and writes each family
  once (HELP and TYPE once, then every worker's samples, in worker order).
- **A worker that does not answer in time** (restarting, killed, its loop blocked) is left out of
  that scrape and counted in `proxy_metrics_workers_missing`; the scrape still answers 200. The
  set of missing workers is logged when it changes, not on every scrape.
- **A label, not sums**: histograms, gauges (breaker state, queue depth) and process_* metrics
  do not add up meaningfully in the proxy, while Prometheus' `sum without (worker) (...)` adds
  what should be added, and a worker's restart shows as its own counter reset, which `rate()`
  handles, instead of a drop in a summed total.

Why not prometheus_client's multiprocess mode: it writes every observation to a memory-mapped
file per process, which changes the per-request path, and it supports neither custom collectors
(the gauges read at scrape time, the exact cost totals) nor process_* metrics. Here the work is
at scrape time only: the merge takes about 0.35 ms per worker on the answering worker's loop,
next to each worker's rendering of its own (about 3 ms, as without workers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.gateway.state import STATE

log = logging.getLogger("proxy")

# A local socket answers in microseconds; a second covers a worker busy with a burst, and stays
# well inside Prometheus' default scrape timeout (10 s).
PEER_TIMEOUT_SECONDS = 1.0
MISSING = "proxy_metrics_workers_missing"


@dataclass(frozen=True, slots=True)
class Worker:
    """Which of the supervisor's `count` workers this process is, and where they all serve their
    own metrics to each other."""

    index: int
    count: int
    sockets: Path  # the supervisor's directory, mode 0700

    def socket(self, index: int) -> Path:
        return self.sockets / f"worker-{index}.sock"


def serve_worker_metrics(app: web.Application, worker: Worker, timeout: float = PEER_TIMEOUT_SECONDS) -> None:
    """Make the app one of the supervisor's workers for /metrics (before the app starts)."""
    workers = app[WORKER_METRICS] = WorkerMetrics(worker, timeout)
    app.cleanup_ctx.append(workers.serving)


class WorkerMetrics:
    """One worker's side: serves its own metrics on its socket, and merges all for /metrics."""

    def __init__(self, worker: Worker, timeout: float = PEER_TIMEOUT_SECONDS) -> None:
        self.worker = worker
        self.timeout = timeout
        self.missing: dict[int, str] = {}  # the last scrape's, to log only what changes

    async def serving(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx of the proxy app: its own metrics on the Unix socket while it runs."""

        async def own(request: web.Request) -> web.Response:
            body, content_type = app[STATE].metrics.render()  # read at request time: the current object
            return web.Response(body=body, headers={"Content-Type": content_type})

        local = web.Application()
        local.router.add_get("/metrics", own)
        runner = web.AppRunner(local, handle_signals=False, access_log=None)
        await runner.setup()
        path = self.worker.socket(self.worker.index)
        try:
            # A socket file left by this index's previous process (killed) is replaced by the
            # event loop (asyncio and uvloop both remove a stale socket before binding).
            await web.UnixSite(runner, str(path)).start()
            path.chmod(0o600)
            yield
        finally:
            await runner.cleanup()

    async def render(self, app: web.Application) -> tuple[bytes, str]:
        """The body and Content-Type for GET /metrics: every worker's samples, labelled."""
        own_body, _ = app[STATE].metrics.render()
        me = self.worker.index
        others = [i for i in range(self.worker.count) if i != me]
        fetched = await asyncio.gather(*(self._fetch(i) for i in others))
        found = {me: families(own_body.decode(), me)}
        missing: dict[int, str] = {}
        for i, got in zip(others, fetched, strict=True):
            if isinstance(got, str):
                missing[i] = got
            else:
                found[i] = got
        self._log_change(missing)
        return merge([found[i] for i in sorted(found)], len(missing)), CONTENT_TYPE_LATEST

    async def _fetch(self, index: int) -> dict[str, list[str]] | str:
        """A worker's families, or why not: one that cannot answer is left out, never an error."""
        connector = aiohttp.UnixConnector(path=str(self.worker.socket(index)), force_close=True)
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                asyncio.timeout(self.timeout),
                session.get("http://worker/metrics") as resp,
            ):
                if resp.status != 200:
                    return f"status {resp.status}"
                text = await resp.text()
            return families(text, index)
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as e:  # ValueError: not the text format
            return str(e) or type(e).__name__

    def _log_change(self, missing: dict[int, str]) -> None:
        if missing.keys() == self.missing.keys():
            return
        back = sorted(self.missing.keys() - missing.keys())
        self.missing = missing
        if missing:
            why = "; ".join(f"worker {i}: {e}" for i, e in sorted(missing.items()))
            log.warning("metrics: left out of /metrics (%s): %s", MISSING, why)
        if back:
            log.info("metrics: worker %s answering again", ", ".join(map(str, back)))


WORKER_METRICS = web.AppKey("worker_metrics", WorkerMetrics)

_MISSING_HEAD = (
    f"# HELP {MISSING} Workers whose metrics this scrape lacks: they did not answer in time (restarting or stuck).",
    f"# TYPE {MISSING} gauge",
)


def families(text: str, worker: int) -> dict[str, list[str]]:
    """One worker's exposition by family name: its HELP and TYPE lines, then its samples, each
    labelled with the worker's index.

    Line by line rather than through prometheus_client's parser and writer, which take ~7 ms
    per worker on the event loop (this takes ~0.35 ms and gives the same samples: see
    tests/test_worker_metrics.py). The text is prometheus_client's own 0.0.4 format from our own
    code, where every family opens with its `# HELP` line, every sample is one line (newlines in
    values are escaped) and a sample's name ends at its first `{` or space. The label goes first
    in the braces, so the rest of the line is never read."""
    label = f'worker="{worker}"'
    out: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            lines = out[line.split(" ", 3)[2]] = [line]
        elif lines is None:
            raise ValueError(f"a sample or comment before the first # HELP line: {line[:100]!r}")
        elif line.startswith("#"):
            lines.append(line)  # TYPE, which stays with its family
        elif line:
            cut = line.find("{")
            if cut >= 0:
                lines.append(f"{line[: cut + 1]}{label},{line[cut + 1 :]}")
            else:
                cut = line.index(" ")
                lines.append(f"{line[:cut]}{{{label}}}{line[cut:]}")
    return out


def merge(by_worker: Sequence[dict[str, list[str]]], missing: int) -> bytes:
    """Each family once, in the order first seen, with every worker's samples in the order given;
    then the count of workers left out."""
    merged: dict[str, list[str]] = {}
    for fams in by_worker:
        for name, lines in fams.items():
            into = merged.get(name)
            if into is None:
                merged[name] = list(lines)
            else:
                into.extend(line for line in lines if not line.startswith("#"))
    out = [line for lines in merged.values() for line in lines]
    out += [*_MISSING_HEAD, f"{MISSING} {float(missing)}"]
    return ("\n".join(out) + "\n").encode()
