"""What a config resolves to: the frozen, typed `Config` the rest of the proxy reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from proxy.config.names import ModelNames
from proxy.config.schema import (
    HELD_BACK_HEADERS,
    BudgetSpec,
    LedgerSpec,
    QualitySpec,
    RetrySpec,
    RoutingSpec,
    ServerSpec,
    StateSpec,
)
from proxy.gateway.redact import Redactor
from proxy.records import Api

_HELD_NAMES = frozenset(h.lower() for h in HELD_BACK_HEADERS if not h.endswith("*"))
_HELD_PREFIXES = tuple(h[:-1].lower() for h in HELD_BACK_HEADERS if h.endswith("*"))


def held_back(name: str) -> bool:
    """A client header that no tier gets unless it opts in (`name` lower-cased)."""
    return name in _HELD_NAMES or name.startswith(_HELD_PREFIXES)


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal
    per_call_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class Transport:
    """How a tier's host is reached (tiers.<id>.ca_bundle, verify_tls, http_proxy)."""

    ca_bundle: str | None = None  # a PEM file of the CAs its certificate may chain to
    verify_tls: bool = True
    http_proxy: str | None = field(default=None, repr=False)  # may carry a password


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
    stream_max: float | None = None  # cap on a stream after its first event; None: no cap
    transport: Transport = field(default_factory=Transport)
    endpoints: frozenset[Api] = frozenset(Api)
    # Held-back headers this tier gets, lower-cased; an entry ending in "*" is a prefix.
    forward_headers: tuple[str, ...] = ()

    def forwards(self, name: str) -> bool:
        """Whether this tier opted in to the held-back header `name` (lower-cased)."""
        return any(name.startswith(f[:-1]) if f.endswith("*") else name == f for f in self.forward_headers)

    @property
    def usable(self) -> bool:
        return self.skip_reason is None

    def url(self, api: Api) -> str:
        return f"{self.base_url}/{api.value}"


@dataclass(frozen=True, slots=True)
class Cors:
    """Which browser origins may call (server.cors); neither: CORS is off."""

    origins: frozenset[str] = frozenset()  # normalised: scheme://host[:port], as browsers send them
    any_origin: bool = False  # "*"

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins


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
    quality: QualitySpec
    tiers: tuple[Tier, ...]  # every configured tier in config order, usable or not
    warnings: tuple[str, ...] = ()
    names: ModelNames = field(default_factory=ModelNames)  # what each `model` name means (names.py)
    # Client keys: with `auth_required` every /v1 and /proxy request needs one of `client_keys`.
    auth_required: bool = False
    client_keys: tuple[ClientKey, ...] = ()
    # Every tier key and client-key secret, to be removed from what upstreams send back.
    redactor: Redactor = field(default_factory=Redactor, repr=False, compare=False)
    cors: Cors = field(default_factory=Cors)
    state: StateSpec = field(default_factory=StateSpec)  # state.url: shared in Redis (proxy/state/)
    # The PostgreSQL ledger's password (`ledger.password_env`), never printed.
    ledger_password: str | None = field(default=None, repr=False, compare=False)

    def tier(self, tier_id: str) -> Tier:
        for t in self.tiers:
            if t.id == tier_id:
                return t
        raise KeyError(tier_id)

    @property
    def usable_tiers(self) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.usable)

    def model_names(self) -> Mapping[str, str]:
        """Every name of a usable tier (id, alias, upstream model id) -> the tier id: what pins
        it as `model` or X-Tier. `names.mapped` has the names routing.models adds."""
        return self.names.tier_names()

    @property
    def auto_model_names(self) -> frozenset[str]:
        return self.names.auto
