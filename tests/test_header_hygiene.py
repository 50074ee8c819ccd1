"""What reaches a tier of the client's headers, seen at the fake upstream with the real openai SDK as the
client: OpenAI-Organization, OpenAI-Project and x-stainless-* only to a tier that opts in
(`forward_headers`); a browser's Origin, Referer and Sec-* never; everything else as before."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.config import ConfigError, build_config
from tests.conftest import ProxyFactory, Upstream, tier_config

MSG: list[Any] = [{"role": "user", "content": "plan"}]
HELD = ("openai-organization", "openai-project")


def sdk(client: TestClient[Any, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")),
        api_key="unused",
        organization="org-hygiene",
        project="proj_hygiene",
        max_retries=0,
        default_headers={"X-App-Trace": "trace-1"},
    )


def arrived(up: Upstream) -> dict[str, str]:
    assert up.stats.requests, f"{up.name} got no request"
    return up.stats.requests[-1].headers


async def test_openai_and_stainless_headers_reach_no_tier_by_default(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy()
    async with sdk(client) as oai:
        raw = await oai.chat.completions.with_raw_response.create(model="auto", messages=MSG)
        sent = raw.http_request.headers
        # the SDK did send them: otherwise this test would prove nothing
        assert sent["openai-organization"] == "org-hygiene" and sent["openai-project"] == "proj_hygiene"
        assert sum(k.lower().startswith("x-stainless-") for k in sent) >= 5, dict(sent)
        stream = await oai.chat.completions.create(model="kimi", messages=MSG, stream=True)
        assert [c async for c in stream]
    for name in ("llama", "kimi"):
        got = arrived(upstreams[name])
        assert not set(HELD) & set(got), got
        assert not [k for k in got if k.startswith("x-stainless-")], got
        # what is not held back still crosses: the app's own headers, the SDK's user agent
        assert got["x-app-trace"] == "trace-1"
        assert got["user-agent"].startswith("AsyncOpenAI/Python")
    assert "authorization" not in arrived(upstreams["llama"])  # the client's key never crosses
    assert arrived(upstreams["kimi"])["authorization"].startswith("Bearer ")  # the tier's own does


async def test_a_tier_gets_the_held_back_headers_it_names(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    tiers = tier_config(
        upstreams,
        llama={"forward_headers": ["OpenAI-Project"]},
        ollama={"forward_headers": ["x-stainless-*", "openai-organization"]},
    )
    client = await make_proxy(tiers=tiers)
    async with sdk(client) as oai:
        for model in ("llama", "ollama", "kimi"):
            await oai.chat.completions.create(model=model, messages=MSG)
        sent = (await oai.chat.completions.with_raw_response.create(model="kimi", messages=MSG)).http_request.headers
    llama, ollama, kimi = (arrived(upstreams[n]) for n in ("llama", "ollama", "kimi"))
    assert llama["openai-project"] == "proj_hygiene"
    assert "openai-organization" not in llama and not [k for k in llama if k.startswith("x-stainless-")]
    assert ollama["openai-organization"] == "org-hygiene" and "openai-project" not in ollama
    stainless = {k.lower(): v for k, v in sent.items() if k.lower().startswith("x-stainless-")}
    stainless.pop("x-stainless-raw-response")  # with_raw_response's own, not on the calls ollama got
    assert {k: v for k, v in ollama.items() if k.startswith("x-stainless-")}.keys() == stainless.keys()
    assert ollama["x-stainless-lang"] == stainless["x-stainless-lang"] == "python"
    assert not set(HELD) & set(kimi) and not [k for k in kimi if k.startswith("x-stainless-")]


async def test_a_browsers_origin_referer_and_fetch_metadata_never_cross(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy(server={"cors": ["http://app.example"]})
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": MSG},
        headers={
            "Origin": "http://app.example",
            "Referer": "http://app.example/private/page?user=42",
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "cors",
            "Sec-CH-UA-Platform": '"Linux"',
            "Accept-Language": "en-GB",
        },
    )
    assert resp.status == 200, await resp.text()
    got = arrived(upstreams["llama"])
    assert not {"origin", "referer"} & set(got), got
    assert not [k for k in got if k.startswith("sec-")], got
    assert got["accept-language"] == "en-GB"


@pytest.mark.parametrize(
    "name", ["Authorization", "X-Tier", "Cookie", "X-Custom", "Origin", "*", "openai-*", "User-Agent"]
)
def test_forward_headers_names_only_held_back_headers(name: str) -> None:
    raw = {"tiers": {"llama": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "forward_headers": [name]}}}
    with pytest.raises(ConfigError) as e:
        build_config(raw, "proxy.yaml", {})
    message = str(e.value)
    assert message.startswith("proxy.yaml: tiers.llama.forward_headers: "), message
    assert "OpenAI-Organization, OpenAI-Project, x-stainless-*" in message


@pytest.mark.parametrize(
    ("names", "stored"),
    [
        (["OpenAI-Project"], ("openai-project",)),
        (["X-Stainless-*", "openai-organization"], ("x-stainless-*", "openai-organization")),
        (["x-stainless-lang"], ("x-stainless-lang",)),
    ],
)
def test_forward_headers_are_stored_lower_case(names: list[str], stored: tuple[str, ...]) -> None:
    raw = {"tiers": {"llama": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "forward_headers": names}}}
    tier = build_config(raw, "proxy.yaml", {}).tier("llama")
    assert tier.forward_headers == stored
    assert tier.forwards("x-stainless-lang") == any(s in ("x-stainless-*", "x-stainless-lang") for s in stored)
    assert not tier.forwards("x-stainless-other") or "x-stainless-*" in stored
