"""The proxy app on a test server that runs it as `proxy serve` does (proxy.server's runner:
protocol errors in OpenAI's format, the configured idle timeout)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from proxy.server import runner_for
from proxy.state import STATE


class ProxyTestServer(TestServer):
    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        # TestServer's own kwargs (handler_cancellation) are what runner_for sets already.
        return runner_for(self.app, self.app[STATE].config.server)
