"""Shared fixtures: simulated upstream tiers, the proxy in front of them, the real llama.cpp server,
real PostgreSQL and Redis servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import Config, build_config
from proxy.sim import SIM_STATS, Behaviour, SimSettings, SimStats, create_sim_app
from tests.support.faults import SimThread
from tests.support.llamacpp import LlamaCppServer
from tests.support.postgres import PostgresServer, remove, start_server
from tests.support.redis_server import RedisServer
from tests.support.secret_scan import KIMI_KEY, SCAN
from tests.support.server import ProxyTestServer
from tests.support.tiny_gguf import write_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SCAN, "secret-scan")


@pytest.fixture(scope="session", autouse=True)
def _secret_scan_covers_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    SCAN.basetemp = tmp_path_factory.getbasetemp()


FAST = {"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05, "request_deadline_seconds": 5.0}


@dataclass
class Upstream:
    """One simulated tier: its URL, its knobs and what it saw."""

    name: str
    url: str
    settings: SimSettings
    stats: SimStats

    @property
    def hits(self) -> int:
        return self.stats.hits

    def script(self, *behaviours: Behaviour) -> None:
        self.settings.script.extend(behaviours)

    def always(self, behaviour: Behaviour) -> None:
        self.settings.default = behaviour


@pytest.fixture
async def upstreams(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> dict[str, Upstream]:
    """Three simulated tiers named like the real ones."""
    result = {}
    for name in ("llama", "ollama", "kimi"):
        settings = SimSettings(name=name)
        app = create_sim_app(settings)
        server = await aiohttp_server(app)
        result[name] = Upstream(name, str(server.make_url("/v1")), settings, app[SIM_STATS])
    return result


def tier_config(ups: dict[str, Upstream], **overrides: dict[str, Any]) -> dict[str, Any]:
    tiers: dict[str, Any] = {
        "llama": {
            "base_url": ups["llama"].url,
            "model": "llama3.1:8b",
            "timeout_seconds": 1.0,
            "aliases": ["llama3.1-8b"],
        },
        "ollama": {"base_url": ups["ollama"].url, "model": "qwen2.5:7b", "timeout_seconds": 1.0},
        "kimi": {
            "base_url": ups["kimi"].url,
            "model": "kimi-k2.5",
            "paid": True,
            "aliases": ["kimi-k2"],
            "api_key_env": "TEST_KIMI_KEY",
            "timeout_seconds": 1.0,
        },
    }
    for tier_id, changes in overrides.items():
        tiers[tier_id] = {**tiers[tier_id], **changes}
    return tiers


def make_config(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    raw = dict(raw)
    raw["retries"] = {**FAST, **raw.get("retries", {})}
    return build_config(raw, "<test>", {"TEST_KIMI_KEY": KIMI_KEY, **(env or {})})


ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_proxy(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    upstreams: dict[str, Upstream],
    tmp_path: Path,
) -> ProxyFactory:
    """Start the proxy in front of the simulated tiers, its ledger in tmp_path/ledger.db;
    keyword args are config sections."""

    async def factory(
        tiers: dict[str, Any] | None = None, env: dict[str, str] | None = None, **sections: Any
    ) -> TestClient[web.Request, web.Application]:
        raw = {"tiers": tiers or tier_config(upstreams), **sections}
        raw["ledger"] = {"path": str(tmp_path / "ledger.db"), **raw.get("ledger", {})}
        return await aiohttp_client(ProxyTestServer(create_app(make_config(raw, env))))

    return factory


@pytest.fixture(scope="module")
def sims() -> Iterator[SimThread]:
    """llama, ollama and kimi simulated on their own event loop, for tests of a real `proxy serve`
    (tests/support/faults.py); one set per test module."""
    thread = SimThread()
    for name in ("llama", "ollama", "kimi"):
        thread.add(name)
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def llamacpp(llama_model: Path) -> Iterator[LlamaCppServer]:
    """The real llama.cpp server (xllamacpp wheel) on a tiny random model, shared by the run."""
    server = LlamaCppServer()
    server.start(llama_model)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def sim_server(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[Upstream]:
    settings = SimSettings(name="extra")
    app = create_sim_app(settings)
    server = await aiohttp_server(app)
    yield Upstream("extra", str(server.make_url("/v1")), settings, app[SIM_STATS])


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A real PostgreSQL server per test module (initdb in a temp dir: tests/support/postgres.py)."""
    server = start_server()
    yield server
    remove(server)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a loopback port, no persistence (tests/support/redis_server.py)."""
    server = RedisServer.start_in(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with no connection limit (load tests keep many calls in flight)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s
