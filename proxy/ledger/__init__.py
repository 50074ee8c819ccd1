"""The cost ledger: every request and attempt with its tokens and exact cost, and what is read
back from it (reports, budgets).

- `writer.py`: `Ledger`, the queue and the one background task that writes batches
- `rows.py`: a CallRecord as rows, priced (`pricing.py`: exact money)
- `store.py`: the storage interface; `sqlite.py`: the SQLite engine; `migrations.py`: its schema;
  `rollups.py`: its daily rollup tables (`by_endpoint.py`: the one per endpoint, and its part of the report)
- `postgres.py`: the PostgreSQL engine (`pg_migrations.py`, `pg_sql.py`); `engine.py`: which one a
  target names, and `rebuild_rollups` for either; `copy.py`: `proxy ledger copy`, a SQLite ledger into PostgreSQL
- `spill.py`: the spill file for when the store cannot be written, and `proxy ledger import`
- `budget.py`: the paid-spend budgets counted from the ledger
- `report.py`, `report_read.py`, `report_text.py`: the cost report, read from the rollups, printed
"""

from proxy.ledger.engine import rebuild_rollups
from proxy.ledger.rows import LedgerEntry, Pricer, iso_utc
from proxy.ledger.sqlite import SqliteStore, open_db, spill_path
from proxy.ledger.store import RowsRejected, Store, StoreError
from proxy.ledger.writer import CostListener, Ledger, LedgerStats

__all__ = [
    "CostListener",
    "Ledger",
    "LedgerEntry",
    "LedgerStats",
    "Pricer",
    "RowsRejected",
    "SqliteStore",
    "Store",
    "StoreError",
    "iso_utc",
    "open_db",
    "rebuild_rollups",
    "spill_path",
]
