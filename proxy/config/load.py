"""proxy.yaml -> a frozen, typed `Config`.

The file is decoded with msgspec so that unknown keys and wrong types are errors that name
the key; the original system's `strategic_planner:` block is mapped onto the same structure.
API keys are read from the environment here and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

from proxy.config.names import BadModelName, TierNames, mapped_to_unusable, resolve_names
from proxy.config.origins import cors_policy
from proxy.config.resolved import ClientKey, Config, Cors, Price, Tier, Transport, held_back
from proxy.config.schema import HELD_BACK_HEADERS, AuthSpec, FileSpec, LedgerSpec, PriceSpec, TierSpec
from proxy.config.strategic_planner import PLANNER_KEYS, apply_planner_block
from proxy.config.urls import url_password
from proxy.gateway.redact import Redactor
from proxy.records import Api

log = logging.getLogger("proxy.config")


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the key."""


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
    planner = {k: raw.pop(k) for k in PLANNER_KEYS if k in raw}
    tiers_raw = raw.pop("tiers", None)
    spec = _convert(source, "", raw, FileSpec)
    if tiers_raw is not None:
        if not isinstance(tiers_raw, dict) or not tiers_raw:
            raise ConfigError(f"{source}: tiers: expected a mapping of tier id -> tier settings")
        tiers = {str(k): _convert(source, f"tiers.{k}", v, TierSpec) for k, v in tiers_raw.items()}
        spec = msgspec.structs.replace(spec, tiers=tiers)
    try:
        spec = apply_planner_block(spec, planner)
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
                stream_max=ts.stream_max_seconds,
                connect_timeout=ts.connect_timeout_seconds,
                max_connections=ts.max_connections,
                price=_price(source, tier_id, ts.price, warnings),
                api_key_env=ts.api_key_env,
                api_key=key or None,
                skip_reason=skip,
                transport=_transport(source, tier_id, ts, warnings),
                endpoints=frozenset(Api) if ts.endpoints is None else frozenset(Api(e) for e in ts.endpoints),
                forward_headers=_forward_headers(f"{source}: tiers.{tier_id}.forward_headers", ts.forward_headers),
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
    try:
        names = resolve_names(spec.routing, [TierNames(t.id, t.aliases, t.model, t.usable) for t in tiers])
    except BadModelName as e:
        raise ConfigError(f"{source}: {e}") from None
    warnings += mapped_to_unusable(names, {t.id for t in tiers if t.usable})
    ledger_password = _ledger_password(source, spec.ledger, env)
    secrets = [t.api_key for t in tiers] + [url_password(t.transport.http_proxy) for t in tiers]
    secrets.append(_state(source, spec))
    secrets += [ledger_password, url_password(spec.ledger.url)]
    client_keys = _client_keys(source, spec.auth, env, warnings, secrets)
    return Config(
        source=source,
        server=spec.server,
        routing=spec.routing,
        retries=spec.retries,
        ledger=spec.ledger,
        budgets=spec.budgets,
        quality=spec.quality,
        tiers=tuple(tiers),
        warnings=tuple(warnings),
        names=names,
        auth_required=bool(spec.auth.keys),
        client_keys=client_keys,
        redactor=Redactor(secrets),
        cors=_cors(source, spec),
        state=spec.state,
        ledger_password=ledger_password,
    )


def _ledger_password(source: str, ledger: LedgerSpec, env: Mapping[str, str]) -> str | None:
    """Check `ledger.url` and read the password `ledger.password_env` names."""
    if ledger.url is not None:
        parts = urlsplit(ledger.url)
        if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or parts.path.strip("/")):
            raise ConfigError(
                f"{source}: ledger.url: not a PostgreSQL URL (expected e.g. postgresql://proxy@db.internal:5432/proxy)"
            )
    if ledger.password_env is None:
        return None
    if ledger.url is None:
        raise ConfigError(f"{source}: ledger.password_env is set but ledger.url is not")
    password = env.get(ledger.password_env)
    if not password:
        raise ConfigError(f"{source}: ledger.password_env: environment variable {ledger.password_env} is not set")
    return password


def _client_keys(
    source: str, auth: AuthSpec, env: Mapping[str, str], warnings: list[str], secrets: list[str | None]
) -> tuple[ClientKey, ...]:
    """The enabled keys; each secret read is appended to `secrets` (for redaction only: a
    ClientKey keeps just the digest)."""
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
            secrets.append(secret)
        keys.append(ClientKey(k.name, digest, k.requests_per_minute, k.daily_usd))
    return tuple(keys)


def _price(source: str, tier_id: str, p: PriceSpec, warnings: list[str]) -> Price:
    for name in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "per_call_usd"):
        value = getattr(p, name)
        if value is not None and (not value.is_finite() or value < 0):
            raise ConfigError(f"{source}: tiers.{tier_id}.price.{name}: must be a number >= 0, got {value}")
    if p.per_call_usd and not (p.input_per_mtok or p.output_per_mtok):
        warnings.append(
            f"tier {tier_id!r}: price.per_call_usd applies only to calls whose upstream reports no token "
            "usage; with no per-token price, a call that reports usage costs $0 and counts toward no "
            "budget: set input_per_mtok and output_per_mtok"
        )
    cached = p.cached_input_per_mtok if p.cached_input_per_mtok is not None else p.input_per_mtok
    return Price(p.input_per_mtok, cached, p.output_per_mtok, p.per_call_usd)


def _transport(source: str, tier_id: str, ts: TierSpec, warnings: list[str]) -> Transport:
    where = f"{source}: tiers.{tier_id}"
    if ts.ca_bundle is not None:
        try:
            ssl.create_default_context(cafile=ts.ca_bundle)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"{where}.ca_bundle: {ts.ca_bundle!r} is not a readable PEM file of CA certificates ({e})"
            ) from None
    if not ts.verify_tls:
        warnings.append(
            f"tier {tier_id!r}: TLS certificates are NOT checked (verify_tls: false): anyone on the network "
            "path can read its API key and answers; use ca_bundle for a private CA instead"
        )
    if ts.http_proxy is not None:
        parts = urlsplit(ts.http_proxy)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.http_proxy: not an http(s) URL (expected e.g. http://proxy.internal:3128)")
    return Transport(ts.ca_bundle, ts.verify_tls, ts.http_proxy)


def _forward_headers(where: str, names: list[str]) -> tuple[str, ...]:
    out = []
    for name in names:
        low = name.strip().lower()
        if not held_back(low.rstrip("*")):
            raise ConfigError(
                f"{where}: {name!r} is not held back from tiers, so there is nothing to opt in to: only "
                f"{', '.join(HELD_BACK_HEADERS)} are. Every other client header already reaches every tier, "
                "and the proxy's own (Authorization, Cookie, X-Tier, ...) never do"
            )
        out.append(low)
    return tuple(out)


def _cors(source: str, spec: FileSpec) -> Cors:
    try:
        return cors_policy(spec.server.cors, keys=bool(spec.auth.keys))
    except ValueError as e:
        raise ConfigError(f"{source}: server.cors: {e}") from None


def _state(source: str, spec: FileSpec) -> str | None:
    """Checks `state:`; its password (to redact), if the url has one."""
    st = spec.state
    if st.url is None:
        return None
    parts = urlsplit(st.url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{source}: state.url: not a redis://, rediss:// or unix:// URL (e.g. redis://127.0.0.1:6379/0)"
        )
    if not st.prefix or any(c in st.prefix for c in " {}"):
        raise ConfigError(f"{source}: state.prefix: must be non-empty, without spaces or braces")
    if st.hold_seconds <= spec.retries.request_deadline_seconds:
        raise ConfigError(f"{source}: state.hold_seconds must be above retries.request_deadline_seconds")
    return parts.password


def _check_url(source: str, tier_id: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{source}: tiers.{tier_id}.base_url: {url!r} is not an http(s) URL "
            "(expected e.g. http://localhost:11434/v1)"
        )
