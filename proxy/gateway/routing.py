"""Which tiers to try, in which order, and why: headers + body model + config + breakers -> Plan.

Pure functions: no I/O, no clock; the caller passes the breaker and budget state in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from multidict import MultiMapping

from proxy.config import Config, Tier
from proxy.errors import BadRequest, NotFound, RateLimited, Unavailable
from proxy.records import Route

_REPLAN = ("minor", "major")
_COMPLEXITY = ("simple", "normal", "complex")
_FALLBACK = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
_FALLBACK_SHOWN = ("on", "off")
_CHECK = ("auto", "json", "off")  # X-Proxy-Check: the quality gate for this request


@dataclass(frozen=True, slots=True)
class RouteHints:
    """What the client asked for, from its headers and the body's `model`."""

    replan: str | None = None
    complexity: str | None = None
    tier: str | None = None
    fallback: bool = True
    model: str | None = None
    check: str | None = None  # X-Proxy-Check, one of _CHECK


@dataclass(frozen=True, slots=True)
class Plan:
    chain: tuple[Tier, ...]  # what the failover loop walks, in order
    route: Route
    # Every tier's breaker was open: the failover loop sends only what a breaker lets through
    # (a half-open probe; a tier open on bad answers, which is up), else answers 503 at once.
    all_open: bool = False

    @property
    def tier_ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self.chain)


def parse_hints(headers: Mapping[str, str], model: str | None) -> RouteHints:
    """`headers` is the request's (a multidict: a header may come several times) or a plain dict."""
    replan = _choice(headers, "X-Replan", _REPLAN)
    complexity = _choice(headers, "X-Complexity", _COMPLEXITY)
    fallback_raw = _single(headers, "X-Fallback", ", ".join(_FALLBACK_SHOWN), fold=True)
    fallback = True
    if fallback_raw is not None:
        value = _FALLBACK.get(fallback_raw.lower())
        if value is None:
            raise BadRequest(
                f"Invalid X-Fallback header value {fallback_raw!r}: allowed values are on, off",
                param="X-Fallback",
                code="invalid_header",
            )
        fallback = value
    tier = _single(headers, "X-Tier", "a tier id or alias from GET /v1/models", fold=False)
    check = _choice(headers, "X-Proxy-Check", _CHECK)
    return RouteHints(replan=replan, complexity=complexity, tier=tier, fallback=fallback, model=model, check=check)


def _choice(headers: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    raw = _single(headers, name, ", ".join(allowed), fold=True)
    if raw is None:
        return None
    value = raw.lower()
    if value not in allowed:
        raise BadRequest(
            f"Invalid {name} header value {raw!r}: allowed values are {', '.join(allowed)}",
            param=name,
            code="invalid_header",
        )
    return value


def _single(headers: Mapping[str, str], name: str, allowed: str, *, fold: bool) -> str | None:
    """The header's one value, stripped. A routing header sent twice with different values, or
    with several comma-separated values, is ambiguous: which one wins would decide, say, whether
    a minor re-plan may reach the paid tier, so it is refused rather than guessed."""
    if isinstance(headers, MultiMapping):
        values: list[str] = [v.strip() for v in headers.getall(name, [])]
    else:
        one = headers.get(name)
        values = [] if one is None else [one.strip()]
    if not values:
        return None
    for v in values:
        if "," in v:
            raise BadRequest(
                f"Invalid {name} header value {v!r}: send one value, not a list (allowed: {allowed})",
                param=name,
                code="invalid_header",
            )
    if len({v.lower() if fold else v for v in values}) > 1:
        shown = ", ".join(repr(v) for v in values)
        raise BadRequest(
            f"The {name} header was sent {len(values)} times with different values ({shown}): "
            f"send it once, with one of: {allowed}",
            param=name,
            code="invalid_header",
        )
    return values[0]


def make_plan(
    config: Config, hints: RouteHints, blocked: frozenset[str], paid_blocked_for: float | None = None
) -> Plan:
    """Build the chain. `blocked`: tiers whose breaker is open; `paid_blocked_for`: seconds until
    the spend budget allows paid tiers again (None: it allows them now)."""
    usable = config.usable_tiers
    primary = config.routing.primary
    base = tuple(t for t in usable if t.id == primary) + tuple(t for t in usable if t.id != primary)
    minor = config.routing.use_llama_for_minor_replans and (hints.replan == "minor" or hints.complexity == "simple")

    pinned = _pinned_tier(config, hints)
    if pinned is not None:
        route = Route.PINNED
        chain = (pinned, *(t for t in base if t is not pinned))
        if minor and pinned.paid:
            raise BadRequest(
                f"Tier {pinned.id!r} is paid, but this request is a minor re-plan, which never uses a "
                "paid tier: pin a free tier or drop X-Replan: minor / X-Complexity: simple",
                param="X-Tier",
                code="paid_tier_not_allowed",
            )
    elif minor:
        route, chain = Route.MINOR_REPLAN, base
    elif hints.complexity == "complex":
        route, chain = Route.COMPLEX, _paid_first(base)
    elif primary in blocked and not _is_paid(config, primary) and any(t.paid for t in base):
        route, chain = Route.ESCALATED, _paid_first(base)
    else:
        route, chain = Route.DEFAULT, base

    if minor:
        chain = tuple(t for t in chain if not t.paid)
    if paid_blocked_for is not None and any(t.paid for t in chain):
        if pinned is not None and pinned.paid:
            raise RateLimited(
                f"Tier {pinned.id!r} is paid and the spend budget is exhausted: pin a free tier or wait "
                "for the budget window to reset",
                code="budget_exhausted",
                headers={"Retry-After": str(max(int(paid_blocked_for) + 1, 1))},
            )
        route, chain = Route.BUDGET, tuple(t for t in chain if not t.paid)
    if not hints.fallback:
        chain = chain[:1]
    if not chain:
        raise Unavailable(_no_tier_message(config, minor), code="no_tier_available")

    open_free = tuple(t for t in chain if t.id not in blocked)
    if not open_free:
        return Plan(chain=chain, route=route, all_open=True)
    return Plan(chain=open_free, route=route)


def _pinned_tier(config: Config, hints: RouteHints) -> Tier | None:
    """The tier the request names (X-Tier, else `model`), or None to let the proxy choose."""
    names = config.names
    if hints.tier is not None:
        tier_id = names.tier_names().get(hints.tier)
        if tier_id is None:
            _raise_unusable(config, hints.tier, "X-Tier")
            raise BadRequest(
                f"Invalid X-Tier header value {hints.tier!r}: allowed values are {', '.join(sorted(names.pins))}",
                param="X-Tier",
                code="invalid_header",
            )
        return config.tier(tier_id)
    model = hints.model
    if model is None or model in names.auto:
        return None
    tier_id = names.pins.get(model)
    if tier_id is None and model in names.mapped:
        target = names.mapped[model]
        if target is None:
            return None
        tier_id = target if config.tier(target).usable else None
        if tier_id is None:
            _raise_unusable(config, target, "model")
    if tier_id is None:
        tier_id = names.upstream.get(model)
    if tier_id is not None:
        return config.tier(tier_id)
    _raise_unusable(config, model, "model")
    if names.unknown == "auto":
        return None
    valid = sorted({*names.auto, *names.pins, *names.mapped})
    raise NotFound(
        f"The model {model!r} does not exist on this proxy. Use one of: {', '.join(valid)} "
        "('auto' lets the proxy choose; a tier's upstream model id works too; GET /v1/models lists them). "
        "An operator can accept other names with routing.models or routing.unknown_model.",
        param="model",
        code="model_not_found",
    )


def _raise_unusable(config: Config, name: str, param: str) -> None:
    tier_id = config.names.unusable.get(name)
    if tier_id is not None:
        t = config.tier(tier_id)
        raise Unavailable(
            f"Tier {t.id!r} is configured but not usable: {t.skip_reason}",
            param=param,
            code="tier_unavailable",
        )


def _paid_first(chain: tuple[Tier, ...]) -> tuple[Tier, ...]:
    return tuple(t for t in chain if t.paid) + tuple(t for t in chain if not t.paid)


def _is_paid(config: Config, tier_id: str) -> bool:
    return config.tier(tier_id).paid


def _no_tier_message(config: Config, minor: bool) -> str:
    skipped = [f"{t.id}: {t.skip_reason}" for t in config.tiers if not t.usable]
    why = "; ".join(skipped) if skipped else "none configured"
    if minor:
        return f"No free tier is usable for this minor re-plan (unusable tiers: {why})"
    return f"No tier is usable for this request (unusable tiers: {why})"
