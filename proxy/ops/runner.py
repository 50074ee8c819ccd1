"""The HTTP server under the app: aiohttp's, run by us instead of `web.run_app` for two reasons.

- What aiohttp refuses before any middleware runs (a request its HTTP parser cannot read, a
  handler that escaped every middleware) is answered in OpenAI's error format, like every other
  error, instead of aiohttp's text/plain page. SDKs parse `error.message`; a text page makes them
  raise a less helpful error.
- The idle timeout bounds the request head: aiohttp arms it when a connection opens and after
  each response, and closes the connection if no complete request head arrived by then, so a
  client that connects and sends nothing, or drips its headers (slowloris), does not pin a
  connection. The body has its own deadline (`body_read_timeout_seconds`, in the handler).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.config import ServerSpec
from proxy.gateway.client_io import protocol_error
from proxy.gateway.state import STATE
from proxy.ops.listener import Limits, Listener, bind

log = logging.getLogger("proxy")


class _Handler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error response can follow it")
        return protocol_error(request, status, exc, message)


class _Server(web.Server):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Live transports, dropped at connection_lost (when the descriptor is closed), not when
        # the handler task ends as `connections` is: what server.max_connections counts.
        self.open: set[RequestHandler] = set()

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open.add(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open.discard(handler)
        super().connection_lost(handler, exc)


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in OpenAI's format."""

    async def _make_server(self) -> _Server:
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )


class ProxySite(web.BaseSite):
    """A TCP site whose connections are accepted by `Listener`: within server.max_connections,
    and out of file descriptors logged and waited out (see proxy/ops/listener.py)."""

    def __init__(
        self,
        runner: ProxyRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        on_refused: Callable[[str], None],
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._reuse_port = reuse_port
        self._max_connections = max_connections
        self._on_refused = on_refused

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, _Server)
        limits = Limits(self._max_connections, lambda: server.open, self._on_refused)
        socks = bind(self._host, self._port, self._backlog, reuse_port=self._reuse_port)
        listener = Listener(asyncio.get_running_loop(), server, socks, limits)
        listener.start()
        self._server = listener


def runner_for(app: web.Application, spec: ServerSpec, *, handle_signals: bool = False) -> ProxyRunner:
    return ProxyRunner(
        app,
        handle_signals=handle_signals,
        access_log=None,  # the proxy logs one line per request itself, with what matters
        handler_cancellation=True,  # a client that leaves cancels its request, and the upstream call
        shutdown_timeout=spec.shutdown_timeout_seconds,
        keepalive_timeout=spec.idle_timeout_seconds,
    )


def run_until_stopped(
    app: web.Application,
    host: str,
    port: int,
    spec: ServerSpec,
    loop: asyncio.AbstractEventLoop,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, let requests in flight finish for up to
    `shutdown_timeout_seconds`, and run the app's cleanup (which flushes the ledger).
    `reuse_port`: one of several workers on the port (proxy/ops/workers.py), which `on_listening`
    tells once this one accepts connections."""
    asyncio.set_event_loop(loop)
    main = loop.create_task(_listen(app, host, port, spec, reuse_port, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()  # runs _listen's cleanup: the graceful part of the shutdown
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        _cancel_leftovers(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.run_until_complete(_threads_done())
        loop.close()


async def _listen(
    app: web.Application,
    host: str,
    port: int,
    spec: ServerSpec,
    reuse_port: bool,
    on_listening: Callable[[], None] | None,
) -> None:
    runner = runner_for(app, spec, handle_signals=True)  # SIGTERM/SIGINT raise GracefulExit here
    await runner.setup()
    try:
        metrics = app[STATE].metrics
        site = ProxySite(
            runner,
            host,
            port,
            max_connections=spec.max_connections,
            on_refused=metrics.connection_refused,
            reuse_port=reuse_port,
        )
        await site.start()
        config = app[STATE].config
        usable = ", ".join(t.id for t in config.usable_tiers) or "none"
        log.info("proxy listening on %s/v1 (config %s; usable tiers: %s)", site.name, config.source, usable)
        if on_listening is not None:
            on_listening()
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        log.info(
            "stopping: no new connections; requests in flight have up to %g s to finish "
            "(server.shutdown_timeout_seconds)",
            spec.shutdown_timeout_seconds,
        )
        raise
    finally:
        await runner.cleanup()


async def _threads_done(timeout: float = 1.0) -> None:
    """Wait briefly for worker threads: one that ends after the loop is closed cannot post its
    result to it and prints a traceback (aiosqlite's, after a database that failed to open)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()
    ):
        await asyncio.sleep(0.01)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
