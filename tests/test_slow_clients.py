"""A slow client is the client's problem: time the proxy spends waiting for a client to take
bytes never counts against the upstream (its idle timeout, its breaker), and a client that stops
reading is cut after server.client_write_timeout_seconds and recorded as having left.

The clients are raw sockets with a tiny receive buffer that read only when told to, so the
proxy's writes really block; the streams are megabytes, more than every buffer in between."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.gateway.state import STATE
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.faults import ledger_rows
from tests.support.proc import start_proxy

IDLE = 0.15  # the tier's stream_idle_timeout_seconds
PAUSE = 0.45  # a slow reader's pause: three idle timeouts, well under the write timeout
WRITE_TIMEOUT = 1.5
BIG = Behaviour(chunks=20_000)  # about 4 MB of events, sent at once


def _config(upstreams: dict[str, Upstream]) -> dict[str, Any]:
    return {
        "tiers": tier_config(upstreams, llama={"stream_idle_timeout_seconds": IDLE}),
        # One failure would open llama's breaker and send the next call elsewhere.
        "routing": {"escalate_after_failures": 1, "breaker_cooldown_seconds": 60},
        "server": {"client_write_timeout_seconds": WRITE_TIMEOUT},
    }


class RawClient:
    """A streaming request over a socket with a small receive buffer, read only on demand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()
        self.eof = False

    @classmethod
    async def post(cls, port: int, rid: str) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        body = orjson.dumps({"model": "auto", "stream": True, "messages": [{"role": "user", "content": "plan"}]})
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {rid}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        await asyncio.get_running_loop().sock_sendall(sock, head.encode() + body)
        return cls(sock)

    async def read(self, n: int) -> int:
        """Read up to n bytes (less at the end); the count read."""
        loop = asyncio.get_running_loop()
        got = 0
        while got < n and not self.eof:
            try:
                data = await loop.sock_recv(self.sock, min(n - got, 65536))
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.raw += data
            got += len(data)
        return got

    async def read_all(self) -> None:
        while not self.eof:
            await self.read(1 << 20)

    def close(self) -> None:
        self.sock.close()

    @property
    def body(self) -> bytes:
        """The de-chunked body (only complete chunks)."""
        head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        out = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0 or len(rest) < size:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        return bytes(out)


def _last_event(body: bytes) -> bytes:
    return [e for e in body.split(b"\n\n") if e.strip()][-1]


async def _slow_reader(port: int, rid: str, pauses: int) -> bytes:
    client = await RawClient.post(port, rid)
    try:
        for _ in range(pauses):
            await client.read(2048)
            await asyncio.sleep(PAUSE)
        await client.read_all()
        return client.body
    finally:
        client.close()


async def test_four_slow_readers_complete_and_the_free_tier_keeps_serving(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["llama"].always(BIG)
    client = await make_proxy(**_config(upstreams))
    port = client.server.port
    assert port is not None
    bodies = await asyncio.gather(*(_slow_reader(port, f"slow-{i}", pauses=3) for i in range(4)))
    for body in bodies:
        assert len(body) > 3_000_000, "the stream is bigger than the socket buffers, so writes blocked"
        assert _last_event(body) == b"data: [DONE]", _last_event(body)[:300]
        assert b"stream_interrupted" not in body
    for i in range(4):
        req, atts = await asyncio.to_thread(ledger_rows, tmp_path / "ledger.db", f"slow-{i}")
        assert (req["outcome"], req["status"], req["tier"]) == ("ok", 200, "llama")
        assert [(a["tier"], a["outcome"], a["error"]) for a in atts] == [("llama", "ok", None)]
    llama = client.server.app[STATE].breakers.get("llama")
    assert (llama.state(time.monotonic()), llama.failures) == ("closed", 0)
    upstreams["llama"].always(Behaviour())
    resp = await client.post(
        "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
    assert (upstreams["ollama"].hits, upstreams["kimi"].hits) == (0, 0), "no escalation, nothing paid"


async def test_clients_that_stop_reading_are_cut_and_recorded_as_gone(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    upstreams["llama"].always(BIG)
    client = await make_proxy(**_config(upstreams))
    port = client.server.port
    assert port is not None
    loop = asyncio.get_running_loop()
    stuck = [await RawClient.post(port, f"stuck-{i}") for i in range(4)]
    try:
        t0 = loop.time()
        for c in stuck:
            await c.read(2048)  # the stream started; then nothing more is read
        rows = [await asyncio.to_thread(ledger_rows, tmp_path / "ledger.db", f"stuck-{i}", 5.0) for i in range(4)]
        elapsed = loop.time() - t0
        assert WRITE_TIMEOUT <= elapsed < WRITE_TIMEOUT + 1.5, elapsed
        for req, atts in rows:
            assert (req["outcome"], req["status"], req["tier"]) == ("client_cancelled", 499, "llama")
            assert "stopped reading" in req["error"]
            assert [(a["tier"], a["outcome"]) for a in atts] == [("llama", "cancelled")]
            assert "client_write_timeout_seconds" in atts[0]["error"]
        for c in stuck:
            await c.read_all()  # the proxy aborted the connection: what it had buffered is gone
            assert len(c.raw) < 1_000_000, "the client was cut, not sent the rest of the 4 MB"
    finally:
        for c in stuck:
            c.close()
    llama = client.server.app[STATE].breakers.get("llama")
    assert (llama.state(time.monotonic()), llama.failures) == ("closed", 0), "leaving is not the tier's failure"
    for _ in range(50):
        if upstreams["llama"].stats.active == 0:
            break
        await asyncio.sleep(0.02)
    assert upstreams["llama"].stats.active == 0, "the upstream calls were let go"
    upstreams["llama"].always(Behaviour())
    resp = await client.post(
        "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
    assert (upstreams["ollama"].hits, upstreams["kimi"].hits) == (0, 0)


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def test_huge_answers_are_refused_without_holding_them(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> None:
    """20 MiB answers against max_response_bytes 1 MiB, sent with Content-Length, chunked, and
    gzip-compressed (whose Content-Length is tiny): each refused, and the proxy's peak RSS grows by
    less than one body."""
    size = 20 * 1024 * 1024
    doc = orjson.dumps({"object": "chat.completion", "choices": [{"message": {"content": "x" * size}}]})
    packed = gzip.compress(doc, 1)

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = request.headers.get("X-Kind", "length")
        if kind == "length":
            return web.Response(body=doc, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if kind == "gzip":
            resp.headers["Content-Encoding"] = "gzip"
            resp.content_length = len(packed)
            await resp.prepare(request)
            await resp.write(packed)
        else:
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(doc), 1 << 20):
                await resp.write(doc[i : i + (1 << 20)])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    upstream = await aiohttp_server(app)
    base = str(upstream.make_url("/v1"))
    tiers = {"llama": {"base_url": base, "model": "m", "timeout_seconds": 5}}
    config = {
        "tiers": tiers,
        "routing": {"primary": "llama", "escalate_after_failures": 1000},
        "retries": {"max_fallback_retries": 1, "max_total_retries": 1},
        "server": {"max_response_bytes": 1024 * 1024},
        "ledger": {"path": str(tmp_path / "ledger.db")},
    }
    proc = await start_proxy(tmp_path, config)
    try:
        async with aiohttp.ClientSession() as s:

            async def call(kind: str) -> tuple[int, str]:
                msg = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
                async with s.post(proc.chat_url, json=msg, headers={"X-Kind": kind}) as r:
                    doc = await r.json()
                    return r.status, str(doc.get("error", {}).get("message", doc)[:200])

            await call("length")  # warm up: imports, pools
            before = _hwm_kb(proc.pid)
            for kind in ("length", "chunked", "gzip"):
                results = await asyncio.gather(*(call(kind) for _ in range(3)))
                for status, message in results:
                    assert status == 502 and "too large" in message, (kind, status, message)
            grown = (_hwm_kb(proc.pid) - before) * 1024
        assert grown < size, f"peak RSS grew by {grown / 2**20:.1f} MiB for 20 MiB answers refused at 1 MiB"
    finally:
        await proc.stop()
