"""Routing is pure: headers + config + breaker state -> the chain and its reason."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Config, build_config
from proxy.errors import BadRequest, NotFound, RateLimited, Unavailable
from proxy.gateway.routing import RouteHints, make_plan, parse_hints
from tests.conftest import ProxyFactory, Upstream

ENV = {"MOONSHOT_API_KEY": "k"}


def config(**routing: Any) -> Config:
    return build_config({"routing": routing} if routing else {}, "<t>", ENV)


def chain(
    c: Config,
    hints: RouteHints | None = None,
    blocked: frozenset[str] = frozenset(),
    paid_blocked_for: float | None = None,
) -> tuple[tuple[str, ...], str]:
    plan = make_plan(c, hints or RouteHints(), blocked, paid_blocked_for)
    return plan.tier_ids, plan.route.value


def test_default_chain_llama_primary() -> None:
    assert chain(config()) == (("llama", "ollama", "kimi"), "default")


def test_kimi_primary() -> None:
    assert chain(config(primary="kimi")) == (("kimi", "llama", "ollama"), "default")


def test_minor_replan_and_simple_leave_paid_out() -> None:
    c = config()
    assert chain(c, RouteHints(replan="minor")) == (("llama", "ollama"), "minor_replan")
    assert chain(c, RouteHints(complexity="simple")) == (("llama", "ollama"), "minor_replan")
    assert chain(config(primary="kimi"), RouteHints(replan="minor")) == (("llama", "ollama"), "minor_replan")


def test_minor_replan_switch_off_keeps_paid() -> None:
    assert chain(config(use_llama_for_minor_replans=False), RouteHints(replan="minor")) == (
        ("llama", "ollama", "kimi"),
        "default",
    )


def test_complex_puts_paid_first() -> None:
    assert chain(config(), RouteHints(complexity="complex")) == (("kimi", "llama", "ollama"), "complex")
    assert chain(config(), RouteHints(complexity="normal")) == (("llama", "ollama", "kimi"), "default")


def test_pins() -> None:
    c = config()
    assert chain(c, RouteHints(tier="ollama")) == (("ollama", "llama", "kimi"), "pinned")
    assert chain(c, RouteHints(model="kimi-k2")) == (("kimi", "llama", "ollama"), "pinned")
    assert chain(c, RouteHints(tier="ollama", fallback=False)) == (("ollama",), "pinned")
    assert chain(c, RouteHints(model="auto")) == (("llama", "ollama", "kimi"), "default")


def test_escalation_when_primary_breaker_open() -> None:
    c = config()
    assert chain(c, blocked=frozenset({"llama"})) == (("kimi", "ollama"), "escalated")
    assert chain(c, RouteHints(replan="minor"), blocked=frozenset({"llama"})) == (("ollama",), "minor_replan")


def test_all_open_keeps_the_full_chain_for_the_probes() -> None:
    plan = make_plan(config(), RouteHints(replan="minor"), frozenset({"llama", "ollama"}))
    assert plan.all_open and plan.tier_ids == ("llama", "ollama")
    assert not make_plan(config(), RouteHints(), frozenset({"llama"})).all_open


def test_budget_exhausted_drops_paid_tiers() -> None:
    c = config()
    assert chain(c, RouteHints(complexity="complex"), paid_blocked_for=60.0) == (("llama", "ollama"), "budget")
    with pytest.raises(RateLimited) as info:
        make_plan(c, RouteHints(tier="kimi"), frozenset(), paid_blocked_for=3599.5)
    assert info.value.headers["Retry-After"] == "3600"


def test_errors() -> None:
    c = config()
    with pytest.raises(NotFound, match=r"gpt-4o.*auto, kimi, kimi-k2, llama"):
        make_plan(c, RouteHints(model="gpt-4o"), frozenset())
    with pytest.raises(BadRequest, match="X-Tier"):
        make_plan(c, RouteHints(tier="https://attacker.example/v1"), frozenset())
    with pytest.raises(BadRequest, match="paid"):
        make_plan(c, RouteHints(tier="kimi", replan="minor"), frozenset())
    no_key = build_config({}, "<t>", {})
    with pytest.raises(Unavailable, match="MOONSHOT_API_KEY"):
        make_plan(no_key, RouteHints(model="kimi"), frozenset())


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"X-Replan": "full"}, "X-Replan"),
        ({"X-Complexity": "hard"}, "X-Complexity"),
        ({"X-Fallback": "no"}, "X-Fallback"),
    ],
)
def test_bad_headers(headers: dict[str, str], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_hints(headers, None)
    assert info.value.param == param


def test_header_values_are_case_insensitive() -> None:
    hints = parse_hints({"X-Replan": " Minor ", "X-Complexity": "COMPLEX", "X-Fallback": "OFF"}, "auto")
    assert (hints.replan, hints.complexity, hints.fallback) == ("minor", "complex", False)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("X-Replan", ["major", "minor"]),
        ("X-Replan", ["minor, major"]),
        ("X-Complexity", ["simple", "complex"]),
        ("X-Complexity", ["complex,simple"]),
        ("X-Tier", ["ollama", "kimi"]),
        ("X-Tier", ["ollama,kimi"]),
        ("X-Fallback", ["off", "on"]),
        ("X-Fallback", ["off, on"]),
    ],
)
def test_a_routing_header_with_two_meanings_is_refused(name: str, values: list[str]) -> None:
    headers = CIMultiDictProxy(CIMultiDict([(name.lower(), v) for v in values]))
    with pytest.raises(BadRequest) as info:
        parse_hints(headers, None)
    assert info.value.param == name and name in str(info.value)


def test_a_routing_header_repeated_with_the_same_value_is_fine() -> None:
    pairs = [("X-Replan", "minor"), ("x-replan", " Minor"), ("X-Tier", "ollama"), ("X-Tier", "ollama")]
    pairs += [("X-Fallback", "off"), ("X-Fallback", "OFF"), ("X-Complexity", "simple"), ("X-Complexity", "simple")]
    hints = parse_hints(CIMultiDictProxy(CIMultiDict(pairs)), None)
    assert (hints.replan, hints.tier, hints.fallback, hints.complexity) == ("minor", "ollama", False, "simple")


async def test_conflicting_replan_headers_are_a_400_and_reach_no_tier(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy()
    body = {"model": "auto", "messages": [{"role": "user", "content": "re-plan"}]}
    for headers in (
        CIMultiDict([("X-Replan", "major"), ("X-Replan", "minor")]),
        CIMultiDict([("X-Replan", "minor"), ("X-Replan", "major")]),
        CIMultiDict([("X-Replan", "minor, major")]),
        CIMultiDict([("X-Complexity", "simple"), ("X-Complexity", "complex")]),
        CIMultiDict([("X-Tier", "llama"), ("X-Tier", "kimi")]),
    ):
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 400, headers
        err = (await resp.json())["error"]
        name = next(iter(headers))
        assert err["param"] == name and name in err["message"] and err["type"] == "invalid_request_error"
    assert {n: u.hits for n, u in upstreams.items()} == {"llama": 0, "ollama": 0, "kimi": 0}
    resp = await client.post(
        "/v1/chat/completions", json=body, headers=CIMultiDict([("X-Replan", "minor"), ("X-Replan", "minor")])
    )
    assert resp.status == 200 and resp.headers["X-Proxy-Route"] == "minor_replan"
