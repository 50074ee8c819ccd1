"""proxy/server.py: what no middleware answers still leaves in OpenAI's error format."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import ServerSpec
from proxy.ops.runner import runner_for


class _Runner(TestServer):
    async def _make_runner(self, **kwargs: object) -> web.AppRunner:
        return runner_for(self.app, ServerSpec())


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_an_escaped_exception_is_a_500_in_openai_format_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail sk-in-the-message")

    app = web.Application()
    app.router.add_get("/boom", boom)
    server = _Runner(app)
    await server.start_server()
    try:
        with caplog.at_level(logging.ERROR, logger="proxy"):
            answer = await _raw(server.port, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await server.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and b"application/json" in head, answer
    err = orjson.loads(body)["error"]
    assert err["code"] == "internal_error" and err["type"] == "server_error"
    assert b"sk-in-the-message" not in answer, "the exception's text stays in the log"
    assert "sk-in-the-message" in caplog.text and "GET /boom" in caplog.text
