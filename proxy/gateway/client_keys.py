"""Who is calling: client keys, and each key's request rate and daily spend limits."""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from proxy.config import ClientKey, Config
from proxy.errors import RateLimited, Unauthorized

_ZERO = Decimal(0)


class ClientSpendSource(Protocol):
    async def client_spend_since(self, day: str) -> dict[str, Decimal]: ...


def authenticate(config: Config, authorization: str | None) -> ClientKey | None:
    """The key presented in `Authorization: Bearer ...`; None when no keys are configured."""
    if not config.auth_required:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>' with a key configured in auth.keys.",
            code="missing_api_key",
        )
    # aiohttp decodes header bytes with surrogateescape: encode them back the same way.
    digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    for key in config.client_keys:
        if hmac.compare_digest(key.digest, digest):
            return key
    raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(slots=True)
class _Spend:
    day: str
    spent: Decimal = _ZERO


@dataclass(slots=True)
class ClientLimits:
    """Per-key requests per minute (token bucket) and spend per UTC day."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)
    spend: dict[str, _Spend] = field(default_factory=dict)
    reserved: dict[str, Decimal] = field(default_factory=dict)  # worst case of each key's paid calls in flight
    # While shared state (proxy/state/) is lost: this process's share of each key's rate and of
    # what is left of its daily cap; 1.0 otherwise.
    share: float = 1.0

    def admit(self, key: ClientKey | None, now: float) -> None:
        """Take one request from the key's bucket, or raise 429 saying when to come back."""
        if key is None or key.requests_per_minute is None:
            return
        cap = key.requests_per_minute * self.share
        rate = cap / 60.0
        bucket = self.buckets.get(key.name)
        if bucket is None:
            bucket = self.buckets[key.name] = _Bucket(cap, now)
        bucket.tokens = min(cap, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            raise rate_limited(key, math.ceil((1.0 - bucket.tokens) / rate))
        bucket.tokens -= 1.0

    def mirror(self, client: str, spent: Decimal, at: float) -> None:
        """The key's spend today as every process recorded it (shared state)."""
        self._current(client, at).spent = spent

    def adopt_share(self, known: dict[str, Decimal], caps: dict[str, Decimal], share: float, at: float) -> None:
        """Shared state lost: each key's spend + holds as last known, plus the part of what was
        left that other processes may spend (so this one gets `share` of it)."""
        self.share = share
        for client, used in known.items():
            cap = caps.get(client)
            left = max(cap - used, _ZERO) if cap is not None else _ZERO
            self._current(client, at).spent = used + left * (1 - Decimal(str(share)))
        self.reserved.clear()

    def check_spend(self, key: ClientKey | None, now: float) -> None:
        if key is None or key.daily_usd is None:
            return
        if self._current(key.name, now).spent >= key.daily_usd:
            raise self.exhausted(key, now)

    def reserve(self, key: ClientKey | None, amount: Decimal, at: float) -> bool:
        """Hold `amount` of the key's daily cap for an attempt about to be sent, unless today's
        spend and what is already held use the cap up (the last call may pass it by its own
        cost, as the budgets do); False holds nothing."""
        if key is None or key.daily_usd is None:
            return True
        held = self.reserved.get(key.name, _ZERO)
        if self._current(key.name, at).spent + held >= key.daily_usd:
            return False
        self.reserved[key.name] = held + amount
        return True

    def release(self, key: ClientKey | None, amount: Decimal) -> None:
        if key is None or key.daily_usd is None:
            return
        left = self.reserved.get(key.name, _ZERO) - amount
        if left > _ZERO:
            self.reserved[key.name] = left
        else:
            self.reserved.pop(key.name, None)

    def exhausted(self, key: ClientKey, now: float) -> RateLimited:
        """The answer to a key whose daily cap is spent (or fully held by its calls in flight)."""
        spent = self._current(key.name, now).spent
        held = self.reserved.get(key.name, _ZERO)
        in_flight = f" and ${held:.6f} held by calls in flight" if held else ""
        wait = _seconds_to_midnight(now)
        return RateLimited(
            f"Client {key.name!r} has spent its daily budget of ${key.daily_usd} (${spent:.6f}{in_flight}); "
            f"it resets at 00:00 UTC, in {wait} s.",
            code="daily_budget_exhausted",
            headers={"Retry-After": str(wait)},
        )

    def record(self, client: str | None, cost: Decimal, at: float) -> None:
        if client is not None and cost:
            self._current(client, at).spent += cost

    async def load(self, source: ClientSpendSource, now: float) -> None:
        """Today's spend per client from the ledger, so a restart does not reset the caps."""
        day = _day(now)
        for client, spent in (await source.client_spend_since(day)).items():
            self.spend[client] = _Spend(day, spent)

    def _current(self, client: str, at: float) -> _Spend:
        day = _day(at)
        entry = self.spend.get(client)
        if entry is None or entry.day != day:
            entry = self.spend[client] = _Spend(day)
        return entry


def rate_limited(key: ClientKey, wait: int) -> RateLimited:
    return RateLimited(
        f"Rate limit for client {key.name!r} reached: {key.requests_per_minute} requests per minute. "
        f"Retry after {wait} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(wait)},
    )


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).date().isoformat()


def _seconds_to_midnight(now: float) -> int:
    today = datetime.fromtimestamp(now, UTC).date()
    midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    return max(int(midnight.timestamp() - now) + 1, 1)
