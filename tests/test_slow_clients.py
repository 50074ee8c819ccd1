"""A slow client is the client's problem: time the proxy spends waiting for a client to take
bytes never counts against the upstream (its idle timeout, its breaker), and a client that stops
reading is cut after server.client_write_timeout_seconds and recorded as having left.

The clients are raw sockets with a tiny receive buffer that read only when told to, so the
proxy's writes really block; the streams are megabytes, more than every buffer in between."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.gateway.state import STATE
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.faults import ledger_rows

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
