"""What one client request leaves behind: the record handed to the ledger.

The request path fills these in and hands one `CallRecord` per client request to a
`RecordSink` without waiting; the ledger (or anything else) consumes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class AttemptOutcome(enum.StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    HTTP_ERROR = "http_error"
    BAD_RESPONSE = "bad_response"
    INVALID_OUTPUT = "invalid_output"  # a well-formed answer that failed the quality gate
    CANCELLED = "cancelled"


class Outcome(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    CLIENT_CANCELLED = "client_cancelled"


class Route(enum.StrEnum):
    DEFAULT = "default"
    MINOR_REPLAN = "minor_replan"
    COMPLEX = "complex"
    PINNED = "pinned"
    ESCALATED = "escalated"
    BUDGET = "budget"


class CheckResult(enum.StrEnum):
    """What the quality gate said of the answer the client got (None: nothing was checked)."""

    PASSED = "passed"
    FAILED = "failed"


class Escalation(enum.StrEnum):
    """Why a call escalated: the primary's breaker opened mostly on bad answers, or on errors."""

    BAD_ANSWERS = "bad_answers"
    FAILURES = "failures"


class UsageSource(enum.StrEnum):
    UPSTREAM = "upstream"
    ESTIMATED = "estimated"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    source: UsageSource = UsageSource.UPSTREAM


@dataclass(slots=True)
class AttemptRecord:
    n: int  # 1-based position within the request
    tier: str
    model: str  # upstream model id sent
    started_at: float  # unix seconds
    duration_ms: float = 0.0
    ttft_ms: float | None = None  # streams: time to the first data event
    http_status: int | None = None
    outcome: AttemptOutcome = AttemptOutcome.OK
    error: str | None = None
    usage: Usage | None = None
    checked: bool = False  # the answer was judged by the quality gate (ok or invalid_output)

    def fail(self, outcome: AttemptOutcome, error: str) -> None:
        self.outcome = outcome
        self.error = error


@dataclass(slots=True)
class CallRecord:
    request_id: str
    started_at: float  # unix seconds
    route: Route
    chain: tuple[str, ...]
    stream: bool
    requested_model: str | None
    client: str | None = None  # name of the client key, never the secret
    duration_ms: float = 0.0
    tier: str | None = None  # the tier that answered
    model: str | None = None  # the upstream model that answered
    status: int = 0  # HTTP status sent to the client
    outcome: Outcome = Outcome.OK
    ttft_ms: float | None = None
    usage: Usage | None = None
    error: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    check: CheckResult | None = None
    escalated_for: Escalation | None = None  # set with route = escalated
    # Only filled when the ledger is configured to keep text (off by default).
    request_body: bytes | None = None
    response_body: bytes | None = None


class RecordSink(Protocol):
    """Takes finished records. `submit` must never block or raise."""

    def submit(self, record: CallRecord) -> None: ...
