"""`proxy check`: what the config resolves to, in words. Never prints a secret."""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.config import Config, Transport
from proxy.config.names import TierNames, describe_names
from proxy.config.urls import redact
from proxy.gateway.routing import RouteHints, make_plan


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
        reach = _transport(t.transport)
        if reach:
            lines.append(f"           {reach}")
    lines += ["", "model names (the request's `model`):"]
    lines += describe_names(config.names, [TierNames(t.id, t.aliases, t.model, t.usable) for t in config.tiers])
    lines += ["", "routes:"]
    for label, hints in (
        ("default", RouteHints()),
        ("X-Replan: minor", RouteHints(replan="minor")),
        ("X-Complexity: complex", RouteHints(complexity="complex")),
    ):
        lines.append(f"  {label:<22} {_chain(config, hints)}")
    r = config.retries
    paid = "once, unless it asks (429/503 with Retry-After)" if r.paid_retries == "when_asked" else "like the others"
    outage = (
        "a request whose every tier fails opens their breakers at once"
        if config.routing.open_breakers_on_outage
        else "breakers open only by their own count"
    )
    lines += [
        "",
        f"retries: {r.max_fallback_retries} attempts per tier, {r.max_total_retries} per request, "
        f"deadline {r.request_deadline_seconds:g}s; a paid tier is tried {paid}; "
        "an exhausted chain answers x-should-retry: false",
        f"escalation: after {config.routing.escalate_after_failures} consecutive failures of "
        f"{config.routing.primary!r}, for {config.routing.breaker_cooldown_seconds:g}s; {outage}; "
        "every breaker open: 503 at once with Retry-After, one probe per tier per cooldown",
        *_storage(config),
        _quality(config),
        _server(config),
        _cors(config),
        _clients(config),
        _budgets(config),
    ]
    if config.warnings:
        lines += ["", "warnings:", *(f"  - {w}" for w in config.warnings)]
    return "\n".join(lines)


def _storage(config: Config) -> list[str]:
    led, st = config.ledger, config.state
    if led.url is None:
        ledger = f"ledger: {led.path} (SQLite)"
    else:
        pw = f"${led.password_env}" if led.password_env else "the URL, PGPASSWORD or ~/.pgpass"
        ledger = f"ledger: PostgreSQL {redact(led.url)} (password from {pw}); spill file and journal beside {led.path}"
    if st.url is None:
        state = (
            "shared state: none: budgets, client limits and breakers live in this process "
            "(`--workers N` shares them through a private redis-server)"
        )
    else:
        state = f"shared state: Redis {redact(st.url)}, keys {{{st.prefix}}}:*, timeout {st.timeout_ms} ms"
    return [ledger, state]


def _transport(t: Transport) -> str:
    parts = []
    if t.ca_bundle is not None:
        parts.append(f"TLS checked against {t.ca_bundle}")
    if not t.verify_tls:
        parts.append("TLS certificates NOT checked (verify_tls: false)")
    if t.http_proxy is not None:
        u = urlsplit(t.http_proxy)
        parts.append(f"through the proxy {u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}")
    return "; ".join(parts)


def _quality(config: Config) -> str:
    q = config.quality
    if not q.enabled:
        return "quality gate: off (answers are never checked)"
    checks = [
        name
        for name, on in (
            ("json_object", q.json_object),
            ("json_schema", q.json_schema),
            ("tool_calls", q.tool_calls),
            ("cut_or_empty", q.cut_or_empty),
        )
        if on
    ]
    streams = "checked streams held until checked" if q.hold_streams else "checked streams relayed live, checked after"
    return f"quality gate: {', '.join(checks) or 'no check'}; without X-Proxy-Check: {q.default}; {streams}"


def _server(config: Config) -> str:
    s = config.server
    return (
        f"server: {s.host}:{s.port}; bodies up to {s.max_body_bytes / 2**20:g} MiB, sent within "
        f"{s.body_read_timeout_seconds:g}s; connections closed after {s.idle_timeout_seconds:g}s without a "
        f"request; {s.shutdown_timeout_seconds:g}s to finish on stop"
    )


def _cors(config: Config) -> str:
    c = config.cors
    if not c.enabled:
        return "cors: off (server.cors): browser pages on other origins cannot read the answers"
    who = "any origin" if c.any_origin else ", ".join(sorted(c.origins))
    others = "" if c.any_origin else "; other origins get 403"
    return f"cors: pages from {who} may call{' with a client key' if config.auth_required else ''}{others}"


def _clients(config: Config) -> str:
    if not config.auth_required:
        return "clients: no keys (auth.keys): `proxy serve` listens on loopback only unless --host is given"
    if not config.client_keys:
        return "clients: keys required, but none is enabled: every /v1 call gets 401"
    keys = []
    for k in config.client_keys:
        limits = [
            f"{k.requests_per_minute}/min" if k.requests_per_minute else "",
            f"${k.daily_usd}/day" if k.daily_usd is not None else "",
        ]
        shown = ", ".join(x for x in limits if x)
        keys.append(f"{k.name} ({shown})" if shown else k.name)
    return f"clients: keys required; enabled: {', '.join(keys)}"


def _budgets(config: Config) -> str:
    b = config.budgets
    caps = [
        (w, v) for w, v in (("day", b.daily_usd), ("week", b.weekly_usd), ("month", b.monthly_usd)) if v is not None
    ]
    if not caps:
        return "budgets: none (paid tiers are never held back by spend)"
    listed = ", ".join(f"${v}/{w}" for w, v in caps)
    return f"budgets: {listed}; paid tiers are skipped once one is spent (warning at {b.soft_ratio:.0%})"


def _chain(config: Config, hints: RouteHints) -> str:
    from proxy.errors import ProxyError

    try:
        return " -> ".join(make_plan(config, hints, frozenset()).tier_ids)
    except ProxyError as e:
        return f"(no chain: {e.message})"
