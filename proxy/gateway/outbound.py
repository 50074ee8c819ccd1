"""The client's request as each tier gets it: parsed once, serialised once per tier, with the
tier's model and key, and only the headers that are the upstream's business.

Client headers fall in three groups:
- the proxy's own and the connection's (below): never forwarded;
- headers meant for OpenAI or the SDKs' telemetry (`OpenAI-Organization`, `OpenAI-Project`,
  `x-stainless-*`: config's HELD_BACK_HEADERS): only to a tier that names them in
  `forward_headers`;
- everything else: to every tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.config import Tier, held_back
from proxy.gateway.quality import Check
from proxy.records import Api

# Sent upstream as the proxy's own; the client's values for these never cross.
_DROP_REQUEST_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host",
        "Content-Length",
        "Authorization",
        "Connection",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Authenticate",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Accept-Encoding",
        "Content-Encoding",
        "Cookie",
        "Expect",
        # What a browser adds: who the page is (an upstream with CORS of its own, like Ollama,
        # refuses an Origin it does not know with 403) and the Sec-* fetch metadata (below).
        "Origin",
        "Referer",
        "X-Replan",
        "X-Complexity",
        "X-Tier",
        "X-Fallback",
        "X-Request-Id",
        "X-Proxy-Check",
        "Api-Key",
        "X-Api-Key",
    )
)
_DROP_PREFIXES = ("sec-", "access-control-")


@dataclass(slots=True)
class Outbound:
    """The client's request, parsed once; each tier gets it with its own model and key."""

    payload: dict[str, Any]
    headers: dict[str, str]
    stream: bool
    strip_usage: bool  # usage was requested by the proxy, not the client
    request_bytes: int
    exact_numbers: bool = False  # serialise with the stdlib (integers beyond 64 bits)
    check: Check | None = None  # what the answer must be (the quality gate); None: not checked
    api: Api = Api.CHAT
    _bodies: dict[str, bytes] = field(default_factory=dict)
    _held: dict[str, str] = field(default_factory=dict)  # held-back headers, for tiers that opt in

    def __post_init__(self) -> None:
        held = [k for k in self.headers if held_back(k.lower())]
        for k in held:
            self._held[k] = self.headers.pop(k)

    def body_for(self, tier: Tier) -> bytes:
        """The body for `tier` (cached). Raises TypeError for what cannot be serialised, such as
        nesting deeper than orjson writes: callers serialise once before the first attempt."""
        body = self._bodies.get(tier.id)
        if body is None:
            self.payload["model"] = tier.model
            if self.exact_numbers:
                body = json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False).encode()
            else:
                body = orjson.dumps(self.payload)
            self._bodies[tier.id] = body
        return body

    def headers_for(self, tier: Tier) -> dict[str, str]:
        headers = dict(self.headers)
        if self._held and tier.forward_headers:
            headers.update((k, v) for k, v in self._held.items() if tier.forwards(k.lower()))
        headers["Content-Type"] = "application/json"
        if tier.api_key:
            headers["Authorization"] = f"Bearer {tier.api_key}"
        return headers


def forwardable_headers(headers: Any) -> dict[str, str]:
    """The client's headers that may cross to a tier (the held-back ones are set aside by Outbound)."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        low = k.lower()
        if low not in _DROP_REQUEST_HEADERS and not low.startswith(_DROP_PREFIXES):
            out[k] = v
    return out
