"""Passwords in the URLs of the config (`ledger.url`, `state.url`, a tier's `http_proxy`): found,
to be redacted like the keys wherever something echoes them, and taken out, for messages."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def url_password(url: str | None) -> str | None:
    """The password in a URL's user part (None without one)."""
    return None if url is None else urlsplit(url).password


def redact(url: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
