"""A request's ledger rows: the row shapes, their exact costs, and the JSON they spill as."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from proxy.config import Config, Price
from proxy.ledger.pricing import (
    FREE,
    attempt_cost_usd,
    baseline_cost_usd,
    baseline_price,
    cost_usd,
    nano_to_float,
    to_nano,
)
from proxy.records import Api, AttemptOutcome, AttemptRecord, CallRecord, Usage, UsageSource

log = logging.getLogger("proxy.ledger")

SPILL_VERSION = 1
_LATENCY_GROWTH = 1.05
LOG_GROWTH = math.log(_LATENCY_GROWTH)  # public: pg_rebuild.py computes the buckets in SQL with them
MAX_LATENCY_MS = 1e9  # keeps log() finite for absurd or infinite durations


class RequestRow(NamedTuple):
    """One row of `requests`, in column order (a tuple, so executemany takes it as is)."""

    id: str
    started_at: str
    duration_ms: float
    route: str
    stream: int
    requested_model: str | None
    tier: str | None
    paid: int | None
    model: str | None
    status: int
    outcome: str
    attempts: int
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    usage_source: str
    cost_usd: float
    baseline_cost_usd: float
    cost_nano_usd: int
    baseline_nano_usd: int
    client: str | None
    error: str | None
    request_text: str | None
    response_text: str | None
    # Added by migration 0002 (the quality gate). Defaults, so spill and journal lines written
    # before it still read: those calls were not checked.
    check_result: str | None = None  # 'passed', 'failed'; None: not checked
    escalated_for: str | None = None  # 'bad_answers', 'failures'; with route = 'escalated'
    # Added by migration 0003: the endpoint under /v1 (`Api`). Lines from before it were all chat.
    endpoint: str = Api.CHAT.value


class AttemptRow(NamedTuple):
    request_id: str
    n: int
    tier: str
    model: str
    started_at: str
    duration_ms: float
    ttft_ms: float | None
    http_status: int | None
    outcome: str
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    cost_usd: float
    cost_nano_usd: int
    checked: int = 0  # 1: the answer was judged by the quality gate (outcome ok or invalid_output)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One client request ready to write: its `requests` row and its `attempts` rows."""

    request: RequestRow
    attempts: tuple[AttemptRow, ...]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": SPILL_VERSION,
                "request": self.request._asdict(),
                "attempts": [a._asdict() for a in self.attempts],
            }
        )

    @classmethod
    def from_json(cls, line: bytes) -> LedgerEntry:
        """Raises ValueError for anything that is not a spill line of this format (columns added
        since version 1 have defaults, so lines written before them still read)."""
        try:
            obj = orjson.loads(line)
            if obj.get("v") != SPILL_VERSION:
                raise ValueError(f"unknown spill line version {obj.get('v')!r}")
            return cls(RequestRow(**obj["request"]), tuple(AttemptRow(**a) for a in obj["attempts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a ledger spill line: {e}") from e


def placeholders(fields: Sequence[str]) -> str:
    return ", ".join("?" for _ in fields)


INSERT_REQUEST = f"INSERT INTO requests ({', '.join(RequestRow._fields)}) VALUES ({placeholders(RequestRow._fields)})"
INSERT_ATTEMPT = f"INSERT INTO attempts ({', '.join(AttemptRow._fields)}) VALUES ({placeholders(AttemptRow._fields)})"


def iso_utc(ts: float) -> str:
    """Unix seconds -> 2026-11-26T15:04:05.123Z (fixed width, so text order is time order)."""
    sec, milli = divmod(math.floor(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{milli:03d}Z"


def latency_bucket(ms: float) -> int:
    """Histogram bucket for a latency: 0 holds <= 1 ms, then buckets 5% wide."""
    if not ms > 1.0:  # also catches NaN
        return 0
    return 1 + int(math.log(min(ms, MAX_LATENCY_MS)) / LOG_GROWTH)


def bucket_ms(bucket: int) -> float:
    """A representative latency for a bucket: its geometric middle (within 2.5% of any member)."""
    if bucket <= 0:
        return 0.5
    return float(_LATENCY_GROWTH ** (bucket - 0.5))


def _usage_columns(usage: Usage | None) -> tuple[int | None, int | None, int | None, str]:
    if usage is None:
        return None, None, None, UsageSource.NONE.value
    if usage.source == UsageSource.NONE:
        return None, None, None, str(usage.source)
    return usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, str(usage.source)


def _text(body: bytes | None) -> str | None:
    return None if body is None else body.decode("utf-8", errors="replace")


class Pricer:
    """Turns a CallRecord into rows with exact costs, using the config's tier prices."""

    def __init__(self, config: Config) -> None:
        self._prices = {t.id: t.price for t in config.tiers}
        self._paid = {t.id: t.paid for t in config.tiers}
        self._baseline = baseline_price(config)
        self._store_text = config.ledger.store_text
        self._unknown: set[str] = set()

    def price(self, tier: str) -> Price:
        price = self._prices.get(tier)
        if price is None:
            # A record can name a tier that a config reload removed; it is not worth a crash.
            if tier not in self._unknown:
                self._unknown.add(tier)
                log.warning("ledger: tier %r is not in the config; its calls are recorded at cost 0", tier)
            return FREE
        return price

    def entry(self, rec: CallRecord) -> LedgerEntry:
        attempts = _unique_attempts(rec)
        attempt_nanos = [to_nano(attempt_cost_usd(a, self.price(a.tier))) for a in attempts]
        cost, baseline = self._request_costs(rec, attempts, attempt_nanos)
        return LedgerEntry(
            self._request_row(rec, len(attempts), cost, baseline),
            tuple(_attempt_row(rec.request_id, a, n) for a, n in zip(attempts, attempt_nanos, strict=True)),
        )

    def _request_costs(
        self, rec: CallRecord, attempts: Sequence[AttemptRecord], attempt_nanos: Sequence[int]
    ) -> tuple[int, int]:
        """(cost, baseline) in nano-dollars.

        The answer (the answering tier's last attempt: also a stream cut or abandoned midway,
        or the last bad answer when no tier gave a good one, which later attempts may follow)
        is priced from the record's own usage; the other attempts add whatever they were billed,
        so the request row carries everything this request cost, each attempt once.
        """
        if rec.tier is None:
            return sum(attempt_nanos), 0
        answer_at = next((i for i in range(len(attempts) - 1, -1, -1) if attempts[i].tier == rec.tier), None)
        others = sum(n for i, n in enumerate(attempt_nanos) if i != answer_at)
        answer = to_nano(cost_usd(rec.usage, self.price(rec.tier)))
        return answer + others, to_nano(baseline_cost_usd(rec.usage, self._baseline))

    def _request_row(self, rec: CallRecord, n_attempts: int, cost: int, baseline: int) -> RequestRow:
        prompt, completion, cached, source = _usage_columns(rec.usage)
        keep = self._store_text
        return RequestRow(
            id=rec.request_id,
            started_at=iso_utc(rec.started_at),
            duration_ms=float(rec.duration_ms),
            route=str(rec.route),
            stream=1 if rec.stream else 0,
            requested_model=rec.requested_model,
            tier=rec.tier,
            paid=None if rec.tier is None else int(self._paid.get(rec.tier, False)),
            model=rec.model,
            status=int(rec.status),
            outcome=str(rec.outcome),
            attempts=n_attempts,
            ttft_ms=rec.ttft_ms,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            usage_source=source,
            cost_usd=nano_to_float(cost),
            baseline_cost_usd=nano_to_float(baseline),
            cost_nano_usd=cost,
            baseline_nano_usd=baseline,
            client=rec.client,
            error=rec.error,
            request_text=_text(rec.request_body) if keep else None,
            response_text=_text(rec.response_body) if keep else None,
            check_result=None if rec.check is None else str(rec.check),
            escalated_for=None if rec.escalated_for is None else str(rec.escalated_for),
            endpoint=str(rec.api),
        )


def _unique_attempts(rec: CallRecord) -> list[AttemptRecord]:
    """Attempts with distinct `n`: a duplicate would break the primary key and, with it,
    every retry of the batch, so it is dropped here with a warning instead."""
    seen: set[int] = set()
    out: list[AttemptRecord] = []
    for a in rec.attempts:
        if a.n in seen:
            log.warning("ledger: request %s has two attempts numbered %d; keeping the first", rec.request_id, a.n)
            continue
        seen.add(a.n)
        out.append(a)
    return out


def _attempt_row(request_id: str, a: AttemptRecord, nano: int) -> AttemptRow:
    prompt, completion, cached, _ = _usage_columns(a.usage)
    return AttemptRow(
        request_id=request_id,
        n=a.n,
        tier=a.tier,
        model=a.model,
        started_at=iso_utc(a.started_at),
        duration_ms=float(a.duration_ms),
        ttft_ms=a.ttft_ms,
        http_status=a.http_status,
        outcome=str(a.outcome),
        error=a.error,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cost_usd=nano_to_float(nano),
        cost_nano_usd=nano,
        # A bad answer was judged by definition, whatever the request path set.
        checked=int(a.checked or a.outcome == AttemptOutcome.INVALID_OUTPUT),
    )


def renamed(entry: LedgerEntry) -> LedgerEntry:
    """The entry under a fresh id `<id>~<12 hex>`: its id was stored already (a reused X-Request-Id)."""
    new_id = f"{entry.request.id}~{uuid.uuid4().hex[:12]}"
    log.warning("ledger: request id %s was already recorded; storing this one as %s", entry.request.id, new_id)
    return LedgerEntry(entry.request._replace(id=new_id), tuple(a._replace(request_id=new_id) for a in entry.attempts))


def without_taken(entries: Sequence[LedgerEntry], taken: set[str], *, keep_duplicates: bool) -> list[LedgerEntry]:
    """`entries` with no id in `taken` or twice: live writes keep a reused request id under a new
    id (a client may reuse X-Request-Id); imports drop it, because there a known id means the row
    was already imported. `taken` gains the ids kept."""
    out: list[LedgerEntry] = []
    for e in entries:
        if e.request.id in taken:
            if not keep_duplicates:
                continue
            e = renamed(e)
        taken.add(e.request.id)
        out.append(e)
    return out
