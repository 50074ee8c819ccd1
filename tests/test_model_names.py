"""Any model name (issue 13): the tiers' upstream model ids, `routing.models` and
`routing.unknown_model`; what the config refuses, what `proxy check` shows, what reaches the
upstream and what the ledger keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import Config, ConfigError, build_config
from proxy.errors import BadRequest, NotFound, Unavailable
from proxy.gateway.routing import RouteHints, make_plan
from proxy.gateway.state import STATE
from proxy.ops.check import describe
from tests.conftest import ProxyFactory, Upstream, tier_config
from tests.support.faults import ledger_rows

ENV = {"MOONSHOT_API_KEY": "k"}
MSG = [{"role": "user", "content": "plan the next step"}]


def config(env: dict[str, str] | None = None, tiers: dict[str, Any] | None = None, **routing: Any) -> Config:
    raw: dict[str, Any] = {"routing": routing}
    if tiers is not None:
        raw["tiers"] = tiers
    return build_config(raw, "<t>", ENV if env is None else env)


def route(c: Config, model: str | None = None, tier: str | None = None) -> tuple[tuple[str, ...], str]:
    plan = make_plan(c, RouteHints(model=model, tier=tier), frozenset())
    return plan.tier_ids, plan.route.value


DEFAULT = (("llama", "ollama", "kimi"), "default")
KIMI = (("kimi", "llama", "ollama"), "pinned")
OLLAMA = (("ollama", "llama", "kimi"), "pinned")


def test_upstream_model_ids_name_their_tiers() -> None:
    c = config()
    assert route(c, "kimi-k2.5") == KIMI
    assert route(c, "qwen2.5:7b") == OLLAMA
    assert route(c, tier="kimi-k2.5") == KIMI, "as an X-Tier value too"
    assert c.model_names()["llama3.1:8b"] == "llama"


def test_unknown_names_are_refused_by_default_naming_the_way_out() -> None:
    with pytest.raises(NotFound) as info:
        route(config(), "gpt-4o-mini")
    err = info.value
    assert (err.code, err.param) == ("model_not_found", "model")
    assert "'gpt-4o-mini'" in err.message and "kimi-k2" in err.message and "routing.models" in err.message
    with pytest.raises(BadRequest):
        route(config(), tier="gpt-4o-mini")  # X-Tier names tiers, never the table


def test_the_table_maps_names_to_auto_or_a_tier() -> None:
    c = config(models={"gpt-4o-mini": "auto", "gpt-4o": "kimi", "gpt-4": "kimi-k2", "o1": "qwen2.5:7b"})
    assert route(c, "gpt-4o-mini") == DEFAULT
    assert route(c, "gpt-4o") == KIMI  # a tier id
    assert route(c, "gpt-4") == KIMI  # an alias
    assert route(c, "o1") == OLLAMA  # an upstream model id
    with pytest.raises(NotFound):
        route(c, "gpt-3.5-turbo")  # not in the table: refused as before


def test_unknown_model_auto_routes_every_other_name_as_auto() -> None:
    c = config(unknown_model="auto", models={"gpt-4o": "kimi"})
    assert route(c, "gpt-3.5-turbo") == DEFAULT
    assert route(c, "text-davinci-003") == DEFAULT
    assert route(c, "gpt-4o") == KIMI, "the table still applies"
    assert route(c, "ollama-7b") == OLLAMA, "and the tiers' own names"


def test_the_table_wins_over_an_upstream_id_and_a_shared_id_names_the_first_tier() -> None:
    assert route(config(models={"kimi-k2.5": "auto"}), "kimi-k2.5") == DEFAULT
    tiers = {
        "a": {"base_url": "http://127.0.0.1:1/v1", "model": "llama3.1:8b"},
        "b": {"base_url": "http://127.0.0.1:2/v1", "model": "llama3.1:8b"},
    }
    c = config(tiers=tiers, primary="a")
    assert route(c, "llama3.1:8b") == (("a", "b"), "pinned")
    assert "llama3.1:8b is also tier b's upstream id: it names a" in describe(c)


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ({"kimi": "auto"}, "routing.models.kimi: 'kimi' is already a name of tier 'kimi'"),
        ({"kimi-k2": "llama"}, "routing.models.kimi-k2: 'kimi-k2' is already a name of tier 'kimi'"),
        ({"auto": "kimi"}, "routing.models.auto: 'auto' already means"),
        ({"gpt-4o": "gpt-5"}, "routing.models.gpt-4o: 'gpt-5' is not a tier; map it to one of: auto, kimi,"),
        ({" ": "auto"}, "a model name cannot be empty"),
    ],
)
def test_table_entries_that_cannot_work_are_config_errors(models: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(models=models)
    assert error in str(info.value)


def test_unknown_model_takes_only_refuse_or_auto() -> None:
    with pytest.raises(ConfigError) as info:
        config(unknown_model="map")
    assert "routing.unknown_model" in str(info.value)


def test_names_of_an_unusable_tier_say_so() -> None:
    c = config(env={}, models={"gpt-4o": "kimi"})  # no MOONSHOT_API_KEY: kimi is skipped
    assert any("'gpt-4o' maps to tier 'kimi', which is not usable" in w for w in c.warnings)
    for model in ("gpt-4o", "kimi-k2.5", "kimi"):
        with pytest.raises(Unavailable) as info:
            route(c, model)
        assert info.value.code == "tier_unavailable" and "MOONSHOT_API_KEY" in info.value.message


def test_proxy_check_shows_the_map() -> None:
    text = describe(config(models={"gpt-4o-mini": "auto", "gpt-4o": "kimi"}, unknown_model="auto"))
    section = text.split("model names (the request's `model`):\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == [
        "  auto: the proxy chooses the chain",
        "  llama, llama3.1-8b, llama-3.1-8b, llama3.1:8b (upstream id): tier llama first",
        "  ollama, ollama-7b, qwen2.5:7b (upstream id): tier ollama first",
        "  kimi, kimi-k2, kimi-k2.5 (upstream id): tier kimi first",
        "  gpt-4o-mini: auto (routing.models)",
        "  gpt-4o: tier kimi first (routing.models)",
        "  any other name: routed as auto (routing.unknown_model: auto)",
    ]
    assert "any other name: 404 model_not_found (routing.unknown_model: refuse)" in describe(config())


# ---------------------------------------------------------------------------- through the app


async def test_a_mapped_name_reaches_the_tier_as_its_model_and_the_ledger_keeps_the_name_sent(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    client = await make_proxy(routing={"models": {"gpt-4o-mini": "auto", "gpt-4o": "kimi"}})
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="k", max_retries=0)
    sent = {"gpt-4o-mini": ("llama", "llama3.1:8b", "default"), "gpt-4o": ("kimi", "kimi-k2.5", "pinned")}
    sent["kimi-k2.5"] = ("kimi", "kimi-k2.5", "pinned")
    for name, (tier, upstream_model, route_) in sent.items():
        rid = f"names-{name.replace('.', '-')}"
        raw = await oai.chat.completions.with_raw_response.create(
            model=name, messages=MSG, extra_headers={"X-Request-Id": rid}
        )
        assert raw.parse().choices
        assert (raw.headers["x-proxy-tier"], raw.headers["x-proxy-route"]) == (tier, route_)
        assert upstreams[tier].stats.requests[-1].json["model"] == upstream_model
        ledger = client.app[STATE].ledger
        assert ledger is not None
        await ledger.flush()
        row, _ = ledger_rows(tmp_path / "ledger.db", rid)
        assert (row["requested_model"], row["tier"]) == (name, tier)
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
    assert info.value.code == "model_not_found"
    await oai.close()


async def test_unknown_model_auto_through_the_app(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(tier_config(upstreams), routing={"unknown_model": "auto"})
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-3.5-turbo", "messages": MSG})
    assert resp.status == 200 and resp.headers["X-Proxy-Route"] == "default"
    assert upstreams["llama"].stats.requests[-1].json["model"] == "llama3.1:8b"
