"""proxy.yaml -> a frozen, typed `Config`.

The file is decoded with msgspec so that unknown keys and wrong types are errors that name
the key; the original system's `strategic_planner:` block is mapped onto the same structure.
API keys are read from the environment here and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

from proxy.legacy import LEGACY_KEYS, apply_legacy

log = logging.getLogger("proxy.config")

Positive = Annotated[float, msgspec.Meta(gt=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Money = Decimal


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class PriceSpec(_Strict, frozen=True):
    """USD prices; per million tokens, or flat per call when the upstream reports no usage."""

    input_per_mtok: Money = Decimal(0)
    cached_input_per_mtok: Money | None = None  # defaults to the input price
    output_per_mtok: Money = Decimal(0)
    per_call_usd: Money | None = None


class TierSpec(_Strict, frozen=True):
    base_url: str
    model: str
    api_key_env: str | None = None
    paid: bool = False
    enabled: bool = True
    aliases: list[str] = []
    timeout_seconds: Positive = 30.0
    stream_idle_timeout_seconds: Positive = 30.0
    connect_timeout_seconds: Positive = 5.0
    max_connections: AtLeastOne = 256
    price: PriceSpec = PriceSpec()


class RoutingSpec(_Strict, frozen=True):
    primary: str = "llama"
    default_model: str = "auto"
    use_llama_for_minor_replans: bool = True
    escalate_after_failures: AtLeastOne = 3
    breaker_cooldown_seconds: Positive = 30.0
    recovery_threshold: AtLeastOne = 1


class RetrySpec(_Strict, frozen=True):
    max_fallback_retries: AtLeastOne = 2  # attempts per tier
    max_total_retries: AtLeastOne = 5  # attempts per request
    backoff_initial_seconds: Positive = 0.1
    backoff_max_seconds: Positive = 2.0
    request_deadline_seconds: Positive = 120.0


class ServerSpec(_Strict, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: AtLeastOne = 8 * 1024 * 1024
    max_response_bytes: AtLeastOne = 64 * 1024 * 1024
    shutdown_timeout_seconds: Positive = 30.0
    body_read_timeout_seconds: Positive = 30.0  # a client must send its whole body within this
    # A connection must send a complete request head within this of opening or of its previous
    # response, else it is closed: idle keep-alive connections and slowloris clients alike.
    idle_timeout_seconds: Positive = 30.0


class ClientKeySpec(_Strict, frozen=True):
    """A client allowed in: its secret from an environment variable, or only its SHA-256."""

    name: str
    secret_env: str | None = None
    sha256: str | None = None  # hex digest of the secret, for configs that must not hold it
    requests_per_minute: AtLeastOne | None = None
    daily_usd: Money | None = None  # spend cap for this client, per UTC day


class AuthSpec(_Strict, frozen=True):
    keys: list[ClientKeySpec] = []


class LedgerSpec(_Strict, frozen=True):
    path: str = "ledger.db"
    store_text: bool = False
    batch_size: AtLeastOne = 500
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 2000  # wait this long for a lock before retrying


class BudgetSpec(_Strict, frozen=True):
    daily_usd: Money | None = None
    weekly_usd: Money | None = None
    monthly_usd: Money | None = None
    soft_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8


def _default_tiers() -> dict[str, TierSpec]:
    return {
        "llama": TierSpec(
            base_url="http://localhost:11434/v1",
            model="llama3.1:8b",
            timeout_seconds=30.0,
            aliases=["llama3.1-8b", "llama-3.1-8b"],
        ),
        "ollama": TierSpec(
            base_url="http://localhost:11434/v1",
            model="qwen2.5:7b",
            timeout_seconds=20.0,
            aliases=["ollama-7b"],
        ),
        "kimi": TierSpec(
            base_url="https://api.moonshot.ai/v1",
            model="kimi-k2.5",
            api_key_env="MOONSHOT_API_KEY",
            paid=True,
            timeout_seconds=30.0,
            aliases=["kimi-k2"],
            price=PriceSpec(
                input_per_mtok=Decimal("0.60"),
                cached_input_per_mtok=Decimal("0.15"),
                output_per_mtok=Decimal("2.50"),
                per_call_usd=Decimal("0.0008"),
            ),
        ),
    }


class FileSpec(_Strict, frozen=True):
    server: ServerSpec = ServerSpec()
    routing: RoutingSpec = RoutingSpec()
    retries: RetrySpec = RetrySpec()
    tiers: dict[str, TierSpec] = msgspec.field(default_factory=_default_tiers)
    ledger: LedgerSpec = LedgerSpec()
    budgets: BudgetSpec = BudgetSpec()
    auth: AuthSpec = AuthSpec()


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal
    per_call_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class Tier:
    id: str
    base_url: str  # without trailing slash, e.g. http://host:port/v1
    model: str
    paid: bool
    aliases: tuple[str, ...]
    timeout: float
    stream_idle_timeout: float
    connect_timeout: float
    max_connections: int
    price: Price
    api_key_env: str | None
    api_key: str | None = field(default=None, repr=False)
    skip_reason: str | None = None  # set when the tier cannot be used (disabled, no key)

    @property
    def usable(self) -> bool:
        return self.skip_reason is None

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the secret; the secret itself is not kept
    requests_per_minute: int | None
    daily_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class Config:
    source: str  # the file it came from, or "<defaults>"
    server: ServerSpec
    routing: RoutingSpec
    retries: RetrySpec
    ledger: LedgerSpec
    budgets: BudgetSpec
    tiers: tuple[Tier, ...]  # every configured tier in config order, usable or not
    warnings: tuple[str, ...] = ()
    pin_names: Mapping[str, str] = field(default_factory=dict)
    # Client keys: with `auth_required` every /v1 and /proxy request needs one of `client_keys`.
    auth_required: bool = False
    client_keys: tuple[ClientKey, ...] = ()

    def tier(self, tier_id: str) -> Tier:
        for t in self.tiers:
            if t.id == tier_id:
                return t
        raise KeyError(tier_id)

    @property
    def usable_tiers(self) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.usable)

    def model_names(self) -> Mapping[str, str]:
        """Every name a client may put in `model` that pins a usable tier -> the tier id."""
        return self.pin_names

    @property
    def auto_model_names(self) -> frozenset[str]:
        return frozenset({"auto", self.routing.default_model})


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file (None: the built-in defaults)."""
    env = os.environ if env is None else env
    if path is None:
        return build_config({}, "<defaults>", env)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, str(p), env)


def build_config(raw: dict[str, Any], source: str, env: Mapping[str, str]) -> Config:
    raw = dict(raw)
    legacy = {k: raw.pop(k) for k in LEGACY_KEYS if k in raw}
    tiers_raw = raw.pop("tiers", None)
    spec = _convert(source, "", raw, FileSpec)
    if tiers_raw is not None:
        if not isinstance(tiers_raw, dict) or not tiers_raw:
            raise ConfigError(f"{source}: tiers: expected a mapping of tier id -> tier settings")
        tiers = {str(k): _convert(source, f"tiers.{k}", v, TierSpec) for k, v in tiers_raw.items()}
        spec = msgspec.structs.replace(spec, tiers=tiers)
    try:
        spec = apply_legacy(spec, legacy)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_with_path(str(e), 'strategic_planner')}") from e
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from e
    return _resolve(spec, source, env)


_T = TypeVar("_T")


def _convert(source: str, where: str, value: Any, kind: type[_T]) -> _T:
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_with_path(str(e), where)}") from e


def _with_path(message: str, where: str) -> str:
    """msgspec says '... - at `$.a.b`'; name the key as the user wrote it in the file."""
    text, _, at = message.partition(" - at `$")
    key = ".".join(p for p in (where, at.rstrip("`").lstrip(".")) if p)
    return f"{key}: {text}" if key else text


def _resolve(spec: FileSpec, source: str, env: Mapping[str, str]) -> Config:
    warnings: list[str] = []
    tiers: list[Tier] = []
    seen_names: dict[str, str] = {}
    for tier_id, ts in spec.tiers.items():
        _check_url(source, tier_id, ts.base_url)
        for name in (tier_id, *ts.aliases):
            if name in seen_names:
                raise ConfigError(
                    f"{source}: tiers.{tier_id}: name {name!r} is already used by tier {seen_names[name]!r}"
                )
            seen_names[name] = tier_id
        key = env.get(ts.api_key_env) if ts.api_key_env else None
        skip = None
        if not ts.enabled:
            skip = "disabled in config"
        elif ts.api_key_env and not key:
            skip = f"environment variable {ts.api_key_env} is not set"
            warnings.append(f"tier {tier_id!r} is skipped: its API key variable {ts.api_key_env} is not set")
        tiers.append(
            Tier(
                id=tier_id,
                base_url=ts.base_url.rstrip("/"),
                model=ts.model,
                paid=ts.paid,
                aliases=tuple(ts.aliases),
                timeout=ts.timeout_seconds,
                stream_idle_timeout=ts.stream_idle_timeout_seconds,
                connect_timeout=ts.connect_timeout_seconds,
                max_connections=ts.max_connections,
                price=_price(source, tier_id, ts.price),
                api_key_env=ts.api_key_env,
                api_key=key or None,
                skip_reason=skip,
            )
        )
    if not tiers:
        raise ConfigError(f"{source}: tiers: at least one tier must be configured")
    ids = [t.id for t in tiers]
    if spec.routing.primary not in ids:
        raise ConfigError(
            f"{source}: routing.primary: {spec.routing.primary!r} is not a tier; tiers are {', '.join(ids)}"
        )
    if spec.routing.default_model in seen_names:
        raise ConfigError(
            f"{source}: routing.default_model: {spec.routing.default_model!r} is also a tier name or alias"
        )
    if "auto" in seen_names:
        raise ConfigError(f"{source}: 'auto' is reserved for routing and cannot name a tier")
    if spec.retries.backoff_max_seconds < spec.retries.backoff_initial_seconds:
        raise ConfigError(f"{source}: retries.backoff_max_seconds is below retries.backoff_initial_seconds")
    if not any(t.usable for t in tiers):
        warnings.append("no tier is usable: every request will fail until one is configured")
    client_keys = _client_keys(source, spec.auth, env, warnings)
    return Config(
        source=source,
        server=spec.server,
        routing=spec.routing,
        retries=spec.retries,
        ledger=spec.ledger,
        budgets=spec.budgets,
        tiers=tuple(tiers),
        warnings=tuple(warnings),
        pin_names={name: t.id for t in tiers if t.usable for name in (t.id, *t.aliases)},
        auth_required=bool(spec.auth.keys),
        client_keys=client_keys,
    )


def _client_keys(source: str, auth: AuthSpec, env: Mapping[str, str], warnings: list[str]) -> tuple[ClientKey, ...]:
    keys: list[ClientKey] = []
    names: set[str] = set()
    for i, k in enumerate(auth.keys):
        where = f"{source}: auth.keys[{i}] ({k.name!r})"
        if k.name in names:
            raise ConfigError(f"{where}: the name is used twice")
        names.add(k.name)
        if (k.secret_env is None) == (k.sha256 is None):
            raise ConfigError(f"{where}: set exactly one of secret_env or sha256")
        if k.daily_usd is not None and (not k.daily_usd.is_finite() or k.daily_usd < 0):
            raise ConfigError(f"{where}: daily_usd must be a number >= 0")
        if k.sha256 is not None:
            try:
                digest = bytes.fromhex(k.sha256)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"{where}: sha256 must be 64 hex digits (sha256sum of the key)")
        else:
            assert k.secret_env is not None
            secret = env.get(k.secret_env)
            if not secret:
                warnings.append(f"client key {k.name!r} is disabled: its variable {k.secret_env} is not set")
                continue
            digest = hashlib.sha256(secret.encode()).digest()
        keys.append(ClientKey(k.name, digest, k.requests_per_minute, k.daily_usd))
    return tuple(keys)


def _price(source: str, tier_id: str, p: PriceSpec) -> Price:
    for name in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "per_call_usd"):
        value = getattr(p, name)
        if value is not None and (not value.is_finite() or value < 0):
            raise ConfigError(f"{source}: tiers.{tier_id}.price.{name}: must be a number >= 0, got {value}")
    cached = p.cached_input_per_mtok if p.cached_input_per_mtok is not None else p.input_per_mtok
    return Price(p.input_per_mtok, cached, p.output_per_mtok, p.per_call_usd)


def _check_url(source: str, tier_id: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{source}: tiers.{tier_id}.base_url: {url!r} is not an http(s) URL "
            "(expected e.g. http://localhost:11434/v1)"
        )
