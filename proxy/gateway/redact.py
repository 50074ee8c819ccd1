"""The configured secrets, and their removal from whatever an upstream sends back.

An upstream that quotes the `Authorization` it received (many 401 bodies do) would otherwise
put a tier's key into client answers, logs, the ledger and the 502 message listing attempts.
Every answer passes through `Redactor.clean` or `Redactor.clean_text`, so the common case costs one
substring search per secret and no copy; a copy is made only when a secret is found.

Secrets shorter than `MIN_SECRET_CHARS` (Ollama's placeholder key "ollama", say) are removed
only in the form the proxy sends them, `Bearer <secret>`: replacing a short word everywhere
would corrupt answers that merely contain it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

MIN_SECRET_CHARS = 8
REDACTED = "[redacted]"
_REDACTED = REDACTED.encode()
# A short secret followed by one of these is a longer token, not it. Punctuation ends it: in
# "Bearer ollama." the period is prose, and cutting "Bearer abc+def" early reveals nothing.
_TOKEN_CHARS = rb"A-Za-z0-9_-"


class Redactor:
    """Removes every configured secret. Immutable; its repr never shows a secret."""

    __slots__ = ("_long", "_short", "count")

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        unique = {s for s in secrets if s}
        long: set[bytes] = set()
        short: list[tuple[bytes, re.Pattern[bytes]]] = []
        for secret in unique:
            if len(secret) >= MIN_SECRET_CHARS:
                long.update(_forms(secret))
            else:
                raw = secret.encode()
                pattern = re.compile(rb"\b(?i:bearer)\s+" + re.escape(raw) + rb"(?![" + _TOKEN_CHARS + rb"])")
                short.append((raw, pattern))
        # Longest first, so a secret that contains another is removed whole.
        self._long: tuple[bytes, ...] = tuple(sorted(long, key=len, reverse=True))
        self._short: tuple[tuple[bytes, re.Pattern[bytes]], ...] = tuple(short)
        self.count = len(unique)

    def __repr__(self) -> str:
        return f"Redactor({self.count} secret(s))"

    def __bool__(self) -> bool:
        return bool(self.count)

    def clean(self, data: bytes) -> bytes:
        """`data` without any secret; the same object when none was in it."""
        for secret in self._long:
            if data.find(secret) >= 0:
                data = data.replace(secret, _REDACTED)
        for raw, pattern in self._short:
            if data.find(raw) >= 0:  # the regex only where the short secret occurs at all
                data = pattern.sub(b"Bearer " + _REDACTED, data)
        return data

    def clean_buffer(self, data: bytearray) -> bytes | bytearray:
        """A body read into one buffer: that buffer, uncopied, when no secret is in it."""
        if any(data.find(s) >= 0 for s in self._long) or any(data.find(raw) >= 0 for raw, _ in self._short):
            return self.clean(bytes(data))
        return data

    def clean_text(self, text: str) -> str:
        if not self.count:
            return text
        data = text.encode("utf-8", "surrogatepass")
        clean = self.clean(data)
        return text if clean is data else clean.decode("utf-8", "surrogatepass")

    def clean_optional(self, text: str | None) -> str | None:
        return None if text is None else self.clean_text(text)


def _forms(secret: str) -> set[bytes]:
    """The secret as sent, and as a JSON string would carry it (escaped quotes and backslashes,
    `\\/` for `/` as some servers write it), so an echo inside a JSON body is found too."""
    raw = secret.encode()
    escaped = json.dumps(secret)[1:-1]
    return {raw, escaped.encode(), escaped.replace("/", "\\/").encode()}
