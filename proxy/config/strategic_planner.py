"""The original system's `strategic_planner:` block, mapped onto the proxy's config.

Users already have this block in their YAML; it must keep meaning what it meant:

    strategic_planner:
      primary_llm: llama            -> routing.primary
      kimi_timeout_seconds: 5       -> tiers.kimi.timeout_seconds
      llama_timeout_seconds: 30     -> tiers.llama.timeout_seconds
      ollama_timeout_seconds: 20    -> tiers.ollama.timeout_seconds
      max_fallback_retries: 2       -> retries.max_fallback_retries (attempts per tier)
      max_total_retries: 5          -> retries.max_total_retries (attempts per request)
      use_llama_for_minor_replans: true -> routing.use_llama_for_minor_replans
      escalate_after_failures: 3    -> routing.escalate_after_failures
      llama_model: llama3.1:8b      -> tiers.llama.model
      llama_url: http://host:11434  -> tiers.llama.base_url (normalised to .../v1)
      recovery_threshold: 1         -> routing.recovery_threshold
    kimi: {enabled: false}          -> tiers.kimi.enabled (also accepted inside strategic_planner)

Where the block and the new sections set the same thing, the block wins.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

from proxy.config.schema import AtLeastOne, FileSpec, Positive, Strict, TierSpec

# The top-level keys of the original system's config that this module reads.
PLANNER_KEYS = ("strategic_planner", "kimi")

_S = TypeVar("_S", bound=msgspec.Struct)


class KimiBlock(Strict, frozen=True):
    enabled: bool = True
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None


class PlannerBlock(Strict, frozen=True):
    primary_llm: str | None = None
    kimi_timeout_seconds: Positive | None = None
    llama_timeout_seconds: Positive | None = None
    ollama_timeout_seconds: Positive | None = None
    max_fallback_retries: AtLeastOne | None = None
    max_total_retries: AtLeastOne | None = None
    use_llama_for_minor_replans: bool | None = None
    escalate_after_failures: AtLeastOne | None = None
    llama_model: str | None = None
    llama_url: str | None = None
    ollama_model: str | None = None
    ollama_url: str | None = None
    kimi_model: str | None = None
    recovery_threshold: AtLeastOne | None = None
    kimi: KimiBlock | None = None


def apply_planner_block(spec: FileSpec, raw: dict[str, Any]) -> FileSpec:
    """Return `spec` with the original blocks in `raw` applied (raises msgspec.ValidationError)."""
    if not raw:
        return spec
    planner = msgspec.convert(raw.get("strategic_planner") or {}, PlannerBlock, strict=True)
    top_kimi = msgspec.convert(raw["kimi"], KimiBlock, strict=True) if raw.get("kimi") is not None else None
    kimi = top_kimi or planner.kimi

    routing = _replace(
        spec.routing,
        primary=planner.primary_llm,
        use_llama_for_minor_replans=planner.use_llama_for_minor_replans,
        escalate_after_failures=planner.escalate_after_failures,
        recovery_threshold=planner.recovery_threshold,
    )
    retries = _replace(
        spec.retries,
        max_fallback_retries=planner.max_fallback_retries,
        max_total_retries=planner.max_total_retries,
    )
    tiers = dict(spec.tiers)
    _update_tier(
        tiers,
        "llama",
        timeout_seconds=planner.llama_timeout_seconds,
        model=planner.llama_model,
        base_url=normalise_url(planner.llama_url) if planner.llama_url else None,
    )
    _update_tier(
        tiers,
        "ollama",
        timeout_seconds=planner.ollama_timeout_seconds,
        model=planner.ollama_model,
        base_url=normalise_url(planner.ollama_url) if planner.ollama_url else None,
    )
    _update_tier(
        tiers,
        "kimi",
        timeout_seconds=planner.kimi_timeout_seconds,
        model=(kimi.model if kimi else None) or planner.kimi_model,
        base_url=kimi.base_url if kimi else None,
        api_key_env=kimi.api_key_env if kimi else None,
        enabled=kimi.enabled if kimi else None,
    )
    if kimi is not None and not kimi.enabled and routing.primary == "kimi":
        raise ValueError("strategic_planner.primary_llm is 'kimi' but kimi.enabled is false")
    return msgspec.structs.replace(spec, routing=routing, retries=retries, tiers=tiers)


def normalise_url(url: str) -> str:
    """The original `llama_url` may be a bare host or an Ollama native endpoint: make it .../v1."""
    parts = urlsplit(url.rstrip("/"))
    path = parts.path
    for native in ("/api/generate", "/api/chat", "/api"):
        if path.endswith(native):
            path = path[: -len(native)]
            break
    if not path.endswith("/v1"):
        path = path + "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _replace(struct: _S, **changes: Any) -> _S:
    given = {k: v for k, v in changes.items() if v is not None}
    return msgspec.structs.replace(struct, **given) if given else struct


def _update_tier(tiers: dict[str, TierSpec], tier_id: str, **changes: Any) -> None:
    if tier_id in tiers:
        tiers[tier_id] = _replace(tiers[tier_id], **changes)
    elif any(v is not None for v in changes.values()):
        raise ValueError(f"strategic_planner sets options for tier {tier_id!r}, but the tiers section has no such tier")
