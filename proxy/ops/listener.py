"""The listening sockets, accepted by the proxy itself rather than by the event loop.

Two things the loops' own accept paths cannot do:

- Out of file descriptors (EMFILE/ENFILE), uvloop says nothing: libuv closes its reserve
  descriptor, accepts and closes every waiting connection (clients see resets) and reopens it;
  if the reserve cannot be reopened, uvloop closes the listening socket for good, again without a
  word. The stdlib loop logs each failed accept through the loop's exception handler, once a
  second, with a traceback. Here the failure is logged once per burst, counted, and accepting
  pauses briefly: clients wait in the kernel's backlog until a descriptor is free, then are served.
- `server.max_connections`: a connection past the cap is answered at once with a 503 and closed,
  so the descriptors left stay free for upstream connections and the ledger.

Accepted sockets are handed to the loop with `connect_accepted_socket`, which both loops implement.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

log = logging.getLogger("proxy")

OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPTS_PER_WAKEUP = 64  # a burst of connects must not starve requests already being served
PAUSE_SECONDS = 0.1  # how long accepting waits after running out of descriptors
LOG_EVERY_SECONDS = 10.0  # at most one log line per kind of trouble in this time

_REFUSED_BODY = (
    b'{"error": {"message": "the proxy has server.max_connections connections open; retry shortly, '
    b'reuse connections (keep-alive), or raise server.max_connections", "type": "server_error", '
    b'"param": null, "code": "too_many_connections"}}'
)
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_REFUSED_BODY)
) + _REFUSED_BODY


@dataclass
class Burst:
    """Rate-limited logging of one kind of trouble: the first event at once, then at most one
    line per `every` seconds saying how many happened since."""

    what: str
    every: float = LOG_EVERY_SECONDS
    _last: float = field(default=float("-inf"))
    _unlogged: int = 0

    def happened(self, detail: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last < self.every:
            return
        log.error("%s (%d since the last such message): %s", self.what, self._unlogged, detail)
        self._last, self._unlogged = now, 0


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    open_connections: Callable[[], Collection[object]]  # the live protocols the server holds now
    on_refused: Callable[[str], None]  # counted per reason: "max_connections" or "out_of_descriptors"


class Listener(asyncio.AbstractServer):
    """Accepts on `socks` and gives each connection to `factory`'s protocol, within `limits`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        socks: list[socket.socket],
        limits: Limits,
    ) -> None:
        self._loop = loop
        self._factory = factory
        self._socks = socks
        self._limits = limits
        # Connections handed over whose setup task has not finished, with their protocols: once
        # connection_made has run a protocol is in the server's open set too, and must not be
        # counted twice.
        self._connecting: dict[asyncio.Task[object], asyncio.Protocol] = {}
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        self._serving = False
        self._full = Burst("refusing connections: server.max_connections reached")
        self._exhausted = Burst("cannot accept connections: out of file descriptors")

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._socks)

    def start(self) -> None:
        self._serving = True
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for handle in self._paused.values():
            handle.cancel()
        self._paused.clear()

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        if not self._serving:
            self.start()

    async def serve_forever(self) -> None:
        raise NotImplementedError("the proxy's runner keeps the loop running, not the listener")

    async def wait_closed(self) -> None:
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while waiting in the backlog
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS:
                    self._pause(sock, e)
                else:
                    log.error("accepting a connection failed: %s", e)
                return
            if self._held() >= self._limits.max_connections:
                self._refuse(conn)
            else:
                self._hand_over(conn)

    def _held(self) -> int:
        live = self._limits.open_connections()
        return len(live) + sum(1 for p in self._connecting.values() if p not in live)

    def _pause(self, sock: socket.socket, e: OSError) -> None:
        """No descriptor for the next connection: stop accepting for a moment (clients wait in
        the backlog) instead of spinning on the readable listening socket."""
        self._limits.on_refused("out_of_descriptors")
        self._exhausted.happened(
            f"{e.strerror} ({errno.errorcode.get(e.errno or 0, e.errno)}); "
            f"{self._held()} client connections open; new clients wait until some close. "
            "Raise the open-files limit (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -n) "
            "or lower server.max_connections"
        )
        self._loop.remove_reader(sock.fileno())
        self._paused[sock] = self._loop.call_later(PAUSE_SECONDS, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._paused.pop(sock, None)
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
            self._accept(sock)

    def _refuse(self, conn: socket.socket) -> None:
        self._limits.on_refused("max_connections")
        self._full.happened(
            f"{self._limits.max_connections} connections open (server.max_connections); "
            "new connections get a 503 and are closed"
        )
        try:
            conn.setblocking(False)
            conn.send(REFUSED)  # fits any socket buffer: sent whole or not at all
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone already; closing is all that is left
        finally:
            conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as create_server does
        protocol = self._factory()
        task: asyncio.Task[object] = self._loop.create_task(self._loop.connect_accepted_socket(lambda: protocol, conn))
        self._connecting[task] = protocol
        task.add_done_callback(lambda t: self._connected(t, conn))

    def _connected(self, task: asyncio.Task[object], conn: socket.socket) -> None:
        del self._connecting[task]
        if task.cancelled():
            conn.close()
            return
        if (e := task.exception()) is not None:
            log.error("a new connection could not be set up: %s", e)
            conn.close()


def bind(host: str, port: int, backlog: int, *, reuse_port: bool = False, listen: bool = True) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as `loop.create_server` makes them.

    `reuse_port` (SO_REUSEPORT, `proxy serve --workers N`): each worker binds its own socket on
    the same port and the kernel spreads new connections over the listening ones. With `listen`
    false the sockets are only bound: the supervisor holds the port that way (a socket that does
    not listen is never given a connection), and learns which port 0 chose."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # every address on the port the first one was given
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            if listen:
                sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
