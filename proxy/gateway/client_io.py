"""The client side of a request: the one place where errors of our client's connection become ours.

- reading the body: too large, an unreadable encoding, too slow -> 413 / 400 / 408
- writing to the client: it went away, or stopped reading for `client_write_timeout_seconds`
  -> `ClientGone` (`ClientTooSlow`), or a cancellation of the request (a client that leaves or
  stalls is not a failure of the tier that was answering it)
- what aiohttp raises or refuses around the handlers: its HTTP errors (404 / 405 / 413), an
  `Expect` other than 100-continue, a request its parser cannot read -> our errors, in
  OpenAI's format like every other error
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestPayloadError

from proxy.config import ServerSpec
from proxy.errors import (
    BadRequest,
    ExpectationFailed,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    error_response,
)
from proxy.records import Api

log = logging.getLogger("proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ClientGone(Exception):
    """Writing to our client failed: it went away mid-stream."""

    def __init__(self, reason: str = "client disconnected mid-stream") -> None:
        super().__init__(reason)


class ClientTooSlow(ClientGone):
    """The client stopped reading: one write could not be handed to its socket within the timeout."""


@dataclass(frozen=True, slots=True)
class _Sink:
    """What a committed stream needs to cut its client: the request (for its transport) and the timeout."""

    request: web.BaseRequest
    write_timeout: float


_SINK = web.ResponseKey("proxy_client_sink", _Sink)


async def read_body(request: web.Request, server: ServerSpec) -> bytes:
    try:
        async with asyncio.timeout(server.body_read_timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than {server.max_body_bytes} bytes (server.max_body_bytes).",
            code="request_too_large",
        ) from None
    except RequestPayloadError as e:
        raise BadRequest(
            f"The request body cannot be read: {e}. Check its Content-Encoding.", code="invalid_body"
        ) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {server.body_read_timeout_seconds:g} s.",
            code="body_timeout",
        ) from None


# How a stream's last event ends, and how much of it to hold back: the line break that makes
# the blank line an SSE client needs before it acts on the event (a CR alone ends a line too).
_DONE_ENDS = ((b"[DONE]\r\n\r\n", 2), (b"[DONE]\n\n", 1))
# A Responses stream has no [DONE]: its last event is the response's final state.
_FINAL_RESPONSE = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')


class HeldEndStream(web.StreamResponse):
    """A committed stream that holds back the end of its final event (`[DONE]`, or a Responses
    stream's `response.completed`) until `write_eof`, which the handler calls only after the
    record is journaled: a client that saw its stream complete has its ledger row even if the
    proxy is killed the next instant. The relay writes whole events, so the check is a suffix
    test per write (and, for a Responses stream, a search in its last event)."""

    _held = b""
    _responses = False

    @classmethod
    def for_api(cls, api: Api, **kwargs: Any) -> HeldEndStream:
        resp = cls(**kwargs)
        resp._responses = api is Api.RESPONSES
        return resp

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        data = self._held + bytes(data) if self._held else bytes(data)
        self._held = b""
        keep = self._final_end(data)
        if keep:
            data, self._held = data[:-keep], data[-keep:]
        if data:
            await super().write(data)

    def _final_end(self, data: bytes) -> int:
        for end, keep in _DONE_ENDS:
            if data.endswith(end):
                return keep
        if self._responses:
            keep = 2 if data.endswith(b"\r\n\r\n") else 1 if data.endswith(b"\n\n") else 0
            last = data[data.rfind(b"\n\n", 0, len(data) - keep - 1) + 1 :]
            if keep and any(m in last for m in _FINAL_RESPONSE):
                return keep
        return 0

    async def write_eof(self, data: bytes = b"") -> None:
        held, self._held = self._held, b""
        await super().write_eof(held + data)


async def start_stream(resp: web.StreamResponse, request: web.Request, server: ServerSpec) -> None:
    """Send the status line and headers; a client already gone cancels the request. Later writes
    to `resp` (`write`, `end_stream`) wait at most `server.client_write_timeout_seconds` each."""
    resp[_SINK] = _Sink(request, server.client_write_timeout_seconds)
    try:
        await resp.prepare(request)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise asyncio.CancelledError from None


async def write(client: web.StreamResponse, data: bytes) -> None:
    """Raises ClientGone when the client has left, ClientTooSlow (and cuts it) when it does not
    take the bytes in time: a write blocks while the client's socket buffer is full."""
    if not data:
        return
    sink = client.get(_SINK)
    try:
        async with asyncio.timeout(sink.write_timeout if sink is not None else None):
            await client.write(data)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as e:
        raise ClientGone from e
    except TimeoutError:
        assert sink is not None  # no timeout without a sink
        _cut(sink)
        raise ClientTooSlow(
            f"client stopped reading the stream: a write waited over {sink.write_timeout:g} s"
            " (server.client_write_timeout_seconds)"
        ) from None


async def end_stream(resp: web.StreamResponse) -> None:
    """Finish a stream. A client that left right after the last event, or does not read its
    end in time, is only cut: its record was handed over before (chat.py checks whether the
    client was still there then)."""
    sink = resp.get(_SINK)
    try:
        async with asyncio.timeout(sink.write_timeout if sink is not None else None):
            await resp.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return
    except TimeoutError:
        assert sink is not None
        _cut(sink)


def _cut(sink: _Sink) -> None:
    """Drop a client that stopped reading. Closing would wait for it to read what is buffered,
    which holds the socket and its buffers for as long as the client likes: abort instead, with
    a zero linger so the kernel resets the connection rather than keep sending its send buffer
    (megabytes on a fast link) to a reader that may never come back."""
    transport = sink.request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's format, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ProxyError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(_as_proxy_error(request, e))


def _as_proxy_error(request: web.Request, e: web.HTTPException) -> ProxyError:
    if e.status == 404:
        return NotFound(f"Unknown endpoint {request.method} {request.path}.", code="unknown_url")
    if e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        return MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allowed or 'another method'}.",
            code="method_not_allowed",
            headers={"Allow": allowed} if allowed else None,
        )
    if e.status == 413:
        return PayloadTooLarge(f"The request body is too large ({e.reason}).", code="request_too_large")
    err = ProxyError(e.reason or "HTTP error", code=None)
    err.status = e.status
    return err


async def expect(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue` is answered as aiohttp does; any other expectation gets a 417 in
    OpenAI's format (aiohttp's own answer is text/plain and skips the middlewares)."""
    value = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if value.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not the start of the real one
        return None
    return error_response(
        ExpectationFailed(
            f"Unsupported Expect header {value!r}: only 100-continue is supported; remove the header.",
            code="expectation_failed",
        )
    )


def protocol_error(
    request: web.BaseRequest, status: int, exc: BaseException | None, message: str | None
) -> web.Response:
    """The answer to what escaped every handler and middleware: a request aiohttp's parser
    could not read (4xx), or an exception nothing caught (500)."""
    err: ProxyError
    if status >= 500:
        # The message of an escaped exception may hold request data: it goes to the log, not the client.
        log.error("error handling %s %s (answered %d)", request.method, request.path, status, exc_info=exc)
        err = ProxyError(
            "The proxy failed to handle this request; the error is in its log. Retry the request.",
            code="internal_error",
        )
    else:
        # The parser's message names what was wrong (it may quote the offending bytes, which
        # are the client's own); the log gets only its kind, never request data.
        log.info("refused a malformed HTTP request from %s: %s", request.remote, type(exc).__name__)
        reason = " ".join((message or "unreadable").split())  # the parser's message spans lines
        err = BadRequest(
            f"The request is not valid HTTP/1.1 ({reason}). Send a well-formed request, as the OpenAI SDK does.",
            code="malformed_http",
        )
    err.status = status
    resp = error_response(err)
    resp.force_close()
    return resp
