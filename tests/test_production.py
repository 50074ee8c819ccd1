"""Running it in production: client keys, limits, secrets, reload, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp.test_utils import TestServer

from proxy.config import build_config
from proxy.gateway.state import STATE
from proxy.ledger import Ledger
from proxy.ops.reload import apply_config
from proxy.ops.serve import _listen_host
from proxy.sim import SIM_STATS, Behaviour, SimSettings, create_sim_app
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config
from tests.support.faults import drip_until_closed
from tests.support.proc import closed_port_url, start_proxy
from tests.support.secret_scan import KIMI_PROCESS_KEY

MSG = {"messages": [{"role": "user", "content": "plan"}]}
PLANNER_KEY = "cli-planner-0123456789"
OTHER_KEY = "cli-other-9876543210"
KIMI_SECRET = KIMI_PROCESS_KEY
AUTH = {
    "keys": [
        {"name": "planner", "secret_env": "PLANNER_KEY", "requests_per_minute": 3},
        {"name": "other", "sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(), "daily_usd": 0.001},
    ]
}
ENV = {"PLANNER_KEY": PLANNER_KEY}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_client_keys_401_and_names_in_ledger(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(auth=AUTH, env=ENV)
    for headers, code in (
        ({}, "missing_api_key"),
        (bearer("wrong"), "invalid_api_key"),
        ({"Authorization": "Basic x"}, "missing_api_key"),
    ):
        resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == code
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/proxy/report")).status == 401
    assert (await client.get("/healthz")).status == 200
    assert sum(u.hits for u in upstreams.values()) == 0
    ok = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=bearer(OTHER_KEY))
    assert ok.status == 200
    got = upstreams["llama"].stats.requests[-1].headers
    assert "authorization" not in got, "the client's key never goes upstream"
    report = await client.get("/proxy/report", headers=bearer(PLANNER_KEY))
    assert report.status == 200
    await _ledger(client).flush()
    with sqlite3.connect(_db(client)) as conn:
        assert conn.execute("SELECT client FROM requests").fetchall() == [("other",)]


def _ledger(client: Any) -> Ledger:
    ledger = client.app[STATE].ledger
    assert ledger is not None
    return ledger


def _db(client: Any) -> str:
    return _ledger(client).store.location


async def test_rate_limit_is_429_with_retry_after(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(auth=AUTH, env=ENV)
    statuses = []
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=bearer(PLANNER_KEY))
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429]
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    other = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=bearer(OTHER_KEY))
    assert other.status == 200, "limits are per key"


async def test_daily_spend_cap_per_key_survives_restart(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["kimi"].always(Behaviour(no_usage=True))
    tiers = tier_config(upstreams, kimi={"price": {"per_call_usd": 0.0008}})
    client = await make_proxy(tiers=tiers, auth=AUTH, env=ENV)
    complex_ = {"X-Complexity": "complex", **bearer(OTHER_KEY)}
    first = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=complex_)
    second = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=complex_)
    assert (first.status, second.status) == (200, 200)
    third = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=complex_)
    assert third.status == 429 and (await third.json())["error"]["code"] == "daily_budget_exhausted"
    assert int(third.headers["Retry-After"]) <= 86400
    await client.close()
    again = await make_proxy(tiers=tiers, auth=AUTH, env=ENV)
    resp = await again.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=complex_)
    assert resp.status == 429
    planner = await again.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=bearer(PLANNER_KEY))
    assert planner.status == 200


async def test_body_too_large_is_413(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(server={"max_body_bytes": 1024})
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 2000}]}
    resp = await client.post("/v1/chat/completions", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert upstreams["llama"].hits == 0


async def test_slow_body_is_408_and_does_not_pin_the_server(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(server={"body_read_timeout_seconds": 0.2})
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"model": '
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 2)
    assert b" 408 " in status_line
    writer.close()
    # and the server still answers others
    assert (await client.post("/v1/chat/completions", json={"model": "auto", **MSG})).status == 200


async def test_tier_connection_cap(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(headers_delay=0.2))
    tiers = tier_config(upstreams, llama={"max_connections": 1})
    client = await make_proxy(tiers=tiers)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    headers = {"X-Tier": "llama", "X-Fallback": "off"}
    resps = await asyncio.gather(
        *(client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=headers) for _ in range(3))
    )
    assert [r.status for r in resps] == [200, 200, 200]
    assert loop.time() - t0 >= 0.6, "one connection at a time to llama"


async def test_reload_keeps_the_connection_cap_and_can_raise_it(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    """A call running across a reload still counts against its tier's cap; a reload that raises
    the cap (above what the first config allowed in all) takes effect."""
    upstreams["llama"].always(Behaviour(headers_delay=0.2))
    one = {"max_connections": 1}
    client = await make_proxy(tiers=tier_config(upstreams, llama=one, ollama=one, kimi=one))
    state = client.app[STATE]
    headers = {"X-Tier": "llama", "X-Fallback": "off"}
    loop = asyncio.get_running_loop()

    async def calls(n: int) -> float:
        t0 = loop.time()
        posts = [client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=headers) for _ in range(n)]
        assert [r.status for r in await asyncio.gather(*posts)] == [200] * n
        return loop.time() - t0

    running = asyncio.create_task(calls(1))
    await asyncio.sleep(0.05)
    same_cap = make_config({"tiers": tier_config(upstreams, llama={**one, "model": "other"}, ollama=one, kimi=one)})
    await apply_config(state, same_cap)
    assert await calls(1) >= 0.3, "the call started before the reload still holds llama's one connection"
    await running

    raised = tier_config(upstreams, llama={"max_connections": 8}, ollama=one, kimi=one)
    await apply_config(state, make_config({"tiers": raised}))
    assert await calls(8) < 0.35, "eight calls at once after the reload raised the cap to 8"


async def test_reload_applies_keys_prices_and_budgets(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    state = client.app[STATE]
    ledger = {"path": _db(client)}
    complex_ = {"X-Complexity": "complex"}

    async def post(headers: dict[str, str]) -> Any:
        resp = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=headers)
        await resp.read()
        return resp

    assert (await post(complex_)).headers["X-Proxy-Tier"] == "kimi"

    await apply_config(state, make_config({"tiers": tier_config(upstreams), "auth": AUTH, "ledger": ledger}, ENV))
    assert (await post(complex_)).status == 401, "keys added by a reload are required at once"
    assert (await post({**complex_, **bearer(PLANNER_KEY)})).status == 200

    price = {"price": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}
    priced = {"tiers": tier_config(upstreams, kimi=price), "budgets": {"daily_usd": 0.01}, "ledger": ledger}
    await apply_config(state, make_config(priced))
    spent = await post(complex_)
    assert spent.status == 200 and spent.headers["X-Proxy-Tier"] == "kimi", "keys removed by a reload: open again"
    after = await post(complex_)
    assert after.headers["X-Proxy-Route"] == "budget", "the reloaded budget is spent by the reloaded price"
    assert after.headers["X-Proxy-Tier"] != "kimi"
    await _ledger(client).flush()
    with sqlite3.connect(_db(client)) as conn:
        costs = [c for (c,) in conn.execute("SELECT cost_usd FROM requests WHERE tier = 'kimi' ORDER BY started_at")]
    assert costs[:2] == [0.0, 0.0] and costs[2] > 0.01, costs


async def _serve_with_sim(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], extra: dict[str, Any], env: dict[str, str]
) -> tuple[Any, Any, Any]:
    settings = SimSettings(name="kimi")
    app = create_sim_app(settings)
    upstream = await aiohttp_server(app)
    config = {
        "tiers": {
            "llama": {"base_url": closed_port_url(), "model": "llama3.1:8b", "timeout_seconds": 1},
            "kimi": {
                "base_url": str(upstream.make_url("/v1")),
                "model": "kimi-k2.5",
                "paid": True,
                "api_key_env": "KIMI_KEY",
                "price": {"input_per_mtok": 0.6, "output_per_mtok": 2.5},
            },
        },
        "retries": {"max_fallback_retries": 1},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        **extra,
    }
    run = await start_proxy(tmp_path, config, {"KIMI_KEY": KIMI_SECRET, **env})
    return run, app[SIM_STATS], config


async def test_real_process_auth_metrics_and_no_secret_anywhere(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    run, stats, _ = await _serve_with_sim(tmp_path, aiohttp_server, {"auth": AUTH}, ENV)
    seen: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{run.url}/v1/chat/completions"
            async with s.post(url, json={"model": "auto", **MSG}) as r:
                assert r.status == 401
                seen.append(await r.read())
            for i in range(3):
                body = {"model": "auto", "stream": i == 1, **MSG}
                async with s.post(url, json=body, headers=bearer(PLANNER_KEY)) as r:
                    assert r.status == 200
                    assert r.headers["X-Proxy-Tier"] == "kimi"
                    seen.append(await r.read() + str(r.headers).encode())
            async with s.post(url, json={"model": "auto", **MSG}, headers=bearer(PLANNER_KEY)) as r:
                assert r.status == 429 and "Retry-After" in r.headers
                seen.append(await r.read())
            async with s.get(f"{run.url}/metrics") as r:
                assert r.status == 401, "with client keys, /metrics needs one"
                seen.append(await r.read())
            # the planner's rate is used up: a scrape is not counted against it
            async with s.get(f"{run.url}/metrics", headers=bearer(PLANNER_KEY)) as r:
                assert r.status == 200
                metrics = await r.text()
            async with s.get(f"{run.url}/proxy/report", headers=bearer(OTHER_KEY)) as r:
                seen.append(await r.read())
        assert 'proxy_requests_total{outcome="ok",route="default",tier="kimi"} 3.0' in metrics
        assert 'proxy_attempts_total{outcome="connect_error",tier="llama"} 3.0' in metrics
        assert stats.hits == 3
        assert stats.requests[-1].headers["authorization"] == f"Bearer {KIMI_SECRET}"
    finally:
        assert await run.stop() == 0
    ledger = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    outputs = {"responses": b"".join(seen), "metrics": metrics.encode(), "log": run.log.read_bytes(), "ledger": ledger}
    for where, data in outputs.items():
        for secret in (KIMI_SECRET, PLANNER_KEY, OTHER_KEY):
            assert secret.encode() not in data, f"{secret[:8]}... leaked into {where}"


async def test_sighup_reloads_good_config_and_rejects_bad(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    run, stats, config = await _serve_with_sim(tmp_path, aiohttp_server, {}, {})
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{run.url}/v1/chat/completions"
            slow = asyncio.create_task(s.post(url, json={"model": "kimi", "stream": True, **MSG}))
            config["tiers"]["kimi"]["model"] = "kimi-k2.6"
            run.config_path.write_text(yaml.safe_dump(config))
            run.signal(signal.SIGHUP)
            for _ in range(100):
                if "reloaded" in run.log_text():
                    break
                await asyncio.sleep(0.02)
            async with s.post(url, json={"model": "auto", **MSG}) as r:
                assert r.headers["X-Proxy-Model"] == "kimi-k2.6"
            assert stats.requests[-1].json["model"] == "kimi-k2.6"
            resp = await slow
            assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")

            run.config_path.write_text("routing: {primary: nowhere}\n")
            run.signal(signal.SIGHUP)
            for _ in range(100):
                if "reload rejected" in run.log_text():
                    break
                await asyncio.sleep(0.02)
            assert "routing.primary" in run.log_text()
            async with s.post(url, json={"model": "auto", **MSG}) as r:
                assert r.status == 200 and r.headers["X-Proxy-Model"] == "kimi-k2.6"
    finally:
        assert await run.stop() == 0


def test_loopback_only_without_keys() -> None:
    open_config = build_config({"server": {"host": "0.0.0.0"}}, "<t>", {})
    assert _listen_host(open_config, None) == "127.0.0.1"
    assert _listen_host(open_config, "0.0.0.0") == "0.0.0.0"
    keyed = build_config({"server": {"host": "0.0.0.0"}, "auth": AUTH}, "<t>", ENV)
    assert _listen_host(keyed, None) == "0.0.0.0"


async def test_real_process_drops_slow_heads_and_answers_bad_http_in_json(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    run, stats, _ = await _serve_with_sim(tmp_path, aiohttp_server, {"server": {"idle_timeout_seconds": 0.3}}, {})
    host, port = "127.0.0.1", int(run.url.rsplit(":", 1)[1])
    try:
        silent = await asyncio.open_connection(host, port)
        drip = await asyncio.open_connection(host, port)
        drip[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{run.url}/v1/chat/completions", json={"model": "auto", **MSG}) as r,
        ):
            assert r.status == 200, "a slow client does not hold up the others"
        took = await drip_until_closed(*drip, 3)
        assert 0.25 <= took < 2, f"a dripped request head is cut off at the idle timeout, not after {took:.2f} s"
        assert await asyncio.wait_for(silent[0].read(), 2) == b"", "a connection that sends nothing is closed"

        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"post /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        answer = await asyncio.wait_for(reader.read(), 2)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request") and b"application/json" in head, answer
        assert orjson.loads(body)["error"]["code"] == "malformed_http", answer
        assert stats.hits == 1
    finally:
        assert await run.stop() == 0
    assert "refused a malformed HTTP request" in run.log_text()


async def test_idle_timeout_never_cuts_a_call_in_progress(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    """The idle timeout (0.1 s here) bounds waiting for a request head, not answering: a stream
    and a slow answer that each take ~0.4 s complete, on fresh and on reused connections."""
    upstreams["llama"].script(
        Behaviour(chunks=20, chunk_delay=0.02),
        Behaviour(headers_delay=0.4),
        Behaviour(chunks=20, chunk_delay=0.02),
    )
    client = await make_proxy(
        server={"idle_timeout_seconds": 0.1}, tiers=tier_config(upstreams, llama={"timeout_seconds": 5})
    )
    for stream in (True, False, True):
        async with client.post("/v1/chat/completions", json={"model": "auto", "stream": stream, **MSG}) as r:
            body = await r.read()
            assert r.status == 200 and r.headers["X-Proxy-Tier"] == "llama", body
            assert body.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in body
