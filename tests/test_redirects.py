"""No redirects: a 3xx from an upstream is a failed attempt naming where it pointed, the chain
moves on, and the host it named is never contacted (on 307/308 it would get the prompt, and its
answer would be billed as the paid tier's)."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.gateway.state import STATE
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.elsewhere import elsewhere

MSG = {"messages": [{"role": "user", "content": "hi"}]}
KIMI_PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 1.0, "per_call_usd": 0.01}


async def ledger_rows(client: TestClient[web.Request, web.Application], sql: str) -> list[tuple[Any, ...]]:
    ledger = client.app[STATE].ledger
    assert ledger is not None
    await ledger.flush()
    with sqlite3.connect(ledger.store.location) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_from_the_paid_tier_is_not_followed_nor_billed(
    code: int,
    stream: bool,
    make_proxy: ProxyFactory,
    upstreams: dict[str, Upstream],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    other_url, other_hits = await elsewhere(aiohttp_server)
    upstreams["kimi"].always(Behaviour(status=code, location=other_url, error_body=b'{"moved":"over there"}'))
    client = await make_proxy(tier_config(upstreams, kimi={"price": KIMI_PRICE}))
    resp = await client.post("/v1/chat/completions", json={"model": "kimi", "stream": stream, **MSG})
    body = await resp.read()
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama", body
    assert other_hits == [], "the redirect was followed"
    assert upstreams["kimi"].hits == 1, "a redirect is not retried on the same tier"
    assert b"over there" not in body
    attempts = await ledger_rows(client, "SELECT n, tier, http_status, error, cost_usd FROM attempts ORDER BY n")
    assert attempts[0] == (1, "kimi", code, f"HTTP {code} redirect to 127.0.0.2: not followed", 0.0)
    assert attempts[1][:3] == (2, "llama", 200)
    assert await ledger_rows(client, "SELECT tier, cost_usd FROM requests") == [("llama", 0.0)]


async def test_every_tier_redirecting_is_a_502_that_names_each_and_shows_no_3xx_body(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    other_url, other_hits = await elsewhere(aiohttp_server)
    for up in upstreams.values():
        up.always(Behaviour(status=307, location=other_url, error_body=b'{"error":{"message":"moved-body-marker"}}'))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    doc = await resp.json()
    assert resp.status == 502 and doc["error"]["code"] == "upstream_failed"
    message = doc["error"]["message"]
    assert message.count("HTTP 307 redirect to 127.0.0.2: not followed") == 3, message
    assert "moved-body-marker" not in message and other_hits == []


async def test_a_relative_or_missing_location_is_named_too(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(status=302, location="/v1/other"))
    upstreams["ollama"].always(Behaviour(status=308))
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG})
    assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "kimi"
    assert upstreams["llama"].stats.requests[-1].path == "/v1/chat/completions", "the same host was not re-asked"
    assert upstreams["llama"].hits == upstreams["ollama"].hits == 1
    errors = await ledger_rows(client, "SELECT error FROM attempts ORDER BY n")
    assert errors == [
        ("HTTP 302 redirect to 127.0.0.1: not followed",),
        ("HTTP 308 redirect to nowhere (no Location header): not followed",),
        (None,),
    ]
