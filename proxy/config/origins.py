"""server.cors: the browser origins that may call, checked and written as browsers send them."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from proxy.config.resolved import Cors


def cors_policy(origins: Iterable[str], *, keys: bool) -> Cors:
    """The policy for these origins; ValueError says what is wrong with one. `keys`: client keys
    are configured (auth.keys), without which "*" is refused."""
    origins = list(origins)
    if "*" in origins:
        if len(origins) > 1:
            raise ValueError("'*' already allows every origin: list either '*' or exact origins")
        if not keys:
            raise ValueError(
                "'*' needs client keys (auth.keys): without them any web page that someone who can reach "
                "the proxy opens could call the tiers and spend the budget. List your apps' origins instead"
            )
        return Cors(any_origin=True)
    return Cors(origins=frozenset(origin(o) for o in origins))


def origin(value: str) -> str:
    """`value` as a browser's Origin header carries it: lower-case scheme and host, no default
    port, no trailing slash."""
    text = value.strip()
    if text.lower() == "null":
        raise ValueError(
            "'null' cannot be allowed: it is the origin of sandboxed frames and file:// pages, "
            "which any site can create"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        parts, port, host = urlsplit(""), None, ""
    if not parts.scheme or not host or "*" in host or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"{value!r} is not an origin: write scheme://host[:port] as the browser's address bar shows it, "
            "e.g. https://app.example.com or http://localhost:5173 (no path, no wildcard)"
        )
    if parts.username is not None:
        raise ValueError(f"{value!r}: an origin has no user name or password")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
