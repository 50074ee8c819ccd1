"""What the ledger does before its writer starts (Ledger.start): open the store, retrying one
that is busy or locked; replay the journal an unclean stop left; import a spill file."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from proxy.ledger.replay import replay
from proxy.ledger.spill import import_spill
from proxy.ledger.store import Store, StoreError, StoreUnusable

log = logging.getLogger("proxy.ledger")


async def open_store(store: Store, retry_delays: Sequence[float]) -> None:
    """Open (and migrate) the store: a busy or locked one is retried after each delay, one that
    no retry fixes (StoreUnusable) is not. Raises StoreError."""
    for delay in retry_delays:
        try:
            await store.open()
            return
        except StoreUnusable:
            raise
        except StoreError as e:
            log.warning("ledger: cannot open %s yet: %s; retrying in %g s", store.location, e, delay)
            await asyncio.sleep(delay)
    await store.open()


async def replay_at_start(store: Store, journal_path: Path, batch_size: int, *, required: bool) -> int:
    """Requests recovered from the journal. With `required` (`proxy serve`) a journal that cannot
    be replayed raises StoreError: its calls' spend is not in the store, so budgets would count
    too little; else it is logged and kept for the next start."""
    try:
        result = await replay(store, journal_path, batch_size=batch_size)
    except (StoreError, OSError) as e:
        if required:
            raise StoreError(f"cannot replay the journal {journal_path}.*: {e}") from e
        log.error("ledger: cannot replay the journal %s.* yet: %s; kept for the next start", journal_path, e)
        return 0
    return result.replayed


async def import_at_start(store: Store, batch_size: int) -> int:
    """Requests imported from the store's spill file (left when it could not be written)."""
    try:
        result = await import_spill(store, batch_size=batch_size)
    except (StoreError, OSError) as e:
        log.error("ledger: cannot import spill file %s yet: %s", store.spill_path, e)
        return 0
    return result.imported
