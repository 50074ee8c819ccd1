"""Stream client: timestamps every SSE event of many concurrent streams.

Run as its own process on the load core (`python -m bench.streams ...`, JSON on stdout). Each of
`--concurrency` slots keeps one keep-alive connection and sends streaming requests back to
back for `--seconds` (start times staggered over one stream's length, so the load is steady).
It is a bare asyncio Protocol, not an HTTP library, so that hundreds of streams cost the load
core little: it finds the end of the headers, counts `data:` events in each read and records
the read's time when it holds events. Per stream: time to first event (from the send) and the
gaps between reads that carry events. Not a throughput tool: it measures timing only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_END_CHUNKED = b"\r\n0\r\n\r\n"
_STREAM_TIMEOUT = 60.0


@dataclass
class _Response:
    sent: float
    head: bytes = b""
    status: int = 0
    chunked: bool = False
    length: int | None = None
    body_bytes: int = 0
    tail: bytes = b""
    arrivals: list[float] = field(default_factory=list)
    events: int = 0
    done_marker: bool = False
    complete: bool = False
    keep_alive: bool = True


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.resp: _Response | None = None
        self.finished: asyncio.Future[None] | None = None
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        r = self.resp
        if r is None:
            return
        if not r.status:
            r.head += data
            end = r.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = r.head[:end].decode("latin-1").lower(), r.head[end + 4 :]
            r.status = int(head.split(" ", 2)[1])
            r.chunked = "transfer-encoding: chunked" in head
            r.keep_alive = "connection: close" not in head
            for line in head.split("\r\n"):
                if line.startswith("content-length:"):
                    r.length = int(line.split(":", 1)[1])
        r.body_bytes += len(data)
        joined = r.tail + data
        n = joined.count(b"data:") - r.tail.count(b"data:")
        if n:
            r.events += n
            r.arrivals.append(now)
        if b"[DONE]" in joined:
            r.done_marker = True
        r.tail = joined[-16:]
        if (r.chunked and r.tail.endswith(_END_CHUNKED)) or (r.length is not None and r.body_bytes >= r.length):
            r.complete = True
            if self.finished is not None and not self.finished.done():
                self.finished.set_result(None)


@dataclass
class _Totals:
    streams: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


async def _slot(host: str, port: int, request: bytes, start: float, end: float, totals: _Totals) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    transport: asyncio.Transport | None = None
    conn = _Conn()
    while time.perf_counter() < end:
        if transport is None or conn.lost:
            try:
                transport, conn = await loop.create_connection(_Conn, host, port)
            except OSError:
                totals.error("connect")
                await asyncio.sleep(0.1)
                continue
        conn.finished = loop.create_future()
        conn.resp = r = _Response(sent=time.perf_counter())
        transport.write(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.finished, _STREAM_TIMEOUT)
        if not r.complete:
            totals.error("timeout" if not conn.lost else "cut" if r.status in (0, 200) else f"http_{r.status}")
        elif r.status != 200 or not r.done_marker:
            totals.error(f"http_{r.status}" if r.status != 200 else "no_done")
        else:
            totals.streams += 1
            totals.events.append(r.events)
            totals.ttft.append(r.arrivals[0] - r.sent)
            totals.gaps.extend(b - a for a, b in zip(r.arrivals, r.arrivals[1:], strict=False))
        if not (r.complete and r.keep_alive):
            transport.close()
            transport = None
    if transport is not None:
        transport.close()


def _pct_ms(values: list[float], ps: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out = {f"p{p:g}": s[min(len(s) - 1, int(len(s) * p / 100))] * 1000 for p in ps}
    out["max"] = s[-1] * 1000
    out["n"] = len(s)
    return out


async def run(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    totals = _Totals()
    stagger = min(1.4, seconds / 2)  # about one paced stream's length
    t0 = time.perf_counter() + 0.05
    rng = random.Random(1)
    tasks = [_slot(host, port, request, t0 + rng.uniform(0, stagger), t0 + seconds, totals) for _ in range(concurrency)]
    await asyncio.gather(*tasks)
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "streams": totals.streams,
        "errors": totals.errors,
        "error_kinds": totals.error_kinds,
        "events_per_stream": sorted(totals.events)[len(totals.events) // 2] if totals.events else 0,
        "ttft_ms": _pct_ms(totals.ttft),
        "gap_ms": _pct_ms(totals.gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="concurrent SSE stream timing client (JSON on stdout)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="request JSON")
    parser.add_argument("--header", action="append", default=[], help="K: V")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    coro = run(args.url, args.body.encode(), headers, args.concurrency, args.seconds)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
