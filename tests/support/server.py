"""The proxy app on a test server that runs it as `proxy serve` does (proxy.server's runner:
protocol errors in OpenAI's format, the configured idle timeout), its responses scanned for
upstream keys."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from proxy.gateway.state import STATE
from proxy.ops.runner import runner_for
from tests.support.secret_scan import SCAN


class ProxyTestServer(TestServer):
    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        # TestServer's own kwargs (handler_cancellation) are what runner_for sets already.
        self.app.on_response_prepare.append(SCAN.on_response_prepare)  # before setup freezes the app
        return runner_for(self.app, self.app[STATE].config.server)
