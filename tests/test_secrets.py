"""Secrets never leave: an upstream that quotes the key it received (in its body, its headers,
its stream events, in every status class) gets none of it to the client, the logs, the ledger
or /metrics. The upstreams here are the simulated tier with `echo_auth` on: each really receives
its key (checked) and really sends it back; the proxy must clean it out on the way."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.gateway.redact import REDACTED, Redactor
from proxy.gateway.sse import StreamWatch
from proxy.gateway.state import STATE
from proxy.ops.logs import JsonFormatter
from proxy.sim import SIM_STATS, Behaviour, SimSettings, create_sim_app
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.elsewhere import elsewhere
from tests.support.proc import start_proxy
from tests.support.secret_scan import KIMI_KEY

LLAMA_KEY = "llama-key-Zx81-echo-test"
OLLAMA_KEY = "ollama"  # short, like Ollama's usual placeholder: removed only as "Bearer ollama"
CLIENT_SECRET = "client-secret-QWERTY-777"
ENV = {"TEST_LLAMA_KEY": LLAMA_KEY, "TEST_OLLAMA_KEY": OLLAMA_KEY, "TEST_CLIENT_SECRET": CLIENT_SECRET}
AUTH = {"keys": [{"name": "planner", "secret_env": "TEST_CLIENT_SECRET"}]}
AS_CLIENT = {"Authorization": f"Bearer {CLIENT_SECRET}"}
MSG = {"messages": [{"role": "user", "content": "hi"}]}
_SHORT_ECHO = re.compile(rb"(?i:bearer)\s+ollama\b")
_MARK = REDACTED.encode()


def leaks(data: bytes) -> list[str]:
    found = [s[:8] for s in (LLAMA_KEY, KIMI_KEY, CLIENT_SECRET) if s.encode() in data]
    return found + (["Bearer ollama"] if _SHORT_ECHO.search(data) else [])


def keyed_tiers(ups: dict[str, Upstream]) -> dict[str, Any]:
    return tier_config(ups, llama={"api_key_env": "TEST_LLAMA_KEY"}, ollama={"api_key_env": "TEST_OLLAMA_KEY"})


def head_of(resp: aiohttp.ClientResponse) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in resp.headers.items()).encode()


async def ledger_bytes(client: TestClient[web.Request, web.Application]) -> bytes:
    ledger = client.app[STATE].ledger
    assert ledger is not None
    await ledger.flush()
    db = Path(ledger.store.location)
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def logged(caplog: pytest.LogCaptureFixture) -> bytes:
    """Every captured record as `proxy serve --log-format json` would write it, extras included."""
    fmt = JsonFormatter()
    return "\n".join(fmt.format(r) for r in caplog.records).encode()


def test_redactor_removes_each_form_and_copies_only_on_a_hit() -> None:
    r = Redactor([KIMI_KEY, LLAMA_KEY, None, "", KIMI_KEY])
    assert r.count == 2 and KIMI_KEY not in repr(r) and LLAMA_KEY not in repr(r)
    clean = b'{"choices":[{"message":{"content":"nothing secret here"}}]}'
    assert r.clean(clean) is clean, "no copy when no secret is present"
    dirty = f"Bearer {KIMI_KEY} and {LLAMA_KEY}, again {KIMI_KEY}".encode()
    assert r.clean(dirty) == b"Bearer [redacted] and [redacted], again [redacted]"
    assert r.clean_text(f"HTTP 401: bad key {KIMI_KEY}") == "HTTP 401: bad key [redacted]"
    assert r.clean_optional(None) is None


def test_redactor_finds_the_json_escaped_forms_and_a_secret_inside_another() -> None:
    key = 'sk/with"quote\\and/slashes'
    r = Redactor([key, key + "-longer"])
    for echoed in (key, 'sk/with\\"quote\\\\and/slashes', 'sk\\/with\\"quote\\\\and\\/slashes'):
        assert r.clean(f'{{"error":"{echoed}"}}'.encode()) == b'{"error":"[redacted]"}', echoed
    assert r.clean((key + "-longer").encode()) == b"[redacted]", "the longer secret is removed whole"


def test_short_secrets_only_in_their_bearer_form() -> None:
    r = Redactor([OLLAMA_KEY])
    text = b"ollama serves qwen; Authorization: Bearer ollama; bearer  ollama, Bearer ollama-2 BEARER ollama."
    assert r.clean(text) == (
        b"ollama serves qwen; Authorization: Bearer [redacted]; Bearer [redacted], Bearer ollama-2 Bearer [redacted]."
    )
    other = b"Bearer OLLAMA is another key: keys are case-sensitive"
    assert r.clean(other) is other
    plain = b"ollama is a word in answers"
    assert r.clean(plain) is plain


def test_the_config_keeps_every_secret_but_never_shows_one() -> None:
    raw = {
        "tiers": {
            "llama": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "TEST_LLAMA_KEY"},
            "kimi": {"base_url": "http://127.0.0.1:2/v1", "model": "k", "api_key_env": "TEST_KIMI_KEY"},
        },
        "auth": AUTH,
    }
    config = build_config(raw, "<test>", {**ENV, "TEST_KIMI_KEY": KIMI_KEY})
    shown = repr(config)
    assert not leaks(shown.encode()), "repr(Config) shows a secret"
    cleaned = config.redactor.clean(f"{LLAMA_KEY} {KIMI_KEY} {CLIENT_SECRET}".encode())
    assert cleaned == b"[redacted] [redacted] [redacted]"
    # A reload builds a new Config, so a rotated key is redacted from then on.
    rotated = build_config(raw, "<test>", {**ENV, "TEST_KIMI_KEY": "sk-rotated-key-0000"})
    assert rotated.redactor.clean(b"sk-rotated-key-0000") == b"[redacted]"


def test_a_secret_split_across_tcp_chunks_is_whole_in_what_the_watch_releases() -> None:
    r = Redactor([KIMI_KEY])
    event = b'data: {"choices":[{"delta":{"content":"key Bearer ' + KIMI_KEY.encode() + b'"}}]}\n\n'
    stream = event * 3 + b"data: [DONE]\n\n"
    watch = StreamWatch(strip_usage=False)
    out = b"".join(r.clean(watch.feed(stream[i : i + 1])) for i in range(len(stream))) + r.clean(watch.finish())
    assert KIMI_KEY.encode() not in out and out.count(_MARK) == 3 and out.endswith(b"data: [DONE]\n\n")


STATUSES = (200, 301, 302, 303, 307, 308, 400, 401, 403, 429, 500)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("status", STATUSES)
async def test_an_upstream_echoing_its_key_gets_it_nowhere(
    status: int,
    stream: bool,
    make_proxy: ProxyFactory,
    upstreams: dict[str, Upstream],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other_url, other_hits = await elsewhere(aiohttp_server)
    for up in upstreams.values():
        # trickle=0: one write per byte, so keys arrive split across reads
        up.always(Behaviour(status=status, echo_auth=True, location=other_url, trickle=0.0))
    client = await make_proxy(keyed_tiers(upstreams), ENV, auth=AUTH)
    resp = await client.post("/v1/chat/completions", json={"model": "auto", "stream": stream, **MSG}, headers=AS_CLIENT)
    answer = await resp.read() + head_of(resp)
    metrics = await (await client.get("/metrics", headers=AS_CLIENT)).read()
    ledger = await ledger_bytes(client)

    assert upstreams["llama"].stats.requests[-1].headers["authorization"] == f"Bearer {LLAMA_KEY}"
    for where, data in {"answer": answer, "log": logged(caplog), "ledger": ledger, "metrics": metrics}.items():
        assert not leaks(data), f"{leaks(data)} leaked into the {where}"
    assert other_hits == [], "a redirect was followed"
    if status == 200:
        assert resp.status == 200 and resp.headers["X-Proxy-Tier"] == "llama"
        assert answer.count(_MARK) >= 2, "the echo (content, model) came back cleaned"
    elif status < 400:
        assert resp.status == 502 and b"redirect to 127.0.0.2: not followed" in answer
        assert sum(u.hits for u in upstreams.values()) == 3, "each tier tried once, then the next"
    elif status == 400:
        assert resp.status == 400 and resp.headers["X-Proxy-Tier"] == "kimi"
        assert b"Incorrect API key provided: Bearer [redacted]" in answer, "the refusal passed on, cleaned"
    else:
        assert resp.status == (429 if status == 429 else 502)
        assert b"Incorrect API key provided: Bearer [redacted]" in answer, "the 502 lists the cleaned errors"
        assert b"Incorrect API key provided: Bearer [redacted]" in ledger


async def test_a_hundred_hostile_calls_at_once_leak_nothing(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    mix = (200, 401, 500, 400, 429)
    for up in upstreams.values():
        up.script(*(Behaviour(status=mix[i % len(mix)], echo_auth=True) for i in range(100)))
        up.always(Behaviour(echo_auth=True))
    # Breakers that never open: every answer then comes from (or lists) the echoing tiers.
    client = await make_proxy(keyed_tiers(upstreams), ENV, auth=AUTH, routing={"escalate_after_failures": 1000})

    async def call(i: int) -> tuple[int, bytes]:
        body = {"model": "kimi" if i % 3 == 0 else "auto", "stream": i % 2 == 0, **MSG}
        resp = await client.post("/v1/chat/completions", json=body, headers=AS_CLIENT)
        return resp.status, await resp.read() + head_of(resp)

    answers = await asyncio.gather(*(call(i) for i in range(100)))
    assert {status for status, _ in answers} >= {200}, "some calls succeeded"
    for status, data in answers:
        assert not leaks(data), (status, leaks(data))
        assert _MARK in data, "every answer carried an echo, cleaned"
    assert not leaks(await ledger_bytes(client))


async def test_an_upstream_quoting_a_client_secret_is_cleaned_too(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    quote = f'{{"error":{{"message":"key {CLIENT_SECRET} is not ours"}}}}'.encode()
    for up in upstreams.values():
        up.script(Behaviour(status=400, error_body=quote))  # the first call: refused by every tier
        up.always(Behaviour(status=500, error_body=quote))
    client = await make_proxy(tier_config(upstreams), ENV, auth=AUTH)
    refused = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=AS_CLIENT)
    assert refused.status == 400
    failed = await client.post("/v1/chat/completions", json={"model": "auto", **MSG}, headers=AS_CLIENT)
    assert failed.status == 502
    for data in (await refused.read(), await failed.read(), await ledger_bytes(client)):
        assert CLIENT_SECRET.encode() not in data and b"key [redacted] is not ours" in data


async def test_proxy_serve_logs_and_ledger_hold_no_echoed_key(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    sims = {}
    for name, behaviour in (
        ("llama", Behaviour(status=401, echo_auth=True)),
        ("kimi", Behaviour(echo_auth=True, trickle=0.0)),
    ):
        app = create_sim_app(SimSettings(name=name, default=behaviour))
        sims[name] = (app, await aiohttp_server(app))
    tiers = {
        "llama": {"base_url": str(sims["llama"][1].make_url("/v1")), "model": "m", "api_key_env": "TEST_LLAMA_KEY"},
        "kimi": {
            "base_url": str(sims["kimi"][1].make_url("/v1")),
            "model": "kimi-k2.5",
            "paid": True,
            "api_key_env": "TEST_KIMI_KEY",
        },
    }
    config = {"tiers": tiers, "auth": AUTH, "ledger": {"path": str(tmp_path / "ledger.db")}}
    run = await start_proxy(tmp_path, config, {**ENV, "TEST_KIMI_KEY": KIMI_KEY})
    seen = b""
    try:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True, False):
                body = {"model": "auto", "stream": stream, **MSG}
                async with s.post(run.chat_url, json=body, headers=AS_CLIENT) as r:
                    assert r.status == 200 and r.headers["X-Proxy-Tier"] == "kimi"
                    seen += await r.read() + head_of(r)
            async with s.get(f"{run.url}/metrics", headers=AS_CLIENT) as r:
                seen += await r.read()
    finally:
        assert await run.stop() == 0
    assert sims["kimi"][0][SIM_STATS].requests[-1].headers["authorization"] == f"Bearer {KIMI_KEY}"
    log = run.log.read_bytes()
    ledger = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    for where, data in {"answers": seen, "log": log, "ledger": ledger}.items():
        assert not leaks(data), f"{leaks(data)} leaked into {where}"
    assert b"Bearer [redacted]" in log, "the 401's quoted key was logged, cleaned"
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        errors = [e for (e,) in conn.execute("SELECT error FROM attempts WHERE tier = 'llama'")]
    assert len(errors) == 3 and all("Bearer [redacted]" in e for e in errors), errors
