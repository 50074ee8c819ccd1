"""The fallback chain through the real app and real (simulated) upstream servers.

Each test asserts what a user sees: status, headers, body, and how often each upstream was hit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.proc import closed_port_url
from tests.support.secret_scan import KIMI_KEY

MSG = {"messages": [{"role": "user", "content": "plan the next step"}]}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", **MSG, **extra}


def hits(ups: dict[str, Upstream]) -> dict[str, int]:
    return {name: u.hits for name, u in ups.items()}


async def test_default_chain_answers_from_llama(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    doc = await resp.json()
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert resp.headers["X-Proxy-Tier"] == "llama"
    assert resp.headers["X-Proxy-Route"] == "default"
    assert resp.headers["X-Proxy-Attempts"] == "1"
    assert resp.headers["X-Proxy-Model"] == "llama3.1:8b"
    assert len(resp.headers["X-Request-Id"]) >= 16
    assert hits(upstreams) == {"llama": 1, "ollama": 0, "kimi": 0}


async def test_5xx_retried_then_next_tier(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(status=500))
    client = await make_proxy(retries={"max_fallback_retries": 2})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert resp.headers["X-Proxy-Attempts"] == "3"
    assert hits(upstreams) == {"llama": 2, "ollama": 1, "kimi": 0}


async def test_free_tiers_down_falls_back_to_kimi_with_its_key(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(status=503))
    upstreams["ollama"].always(Behaviour(status=502))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer client-own-key"})
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "kimi"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 1}
    kimi_req = upstreams["kimi"].stats.requests[-1]
    assert kimi_req.headers["authorization"] == f"Bearer {KIMI_KEY}"
    for name in ("llama", "ollama"):
        seen = upstreams[name].stats.requests[-1].headers
        assert "authorization" not in seen, "a free tier must not get the client's or Kimi's key"


async def test_connection_refused_fails_over(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    tiers = tier_config(upstreams, llama={"base_url": closed_port_url()})
    client = await make_proxy(tiers=tiers, retries={"max_fallback_retries": 2})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert resp.headers["X-Proxy-Attempts"] == "3"  # refused twice (retryable), then ollama


async def test_timeout_goes_straight_to_next_tier(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(headers_delay=0.6))
    tiers = tier_config(upstreams, llama={"timeout_seconds": 0.15})
    client = await make_proxy(tiers=tiers, retries={"max_fallback_retries": 3})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}


async def test_429_retry_after_honoured_when_it_fits(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].script(Behaviour(status=429, retry_after="0.2"))
    client = await make_proxy(retries={"max_fallback_retries": 2})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert loop.time() - t0 >= 0.2
    assert resp.headers["X-Proxy-Tier"] == "llama"
    assert hits(upstreams) == {"llama": 2, "ollama": 0, "kimi": 0}


async def test_429_retry_after_beyond_deadline_fails_over_at_once(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].script(Behaviour(status=429, retry_after="120"))
    client = await make_proxy(retries={"max_fallback_retries": 3})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}


async def test_401_is_not_retried_on_that_tier(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(status=401))
    client = await make_proxy(retries={"max_fallback_retries": 3})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert hits(upstreams)["llama"] == 1


async def test_400_everywhere_passes_last_upstream_error_through(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    for name in ("llama", "ollama"):
        upstreams[name].always(
            Behaviour(status=400, error_body=b'{"error": {"message": "too long ' + name.encode() + b'"}}')
        )
    upstreams["kimi"].always(Behaviour(status=422, error_body=b'{"error": {"message": "kimi says no"}}'))
    client = await make_proxy(retries={"max_fallback_retries": 3})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 422
    assert await resp.read() == b'{"error": {"message": "kimi says no"}}'
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 1}, "a refusal is not retried on the same tier"


async def test_malformed_2xx_is_a_failure(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(malformed=True))
    upstreams["ollama"].always(Behaviour(not_completion=True))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert resp.headers["X-Proxy-Tier"] == "kimi"


async def test_all_failing_is_502_listing_attempts_without_secrets(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    for u in upstreams.values():
        u.always(Behaviour(status=500))
    client = await make_proxy(retries={"max_fallback_retries": 2, "max_total_retries": 3})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "upstream_failed"
    for name in ("llama #1", "llama #2", "ollama #3", "kimi #4"):
        assert name in err["message"]
    assert KIMI_KEY not in await resp.text()
    # per-tier cap 2, total cap 3, and kimi still got its first attempt
    assert hits(upstreams) == {"llama": 2, "ollama": 1, "kimi": 1}
    assert resp.headers["X-Proxy-Attempts"] == "4"


async def test_every_tier_gets_its_first_attempt_despite_total_cap(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    for u in upstreams.values():
        u.always(Behaviour(status=503))
    client = await make_proxy(retries={"max_fallback_retries": 3, "max_total_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 502
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 1}


async def test_all_timing_out_is_504(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    for u in upstreams.values():
        u.always(Behaviour(headers_delay=0.5))
    short = {"timeout_seconds": 0.1}
    client = await make_proxy(tiers=tier_config(upstreams, llama=short, ollama=short, kimi=short))
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_request_deadline_caps_the_chain(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    for u in upstreams.values():
        u.always(Behaviour(headers_delay=0.5))
    client = await make_proxy(retries={"request_deadline_seconds": 0.3})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await client.post("/v1/chat/completions", json=body())
    assert loop.time() - t0 < 0.6
    assert resp.status == 504
    assert hits(upstreams)["kimi"] == 0


async def test_minor_replan_never_touches_paid_tier(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(status=500))
    upstreams["ollama"].always(Behaviour(status=500))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    # The first walk fails on both free tiers, which opens their breakers: the second call is
    # answered at once (503), and neither touches the paid tier.
    for headers, status in (({"X-Replan": "minor"}, 502), ({"X-Complexity": "simple"}, 503)):
        resp = await client.post("/v1/chat/completions", json=body(), headers=headers)
        assert resp.status == status
        assert resp.headers["X-Proxy-Route"] == "minor_replan"
    assert hits(upstreams) == {"llama": 1, "ollama": 1, "kimi": 0}


async def test_complex_starts_with_kimi(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Complexity": "complex"})
    assert resp.headers["X-Proxy-Tier"] == "kimi"
    assert resp.headers["X-Proxy-Route"] == "complex"
    assert hits(upstreams) == {"llama": 0, "ollama": 0, "kimi": 1}


async def test_pinning_by_header_and_model(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Tier": "ollama"})
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("ollama", "pinned")
    resp = await client.post("/v1/chat/completions", json={**body(), "model": "kimi"})
    assert resp.headers["X-Proxy-Tier"] == "kimi"
    assert upstreams["kimi"].stats.requests[-1].json["model"] == "kimi-k2.5"


async def test_pinned_tier_falls_back_unless_fallback_off(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["ollama"].always(Behaviour(status=500))
    client = await make_proxy(retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Tier": "ollama"})
    assert resp.headers["X-Proxy-Tier"] == "llama"
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Tier": "ollama", "X-Fallback": "off"})
    assert resp.status == 502
    assert hits(upstreams) == {"llama": 1, "ollama": 2, "kimi": 0}


async def test_escalation_after_consecutive_failures_and_recovery(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["llama"].always(Behaviour(status=500))
    client = await make_proxy(
        retries={"max_fallback_retries": 1},
        routing={"escalate_after_failures": 2, "breaker_cooldown_seconds": 0.3},
    )
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=body())
        assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("ollama", "default")
    resp = await client.post("/v1/chat/completions", json=body())
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("kimi", "escalated")
    assert hits(upstreams) == {"llama": 2, "ollama": 2, "kimi": 1}
    # a minor re-plan while escalated goes to the next free tier, never to Kimi
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Replan": "minor"})
    assert resp.headers["X-Proxy-Tier"] == "ollama"
    assert hits(upstreams)["llama"] == 2
    # after the cooldown one call probes llama; its success closes the breaker
    upstreams["llama"].always(Behaviour())
    await asyncio.sleep(0.35)
    resp = await client.post("/v1/chat/completions", json=body())
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("llama", "default")
    resp = await client.post("/v1/chat/completions", json=body())
    assert (resp.headers["X-Proxy-Tier"], resp.headers["X-Proxy-Route"]) == ("llama", "default")


async def test_unknown_model_is_404_listing_names(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json={**body(), "model": "gpt-9"})
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["code"] == "model_not_found"
    for name in ("auto", "llama", "ollama", "kimi", "kimi-k2"):
        assert name in err["message"]
    assert sum(hits(upstreams).values()) == 0


async def test_bad_header_values_are_400(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy()
    for header, value, allowed in (
        ("X-Replan", "huge", "minor, major"),
        ("X-Complexity", "extreme", "simple, normal, complex"),
        ("X-Fallback", "maybe", "on, off"),
        ("X-Tier", "http://evil.example/v1", "kimi"),
    ):
        resp = await client.post("/v1/chat/completions", json=body(), headers={header: value})
        assert resp.status == 400, header
        err = (await resp.json())["error"]
        assert header in err["message"] and allowed in err["message"]
    assert sum(hits(upstreams).values()) == 0


async def test_minor_replan_pinned_to_paid_is_400(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    resp = await client.post("/v1/chat/completions", json=body(), headers={"X-Tier": "kimi", "X-Replan": "minor"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "paid_tier_not_allowed"


async def test_request_body_forwarded_untouched_except_model(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    sent = {
        "model": "auto",
        **MSG,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "temperature": 0.25,
        "max_tokens": 7,
        "max_completion_tokens": 7,
        "seed": 42,
        "stop": ["\n\n"],
        "n": 1,
        "logprobs": False,
        "vendor_extra": {"nested": [1, 2.5, None]},
    }
    client = await make_proxy()
    await client.post(
        "/v1/chat/completions", json=sent, headers={"X-Replan": "major", "X-Custom": "kept", "Cookie": "c=1"}
    )
    got = upstreams["llama"].stats.requests[-1]
    assert got.json == {**sent, "model": "llama3.1:8b"}
    assert got.headers["x-custom"] == "kept"
    for dropped in ("x-replan", "cookie", "authorization"):
        assert dropped not in got.headers


async def test_response_bytes_relayed_as_is(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], aiohttp_server: Any
) -> None:
    odd = (
        b'{ "id":"x-1", "object":"chat.completion", "created":1, "model":"upstream-wrote-this",'
        b'  "choices":[{"index":0,"message":{"role":"assistant","content":"hi","reasoning_content":"hm"},'
        b'"finish_reason":"stop"}], "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},'
        b' "unknown_field": [1.50, 2e3] }'
    )

    async def canned(request: web.Request) -> web.Response:
        return web.Response(body=odd, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", canned)
    server = await aiohttp_server(app)
    tiers = tier_config(upstreams, llama={"base_url": str(server.make_url("/v1"))})
    client = await make_proxy(tiers=tiers)
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 200
    assert await resp.read() == odd
    assert resp.headers["X-Proxy-Model"] == "upstream-wrote-this"


async def test_models_health_ready_and_unknown_paths(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    resp = await client.get("/v1/models")
    ids = [m["id"] for m in (await resp.json())["data"]]
    assert {"auto", "llama", "ollama", "kimi", "llama3.1-8b", "kimi-k2"} <= set(ids)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["tiers"]["kimi"]["usable"] is True
    for method, path in (("POST", "/v1/images/generations"), ("GET", "/v1/files"), ("GET", "/nowhere")):
        resp = await client.request(method, path)
        assert resp.status == 404
        assert "error" in await resp.json()
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings"):
        resp = await client.get(path)
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_missing_kimi_key_skips_the_tier(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    upstreams["llama"].always(Behaviour(status=500))
    upstreams["ollama"].always(Behaviour(status=500))
    client = await make_proxy(env={"TEST_KIMI_KEY": ""}, retries={"max_fallback_retries": 1})
    resp = await client.post("/v1/chat/completions", json=body())
    assert resp.status == 502
    assert upstreams["kimi"].hits == 0
    ready = await (await client.get("/readyz")).json()
    assert "TEST_KIMI_KEY" in ready["tiers"]["kimi"]["reason"]
