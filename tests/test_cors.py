"""server.cors: off by default; preflights from listed origins answered without a key; CORS headers on
every answer to them (errors, 401s and streams included); other origins refused before any tier is
called. The browser itself is in tests/test_cors_browser.py."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.config import ConfigError, build_config
from proxy.gateway.cors import ALLOW_HEADERS
from proxy.gateway.state import STATE
from proxy.ops.check import describe
from proxy.ops.reload import apply_config
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config
from tests.support.faults import openai_error

APP = "http://app.example:5173"
OTHER = "https://evil.example"
KEY = "cors-web-key-0123456789"
AUTH = {"keys": [{"name": "web", "secret_env": "CORS_WEB_KEY"}]}
ENV = {"CORS_WEB_KEY": KEY}
BODY = {"model": "auto", "messages": [{"role": "user", "content": "plan"}]}
CHAT = "/v1/chat/completions"
REQUIRED_ALLOW = (
    "Authorization",
    "Content-Type",
    "X-Replan",
    "X-Complexity",
    "X-Tier",
    "X-Fallback",
    "X-Proxy-Check",
    "X-Request-Id",
    # what openai-node sends from a browser (dangerouslyAllowBrowser: true)
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Retry-Count",
    "X-Stainless-Timeout",
)


def preflight_headers(origin: str = APP, **extra: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-tier,x-stainless-lang",
        **extra,
    }


def names(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


async def keyed_proxy(make_proxy: ProxyFactory, *origins: str) -> TestClient[Any, Any]:
    return await make_proxy(server={"cors": list(origins or (APP,))}, auth=AUTH, env=ENV)


async def test_off_by_default_preflight_is_405_and_answers_carry_no_cors_headers(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy()
    resp = await client.options(CHAT, headers=preflight_headers())
    assert resp.status == 405
    openai_error(await resp.json())
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post(CHAT, json=BODY, headers={"Origin": APP})
    assert resp.status == 200, await resp.text()
    assert not {h for h in resp.headers if h.lower().startswith("access-control-")}
    assert "Vary" not in resp.headers
    assert upstreams["llama"].hits == 1


async def test_preflight_from_an_allowed_origin_needs_no_key(make_proxy: ProxyFactory) -> None:
    client = await keyed_proxy(make_proxy)
    resp = await client.options(CHAT, headers=preflight_headers())
    assert resp.status == 204, await resp.text()
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert names(resp.headers["Access-Control-Allow-Methods"]) >= {"post", "get", "options"}
    allowed = names(resp.headers["Access-Control-Allow-Headers"])
    assert allowed >= {h.lower() for h in REQUIRED_ALLOW}, allowed
    assert int(resp.headers["Access-Control-Max-Age"]) >= 600
    assert "origin" in names(resp.headers["Vary"])
    assert "Access-Control-Allow-Credentials" not in resp.headers  # keys travel in Authorization, not cookies
    assert await resp.read() == b""
    # a preflight for any path: the request that follows gets its own answer (404 here)
    resp = await client.options("/v1/nowhere", headers=preflight_headers())
    assert resp.status == 204


async def test_preflight_allows_new_stainless_headers_and_private_network(make_proxy: ProxyFactory) -> None:
    client = await keyed_proxy(make_proxy)
    asked = "content-type, x-stainless-brand-new, x-stainless-lang"
    resp = await client.options(
        CHAT,
        headers=preflight_headers(
            **{"Access-Control-Request-Headers": asked, "Access-Control-Request-Private-Network": "true"}
        ),
    )
    assert resp.status == 204
    allowed = names(resp.headers["Access-Control-Allow-Headers"])
    assert "x-stainless-brand-new" in allowed
    assert len(allowed) == len(ALLOW_HEADERS) + 1  # listed once each, nothing else reflected
    assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
    resp = await client.options(CHAT, headers=preflight_headers(**{"Access-Control-Request-Headers": "x-evil"}))
    assert "x-evil" not in names(resp.headers["Access-Control-Allow-Headers"])
    assert "Access-Control-Allow-Private-Network" not in resp.headers


async def test_preflight_from_another_origin_is_403_in_openai_format(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await keyed_proxy(make_proxy)
    resp = await client.options(CHAT, headers=preflight_headers(OTHER))
    assert resp.status == 403
    err = openai_error(await resp.json())
    assert err["code"] == "origin_not_allowed"
    assert OTHER in err["message"] and "server.cors" in err["message"]
    assert APP not in err["message"]  # the allowed origins are not told to strangers
    assert not {h for h in resp.headers if h.lower().startswith("access-control-")}


async def test_answers_to_an_allowed_origin_carry_cors_headers(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await keyed_proxy(make_proxy)
    auth = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
    plain = await client.post(CHAT, json=BODY, headers=auth)
    stream = await client.post(CHAT, json={**BODY, "stream": True}, headers=auth)
    no_key = await client.post(CHAT, json=BODY, headers={"Origin": APP})
    bad_model = await client.post(CHAT, json={**BODY, "model": "nope"}, headers=auth)
    models = await client.get("/v1/models", headers=auth)
    assert (plain.status, stream.status, no_key.status, bad_model.status, models.status) == (200, 200, 401, 404, 200)
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert b"data: [DONE]" in await stream.read()
    assert openai_error(await no_key.json())["code"] == "missing_api_key"
    for resp in (plain, stream, no_key, bad_model, models):
        assert resp.headers["Access-Control-Allow-Origin"] == APP, resp.headers
        assert "origin" in names(resp.headers["Vary"])
        exposed = names(resp.headers["Access-Control-Expose-Headers"])
        assert exposed >= {"x-request-id", "x-proxy-tier", "x-proxy-route", "x-proxy-attempts", "retry-after"}
        assert "Access-Control-Allow-Credentials" not in resp.headers
    assert upstreams["llama"].hits == 2  # the 401 and the 404 called no tier


async def test_answers_without_origin_vary_on_it_but_carry_no_cors_headers(make_proxy: ProxyFactory) -> None:
    client = await keyed_proxy(make_proxy)
    resp = await client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status == 200
    assert "origin" in names(resp.headers["Vary"])
    assert "Access-Control-Allow-Origin" not in resp.headers
    health = await client.get("/healthz")
    assert health.status == 200 and "origin" in names(health.headers["Vary"])


async def test_requests_from_another_origin_are_refused_before_any_tier(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await keyed_proxy(make_proxy)
    # a "simple" request (text/plain): the browser sends it without a preflight
    resp = await client.post(
        CHAT,
        data=b'{"model": "auto", "messages": [{"role": "user", "content": "x"}]}',
        headers={"Origin": OTHER, "Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 403
    assert openai_error(await resp.json())["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert sum(u.hits for u in upstreams.values()) == 0
    # a page of the proxy's own origin (Sec-Fetch-Site: same-origin) is not a cross-origin caller
    resp = await client.post(
        CHAT,
        json=BODY,
        headers={"Origin": OTHER, "Sec-Fetch-Site": "same-origin", "Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    # ... but a same-origin preflight does not exist: one claiming to be is still refused
    resp = await client.options(CHAT, headers=preflight_headers(OTHER, **{"Sec-Fetch-Site": "same-origin"}))
    assert resp.status == 403


async def test_star_allows_every_origin_with_a_key(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await keyed_proxy(make_proxy, "*")
    resp = await client.options(CHAT, headers=preflight_headers(OTHER))
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await client.post(CHAT, json=BODY, headers={"Origin": OTHER})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await client.post(CHAT, json=BODY, headers={"Origin": OTHER, "Authorization": f"Bearer {KEY}"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_reload_turns_cors_on_and_off(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    state = client.app[STATE] if client.app is not None else None
    assert state is not None
    raw: dict[str, Any] = {"tiers": tier_config(upstreams), "ledger": {"path": state.config.ledger.path}}
    assert (await client.options(CHAT, headers=preflight_headers())).status == 405
    await apply_config(state, make_config({**raw, "server": {"cors": [APP]}}))
    assert (await client.options(CHAT, headers=preflight_headers())).status == 204
    assert (await client.post(CHAT, json=BODY, headers={"Origin": OTHER})).status == 403
    await apply_config(state, make_config(raw))
    assert (await client.options(CHAT, headers=preflight_headers())).status == 405
    assert (await client.post(CHAT, json=BODY, headers={"Origin": OTHER})).status == 200


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("https://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443/", "https://app.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://localhost:5173", "http://localhost:5173"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
        ("tauri://localhost", "tauri://localhost"),
    ],
)
def test_origins_are_stored_as_browsers_send_them(given: str, stored: str) -> None:
    config = build_config({"server": {"cors": [given]}}, "<t>", {})
    assert config.cors.origins == frozenset({stored})
    assert config.cors.allows(stored) and not config.cors.any_origin


@pytest.mark.parametrize(
    ("origins", "auth", "message"),
    [
        (["*"], {}, "'*' needs client keys (auth.keys)"),
        (["*", APP], AUTH, "list either '*' or exact origins"),
        (["null"], {}, "'null' cannot be allowed"),
        (["https://*.example.com"], {}, "is not an origin"),
        (["https://app.example.com/chat"], {}, "is not an origin"),
        (["app.example.com"], {}, "is not an origin"),
        (["localhost:5173"], {}, "is not an origin"),
        (["http://user:pw@app.example"], {}, "no user name or password"),
    ],
)
def test_bad_origins_are_config_errors_naming_the_key(origins: list[str], auth: dict[str, Any], message: str) -> None:
    raw: dict[str, Any] = {"server": {"cors": origins}}
    if auth:
        raw["auth"] = auth
    with pytest.raises(ConfigError) as e:
        build_config(raw, "proxy.yaml", ENV)
    assert str(e.value).startswith("proxy.yaml: server.cors: "), e.value
    assert message in str(e.value)


def test_proxy_check_shows_the_origins() -> None:
    assert "cors: off" in describe(build_config({}, "<t>", {}))
    text = describe(build_config({"server": {"cors": [APP, "https://B.example/"]}}, "<t>", {}))
    assert f"cors: pages from {APP}, https://b.example may call; other origins get 403" in text
    text = describe(build_config({"server": {"cors": ["*"]}, "auth": AUTH}, "<t>", ENV))
    assert "cors: pages from any origin may call with a client key" in text
