"""proxy.yaml loading: defaults, the original strategic_planner block, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, build_config, load_config
from proxy.config.strategic_planner import normalise_url
from proxy.ops.check import describe

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proxy.yaml"
    p.write_text(text)
    return p


def test_shipped_proxy_yaml_is_the_built_in_default() -> None:
    env = {"MOONSHOT_API_KEY": "sk-x"}
    shipped = load_config(ROOT / "proxy.yaml", env)
    builtin = load_config(None, env)
    assert shipped.tiers == builtin.tiers
    assert (shipped.server, shipped.routing, shipped.retries, shipped.ledger, shipped.budgets) == (
        builtin.server,
        builtin.routing,
        builtin.retries,
        builtin.ledger,
        builtin.budgets,
    )


def test_default_tiers_and_missing_key_warning() -> None:
    config = load_config(None, {})
    assert [t.id for t in config.tiers] == ["llama", "ollama", "kimi"]
    kimi = config.tier("kimi")
    assert kimi.paid and not kimi.usable
    assert config.warnings == ("tier 'kimi' is skipped: its API key variable MOONSHOT_API_KEY is not set",)
    assert "sk-" not in repr(load_config(None, {"MOONSHOT_API_KEY": "sk-secret"}))


def test_strategic_planner_block_keeps_its_meaning(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
strategic_planner:
  primary_llm: kimi
  kimi_timeout_seconds: 5
  llama_timeout_seconds: 12
  ollama_timeout_seconds: 7
  max_fallback_retries: 3
  max_total_retries: 6
  use_llama_for_minor_replans: false
  escalate_after_failures: 4
  llama_model: llama3.1:8b-instruct-q4_K_M
  llama_url: http://gpu-box:11434
  recovery_threshold: 2
""",
    )
    c = load_config(p, {"MOONSHOT_API_KEY": "k"})
    assert c.routing.primary == "kimi"
    assert (c.tier("kimi").timeout, c.tier("llama").timeout, c.tier("ollama").timeout) == (5, 12, 7)
    assert (c.retries.max_fallback_retries, c.retries.max_total_retries) == (3, 6)
    assert c.routing.use_llama_for_minor_replans is False
    assert (c.routing.escalate_after_failures, c.routing.recovery_threshold) == (4, 2)
    assert c.tier("llama").model == "llama3.1:8b-instruct-q4_K_M"
    assert c.tier("llama").base_url == "http://gpu-box:11434/v1"


@pytest.mark.parametrize("where", ["top", "inside"])
def test_kimi_enabled_false_drops_the_paid_tier(tmp_path: Path, where: str) -> None:
    block = "kimi: {enabled: false}\n"
    text = block if where == "top" else "strategic_planner:\n  " + block
    c = load_config(write(tmp_path, text), {"MOONSHOT_API_KEY": "k"})
    assert not c.tier("kimi").usable and c.tier("kimi").skip_reason == "disabled in config"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("strategic_planner:\n  primary_lm: kimi\n", "strategic_planner: Object contains unknown field `primary_lm`"),
        ("routing: {escalate_after: 3}\n", "routing: Object contains unknown field `escalate_after`"),
        ("retries: {max_total_retries: many}\n", "retries.max_total_retries: Expected `int`, got `str`"),
        (
            "tiers:\n  a: {base_url: http://x/v1, model: m, timout_seconds: 3}\n",
            "tiers.a: Object contains unknown field",
        ),
        ("tiers:\n  a: {base_url: 'ftp://x', model: m}\nrouting: {primary: a}\n", "tiers.a.base_url"),
        ("routing: {primary: gpt}\n", "routing.primary: 'gpt' is not a tier"),
        ("nonsense: 1\n", "unknown field `nonsense`"),
        ("- a list\n", "top level must be a mapping"),
        ("tiers: {llama: {base_url: 'http://x', model: m, price: {input_per_mtok: -1}}}\n", "must be a number >= 0"),
        ("strategic_planner: {escalate_after_failures: 0}\n", "strategic_planner.escalate_after_failures"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, {})
    assert str(p) in str(info.value)
    assert message in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", {})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:11434", "http://h:11434/v1"),
        ("http://h:11434/", "http://h:11434/v1"),
        ("http://h:11434/v1", "http://h:11434/v1"),
        ("http://h:11434/api/generate", "http://h:11434/v1"),
        ("http://h:8000/llama/api/chat", "http://h:8000/llama/v1"),
    ],
)
def test_legacy_llama_url_normalised(given: str, expected: str) -> None:
    assert normalise_url(given) == expected


def test_check_describes_server_limits_clients_and_budgets() -> None:
    raw = {
        "server": {"max_body_bytes": 1048576, "idle_timeout_seconds": 12},
        "auth": {
            "keys": [
                {"name": "planner", "secret_env": "PLANNER_KEY", "requests_per_minute": 60, "daily_usd": 2.5},
                {"name": "ci", "secret_env": "CI_KEY"},
            ]
        },
        "budgets": {"daily_usd": 5, "monthly_usd": 50},
    }
    text = describe(build_config(raw, "t.yaml", {"PLANNER_KEY": "p-secret-123", "MOONSHOT_API_KEY": "k"}))
    assert "bodies up to 1 MiB" in text and "closed after 12s without a request" in text
    assert "clients: keys required; enabled: planner (60/min, $2.5/day)" in text
    assert "client key 'ci' is disabled: its variable CI_KEY is not set" in text
    assert "budgets: $5/day, $50/month" in text
    assert "p-secret-123" not in text
    open_config = describe(build_config({}, "t.yaml", {}))
    assert "clients: no keys (auth.keys)" in open_config and "budgets: none" in open_config


def test_a_tier_priced_only_per_call_is_warned_about_calls_that_report_usage() -> None:
    def warnings(price: dict[str, float]) -> list[str]:
        tier = {"base_url": "http://127.0.0.1:9/v1", "model": "k", "paid": True, "price": price}
        raw = {"routing": {"primary": "kimi"}, "tiers": {"kimi": tier}}
        return [w for w in build_config(raw, "proxy.yaml", {}).warnings if "per_call_usd" in w]

    assert warnings({"per_call_usd": 0.001}) == [
        "tier 'kimi': price.per_call_usd applies only to calls whose upstream reports no token usage; with no "
        "per-token price, a call that reports usage costs $0 and counts toward no budget: set input_per_mtok "
        "and output_per_mtok"
    ]
    assert warnings({"per_call_usd": 0.001, "output_per_mtok": 2.5}) == []
    assert warnings({"input_per_mtok": 0.6}) == []
