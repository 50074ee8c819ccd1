"""`proxy check`: what the config resolves to, in words. Never prints a secret."""

from __future__ import annotations

from proxy.config import Config
from proxy.routing import RouteHints, make_plan


def describe(config: Config) -> str:
    lines = [f"config: {config.source}", "", "tiers:"]
    for t in config.tiers:
        status = "usable" if t.usable else f"SKIPPED ({t.skip_reason})"
        key = (
            "no key needed" if not t.api_key_env else f"key from ${t.api_key_env}: {'set' if t.api_key else 'NOT SET'}"
        )
        kind = "paid" if t.paid else "free"
        lines.append(f"  {t.id:<8} {kind:<4} {t.model} at {t.base_url}  timeout {t.timeout:g}s  {key}  -> {status}")
        if t.aliases:
            lines.append(f"           aliases: {', '.join(t.aliases)}")
    lines += ["", "routes:"]
    for label, hints in (
        ("default", RouteHints()),
        ("X-Replan: minor", RouteHints(replan="minor")),
        ("X-Complexity: complex", RouteHints(complexity="complex")),
    ):
        lines.append(f"  {label:<22} {_chain(config, hints)}")
    r = config.retries
    lines += [
        "",
        f"retries: {r.max_fallback_retries} attempts per tier, {r.max_total_retries} per request, "
        f"deadline {r.request_deadline_seconds:g}s",
        f"escalation: after {config.routing.escalate_after_failures} consecutive failures of "
        f"{config.routing.primary!r}, for {config.routing.breaker_cooldown_seconds:g}s",
        f"ledger: {config.ledger.path}",
    ]
    if config.warnings:
        lines += ["", "warnings:", *(f"  - {w}" for w in config.warnings)]
    return "\n".join(lines)


def _chain(config: Config, hints: RouteHints) -> str:
    from proxy.errors import ProxyError

    try:
        return " -> ".join(make_plan(config, hints, frozenset()).tier_ids)
    except ProxyError as e:
        return f"(no chain: {e.message})"
