"""The ledger's storage interface: what the writer, the budgets and the spill import need of an engine.

An engine (SQLite in `sqlite.py`; others can sit beside it) turns its own exceptions into the
two below, so the writer decides between retry, spill and drop without knowing the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from proxy.ledger.rows import LedgerEntry


class StoreError(Exception):
    """The store cannot be written or read right now (locked, read-only, disk full, gone):
    the same rows may succeed later, so retry, then spill."""


class StoreUnusable(StoreError):
    """The store is there but cannot be used at all (not a database, corrupt, no permission):
    retrying will not help, a person has to act. `proxy serve` refuses to start over it."""


class RowsRejected(StoreError):
    """The store refused the rows themselves (a constraint): the same rows fail again, so
    they are written one by one and the bad one dropped."""


class Store(Protocol):
    """One ledger database."""

    @property
    def location(self) -> str:
        """Where the rows go, for messages (a path or a URL without its password)."""
        ...

    @property
    def spill_path(self) -> Path:
        """The local JSON-lines file where rows wait while the store cannot take them."""
        ...

    async def open(self) -> None:
        """Open (creating and migrating as needed). Raises StoreError."""

    async def write(self, entries: Sequence[LedgerEntry], *, keep_duplicates: bool = True) -> int:
        """Insert the entries and their rollups in one transaction; returns the requests
        inserted. A request id already stored is renamed (live writes, `keep_duplicates`) or
        skipped (imports, where a known id means the row was imported already)."""
        ...

    async def spend_since(self, day: str) -> Decimal:
        """Spend of every request started on or after `day` (YYYY-MM-DD, UTC)."""
        ...

    async def client_spend_since(self, day: str) -> dict[str, Decimal]:
        """Spend per client key since `day`."""
        ...

    async def close(self) -> None: ...
