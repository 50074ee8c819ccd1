"""How a tier's host is reached: a private CA (`ca_bundle`), no certificate check (`verify_tls:
false`, warned about) and an HTTP proxy (`http_proxy`), against real servers on loopback."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import ConfigError
from proxy.ops.check import describe
from proxy.sim import SIM_STATS, SimSettings, create_sim_app
from tests.conftest import make_config
from tests.support.server import ProxyTestServer

MSG = {"model": "auto", "messages": [{"role": "user", "content": "plan"}]}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, standing for a private CA."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "upstream.pem", d / "upstream.key"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    args += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)]
    subprocess.run(["openssl", *args], check=True, capture_output=True)
    return crt, key


async def https_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]], cert: tuple[Path, Path]) -> Any:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    app = create_sim_app(SimSettings(name="tls"))
    server = await aiohttp_server(app, ssl=ctx)
    return f"https://127.0.0.1:{server.port}/v1", app[SIM_STATS]


def one_tier(url: str, tmp_path: Path, **transport: Any) -> dict[str, Any]:
    return {
        "tiers": {"llama": {"base_url": url, "model": "m", "timeout_seconds": 2.0, **transport}},
        "ledger": {"path": str(tmp_path / "ledger.db")},
    }


async def test_a_private_ca_is_trusted_only_when_configured(
    aiohttp_client: Any, aiohttp_server: Any, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    url, stats = await https_upstream(aiohttp_server, cert)
    plain = await aiohttp_client(ProxyTestServer(create_app(make_config(one_tier(url, tmp_path)))))
    refused = await plain.post("/v1/chat/completions", json=MSG)
    assert refused.status == 502, "an unknown CA is not trusted"
    assert "certificate" in (await refused.json())["error"]["message"].lower()
    assert stats.hits == 0, "no request reached a server whose certificate failed"

    config = make_config(one_tier(url, tmp_path / "b", ca_bundle=str(cert[0])))
    trusted = await aiohttp_client(ProxyTestServer(create_app(config)))
    ok = await trusted.post("/v1/chat/completions", json=MSG)
    assert ok.status == 200 and stats.hits == 1
    assert f"TLS checked against {cert[0]}" in describe(config)


async def test_verify_tls_off_works_and_says_so_loudly(
    aiohttp_client: Any, aiohttp_server: Any, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    url, stats = await https_upstream(aiohttp_server, cert)
    config = make_config(one_tier(url, tmp_path, verify_tls=False))
    assert any("NOT checked" in w and "'llama'" in w for w in config.warnings), config.warnings
    assert "NOT checked" in describe(config)
    client = await aiohttp_client(ProxyTestServer(create_app(config)))
    assert (await client.post("/v1/chat/completions", json=MSG)).status == 200 and stats.hits == 1


async def test_calls_go_through_the_http_proxy(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    # The simulated upstream doubles as the proxy: it answers the absolute-form request itself,
    # which only arrives there if the tier really goes through it (the tier's host does not exist).
    app = create_sim_app(SimSettings(name="via-proxy"))
    forward = await aiohttp_server(app)
    raw = one_tier(
        "http://upstream.invalid/v1", tmp_path, http_proxy=f"http://user:hunter2-proxy-pass@127.0.0.1:{forward.port}"
    )
    config = make_config(raw)
    client = await aiohttp_client(ProxyTestServer(create_app(config)))
    resp = await client.post("/v1/chat/completions", json=MSG)
    assert resp.status == 200, await resp.text()
    seen = app[SIM_STATS].requests[-1]
    assert seen.path == "/v1/chat/completions" and app[SIM_STATS].hits == 1
    assert "proxy-authorization" in seen.headers, "the proxy's credentials go to the proxy"
    shown = describe(config)
    assert f"through the proxy http://127.0.0.1:{forward.port}" in shown
    assert "hunter2-proxy-pass" not in shown and "hunter2-proxy-pass" not in repr(config)
    assert config.redactor.clean(b"echo hunter2-proxy-pass") == b"echo [redacted]"


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        ({"ca_bundle": "/nonexistent/ca.pem"}, "tiers.llama.ca_bundle"),
        ({"http_proxy": "socks5://127.0.0.1:1080"}, "tiers.llama.http_proxy"),
        ({"http_proxy": "proxy.internal:3128"}, "tiers.llama.http_proxy"),
    ],
)
def test_bad_transport_settings_are_config_errors(transport: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(one_tier("https://127.0.0.1:9/v1", tmp_path, **transport))
