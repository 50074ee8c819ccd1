"""With client keys configured, /metrics and /readyz tell a caller without a key no more than
probes need: /readyz its status code and status, /metrics nothing (401) unless
`server.public_metrics`; /healthz stays open. A valid key sees everything, and scraping does
not use up the key's rate."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.gateway.state import STATE
from proxy.ops.reload import apply_config
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config
from tests.test_openapi import check

KEY = "sk-ops-0123456789abcdef"
AUTH = {"keys": [{"name": "ops", "secret_env": "OPS_KEY", "requests_per_minute": 1}]}
ENV = {"OPS_KEY": KEY}
GOOD = {"Authorization": f"Bearer {KEY}"}
BAD = {"Authorization": "Bearer sk-guessed"}
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "plan"}]}

Client = TestClient[web.Request, web.Application]


async def _get(client: Client, path: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    resp = await client.get(path, headers=headers or {})
    body = await resp.read()
    check(resp, body, path, "get")
    return resp, body


async def test_without_a_key_readyz_tells_only_its_status_and_metrics_nothing(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(auth=AUTH, env=ENV)
    resp, body = await _get(client, "/readyz")
    assert resp.status == 200 and await resp.json() == {"status": "ready"}
    assert b"llama" not in body and b"<test>" not in body
    resp, body = await _get(client, "/metrics")
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
    assert b"proxy_" not in body
    head = await client.head("/metrics")
    assert head.status == 401
    for path in ("/readyz", "/metrics"):
        resp, _ = await _get(client, path, BAD)
        assert resp.status == 401, path
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    resp, _ = await _get(client, "/healthz")
    assert resp.status == 200


async def test_a_valid_key_sees_the_detail_and_scrapes_do_not_spend_its_rate(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(auth=AUTH, env=ENV)
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=GOOD)).status == 200
    for _ in range(5):  # the key allows one request a minute; these are not requests of that kind
        resp, _ = await _get(client, "/readyz", GOOD)
        doc = await resp.json()
        assert resp.status == 200 and doc["tiers"]["llama"]["breaker"] == "closed" and doc["config"] == "<test>"
        resp, body = await _get(client, "/metrics", GOOD)
        assert resp.status == 200 and b'proxy_requests_total{outcome="ok",route="default",tier="llama"} 1.0' in body
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=GOOD)
    assert resp.status == 429, "a scrape refilled the key's bucket, or was not counted apart"


async def test_public_metrics_opens_metrics_but_not_readyz_detail(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(auth=AUTH, env=ENV, server={"public_metrics": True})
    resp, body = await _get(client, "/metrics")
    assert resp.status == 200 and b"proxy_breaker_state" in body
    resp, _ = await _get(client, "/readyz")
    assert await resp.json() == {"status": "ready"}


async def test_not_ready_is_still_503_for_a_probe_without_a_key(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    tiers = tier_config(upstreams)
    only_kimi = {"kimi": {**tiers["kimi"], "api_key_env": "UNSET_OPS_KEY"}}
    client = await make_proxy(tiers=only_kimi, routing={"primary": "kimi"}, auth=AUTH, env=ENV)
    resp, _ = await _get(client, "/readyz")
    assert resp.status == 503 and await resp.json() == {"status": "not_ready"}
    resp, _ = await _get(client, "/readyz", GOOD)
    assert resp.status == 503 and "UNSET_OPS_KEY" in (await resp.json())["tiers"]["kimi"]["reason"]


async def test_without_keys_both_stay_open_and_keys_added_by_a_reload_guard_them(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Any
) -> None:
    client = await make_proxy()
    resp, _ = await _get(client, "/readyz")
    assert set(await resp.json()) == {"status", "config", "tiers"}
    assert (await _get(client, "/metrics"))[0].status == 200
    state = client.server.app[STATE]
    ledger = {"path": str(tmp_path / "ledger.db")}
    await apply_config(state, make_config({"tiers": tier_config(upstreams), "auth": AUTH, "ledger": ledger}, ENV))
    assert (await _get(client, "/metrics"))[0].status == 401
    resp, _ = await _get(client, "/readyz")
    assert resp.status == 200 and await resp.json() == {"status": "ready"}
    assert (await _get(client, "/metrics", GOOD))[0].status == 200
