"""Finished calls as the proxy records them, for tests that feed the ledger, metrics, logs or
budgets without running a request. Every CallRecord / AttemptRecord field can be overridden."""

from __future__ import annotations

from typing import Any

from proxy.records import AttemptOutcome, AttemptRecord, CallRecord, Route

CHAIN = ("llama", "ollama", "kimi")


def attempt(
    n: int, tier: str, outcome: AttemptOutcome = AttemptOutcome.OK, *, started_at: float, **kw: Any
) -> AttemptRecord:
    """Attempt `n` on `tier`, sent as model `<tier>-model` unless `model=` says otherwise."""
    kw.setdefault("model", f"{tier}-model")
    return AttemptRecord(n=n, tier=tier, started_at=started_at, outcome=outcome, **kw)


def call(rid: str, tier: str | None = "llama", *, at: float, **kw: Any) -> CallRecord:
    """A non-streamed `auto` call over llama -> ollama -> kimi, answered 200 by `tier` (None: by
    no tier) as `<tier>-model`, in one attempt (on llama when `tier` is None) that carries the
    call's `usage`, unless `attempts=` says otherwise."""
    kw.setdefault("attempts", [attempt(1, tier or "llama", started_at=at, usage=kw.get("usage"))])
    fields: dict[str, Any] = {
        "route": Route.DEFAULT,
        "chain": CHAIN,
        "stream": False,
        "requested_model": "auto",
        "model": None if tier is None else f"{tier}-model",
        "status": 200,
        **kw,
    }
    return CallRecord(request_id=rid, started_at=at, tier=tier, **fields)
