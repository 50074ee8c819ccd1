"""Which `model` names the proxy accepts, and what each one means.

A name is, in this order of precedence:

1. `auto` or `routing.default_model`: the proxy chooses the chain;
2. a tier's id or alias (`kimi`, `kimi-k2`): that tier first, the others after it;
3. an entry of `routing.models` (`gpt-4o-mini: auto`, `gpt-4o: kimi`): what it maps to;
4. a tier's upstream model id (`kimi-k2.5`): that tier, unless an entry of `routing.models`
   uses the same name; an id two tiers share names the first of them in config order;
5. anything else: refused (404 `model_not_found`) or routed as `auto`, by `routing.unknown_model`.

The names are resolved once, when the config is loaded; a request only looks them up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config.schema import RoutingSpec

AUTO = "auto"


class BadModelName(ValueError):
    """A `routing.models` entry that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class TierNames:
    """What names a tier has: its id, aliases and upstream model id."""

    id: str
    aliases: tuple[str, ...]
    model: str
    usable: bool


@dataclass(frozen=True, slots=True)
class ModelNames:
    """Every accepted `model` name -> what it means. A target is a tier id, or None for auto."""

    auto: frozenset[str] = frozenset({AUTO})
    pins: Mapping[str, str] = field(default_factory=dict)  # ids and aliases of usable tiers
    upstream: Mapping[str, str] = field(default_factory=dict)  # upstream model ids of usable tiers
    mapped: Mapping[str, str | None] = field(default_factory=dict)  # routing.models
    unknown: Literal["refuse", "auto"] = "refuse"
    # Names of tiers that are configured but not usable (disabled, no key) -> the tier id.
    unusable: Mapping[str, str] = field(default_factory=dict)

    def tier_names(self) -> dict[str, str]:
        """The names that pin a usable tier, as a `model` or an X-Tier value -> the tier id."""
        return {**self.upstream, **self.pins}


def resolve_names(routing: RoutingSpec, tiers: Sequence[TierNames]) -> ModelNames:
    """The name table for these tiers; raises BadModelName for a `routing.models` entry that
    shadows a tier's id or alias, or maps to nothing that exists."""
    auto = frozenset({AUTO, routing.default_model})
    own: dict[str, str] = {}  # ids and aliases of every tier, usable or not
    for t in tiers:
        for name in (t.id, *t.aliases):
            own.setdefault(name, t.id)
    upstream_all: dict[str, str] = {}
    for t in tiers:
        upstream_all.setdefault(t.model, t.id)
    usable = {t.id for t in tiers if t.usable}

    mapped: dict[str, str | None] = {}
    for name, target in routing.models.items():
        where = f"routing.models.{name}"
        if not name.strip():
            raise BadModelName(f"{where}: a model name cannot be empty")
        if name in auto:
            raise BadModelName(f"{where}: {name!r} already means 'let the proxy choose'; remove the entry")
        if name in own:
            raise BadModelName(f"{where}: {name!r} is already a name of tier {own[name]!r}; remove the entry")
        if target in auto:
            mapped[name] = None
        elif target in own:
            mapped[name] = own[target]
        elif target in upstream_all:
            mapped[name] = upstream_all[target]
        else:
            valid = ", ".join(sorted({AUTO, *own}))
            raise BadModelName(f"{where}: {target!r} is not a tier; map it to one of: {valid}")

    pins = {name: tid for name, tid in own.items() if tid in usable}
    upstream = {
        name: tid
        for name, tid in _first_usable_model(tiers).items()
        if name not in own and name not in mapped and name not in auto
    }
    unusable = {name: tid for name, tid in own.items() if tid not in usable}
    for t in tiers:
        if not t.usable and t.model not in own and t.model not in mapped and t.model not in upstream:
            unusable.setdefault(t.model, t.id)
    return ModelNames(
        auto=auto, pins=pins, upstream=upstream, mapped=mapped, unknown=routing.unknown_model, unusable=unusable
    )


def _first_usable_model(tiers: Sequence[TierNames]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tiers:
        if t.usable:
            out.setdefault(t.model, t.id)
    return out


def mapped_to_unusable(names: ModelNames, usable: set[str]) -> list[str]:
    """Warnings for `routing.models` entries whose tier is configured but not usable."""
    return [
        f"routing.models: {name!r} maps to tier {tid!r}, which is not usable: requests naming it get 503"
        for name, tid in names.mapped.items()
        if tid is not None and tid not in usable
    ]


def describe_names(names: ModelNames, tiers: Sequence[TierNames]) -> list[str]:
    """`proxy check`'s model map: one line per name or group of names."""
    lines = [f"  {', '.join(sorted(names.auto))}: the proxy chooses the chain"]
    for t in tiers:
        if not t.usable:
            continue
        own = [t.id, *t.aliases]
        extra = [n for n, tid in names.upstream.items() if tid == t.id]
        shown = ", ".join(own + [f"{n} (upstream id)" for n in extra])
        lines.append(f"  {shown}: tier {t.id} first")
    for name, tid in names.mapped.items():
        lines.append(f"  {name}: {'auto' if tid is None else f'tier {tid} first'} (routing.models)")
    shared = [t for t in tiers if t.usable and names.upstream.get(t.model) not in (None, t.id)]
    for t in shared:
        lines.append(f"  ({t.model} is also tier {t.id}'s upstream id: it names {names.upstream[t.model]})")
    for t in tiers:
        if not t.usable:
            shown = ", ".join(n for n, tid in names.unusable.items() if tid == t.id)
            lines.append(f"  {shown}: tier {t.id} is not usable: 503 tier_unavailable")
    if names.unknown == "auto":
        lines.append("  any other name: routed as auto (routing.unknown_model: auto)")
    else:
        lines.append("  any other name: 404 model_not_found (routing.unknown_model: refuse)")
    return lines
