"""Where one tier's attempts go: the shared session, the tier's connection cap, its TLS and
proxy settings, the response size limit and the redactor; built once per tier, not per request."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiohttp

from proxy.config import Tier
from proxy.gateway.outbound import Outbound
from proxy.gateway.redact import Redactor


@dataclass(frozen=True, slots=True)
class Target:
    """Where one tier's attempts go; built once per tier, not per request."""

    session: aiohttp.ClientSession
    tier: Tier
    max_response_bytes: int
    gate: asyncio.Semaphore  # the tier's max concurrent connections; waiting counts against the timeout
    # The attempt's own asyncio.timeout bounds the whole wait; only connecting is bounded here.
    client_timeout: aiohttp.ClientTimeout
    redactor: Redactor  # every configured secret, removed from all the upstream sends back
    tls: ssl.SSLContext | bool  # True: the system's CAs; a context for ca_bundle; False: unchecked

    @classmethod
    def build(
        cls,
        session: aiohttp.ClientSession,
        tier: Tier,
        max_response_bytes: int,
        old: Target | None = None,
        *,
        redactor: Redactor,
    ) -> Target:
        """With `old` (the same tier before a reload), its gate carries over while the cap is
        unchanged, so the calls still running keep counting against the new target's cap."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=tier.connect_timeout)
        if old is not None and old.tier.max_connections == tier.max_connections:
            gate = old.gate
        else:
            gate = asyncio.Semaphore(tier.max_connections)
        return cls(session, tier, max_response_bytes, gate, timeout, redactor, _tls(tier))

    def post(self, out: Outbound) -> aiohttp.client._RequestContextManager:
        tier = self.tier
        # Never follow a redirect: on 307/308 aiohttp would re-send the prompt (and the key's
        # request) to whatever host the upstream names, and bill its answer as this tier's.
        return self.session.post(
            tier.url(out.api),
            data=out.body_for(tier),
            headers=out.headers_for(tier),
            timeout=self.client_timeout,
            allow_redirects=False,
            ssl=self.tls,
            proxy=tier.transport.http_proxy,
        )


def _tls(tier: Tier) -> ssl.SSLContext | bool:
    """Built once per tier: loading a CA file per request would cost milliseconds."""
    transport = tier.transport
    if not transport.verify_tls:
        return False
    if transport.ca_bundle is not None:
        return ssl.create_default_context(cafile=transport.ca_bundle)
    return True
