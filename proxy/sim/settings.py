"""What a simulated upstream does: its settings, the per-request `Behaviour` (faults), and what
it saw (`SimStats`), each behind an AppKey so several simulated tiers can run in one process."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(slots=True)
class Behaviour:
    """What the upstream does for one request; the defaults give a fast, valid answer."""

    status: int = 200
    error_body: bytes | None = None
    retry_after: str | None = None
    headers_delay: float = 0.0
    first_event_delay: float = 0.0
    keepalive_interval: float | None = None
    chunk_delay: float = 0.0
    chunks: int = 8
    # Streams: content events sent before the connection is cut.  Non-stream: body bytes sent
    # (clamped so the body is always incomplete; 0 = headers only).
    drop_after: int | None = None
    malformed: bool = False
    not_completion: bool = False
    no_done: bool = False
    no_usage: bool = False
    stall: bool = False
    stall_after_headers: bool = False
    trickle: float | None = None
    content_type: str | None = None
    body_size: int | None = None
    # Hostile: the Authorization received, back in a header, the Content-Type, the error
    # message, the model and the content (a stream's every event); `location` is sent as is.
    echo_auth: bool = False
    location: str | None = None
    # The answer itself (sim/answers.py): this content, these tool calls as (name, arguments
    # JSON), this finish_reason; None: the canned prose (or a plan, with json_plans).
    content: str | None = None
    tool_calls: list[tuple[str, str]] | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if self.chunks < 0:
            raise ValueError("chunks must be >= 0")
        if self.drop_after is not None and self.drop_after < 0:
            raise ValueError("drop_after must be >= 0")
        if self.keepalive_interval is not None and self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be > 0")


@dataclass(slots=True)
class SimSettings:
    name: str = "sim"
    model: str | None = None  # None: echo the request's model
    default: Behaviour = field(default_factory=Behaviour)
    script: deque[Behaviour] = field(default_factory=deque)
    failure_rate: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    seed: int | None = None
    simulated_label: bool = False
    # Answers are JSON plans (sim/answers.PLAN_SCHEMA); this share of them bad, half prose around
    # the JSON and half JSON cut at max_tokens (finish_reason "length"). Either turns plans on.
    json_plans: bool = False
    bad_answer_rate: float = 0.0
    # The benchmark sends hundreds of thousands of requests; keeping every body would make
    # the simulator's memory, not the proxy, the thing being measured.
    record_requests: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.script, deque):
            # Accept a plain list for convenience; popleft() needs a deque.
            self.script = deque(self.script)
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if not 0.0 <= self.bad_answer_rate <= 1.0:
            raise ValueError("bad_answer_rate must be within [0, 1]")
        low, high = self.latency
        if low < 0 or high < low:
            raise ValueError("latency must be (low, high) with 0 <= low <= high")


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased: HTTP header names are case-insensitive
    body: bytes = b""
    json: Any = None  # None when the body is empty or not JSON


@dataclass(slots=True)
class SimStats:
    hits: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    active: int = 0
    cancelled: int = 0


SIM_SETTINGS = web.AppKey("sim_settings", SimSettings)
SIM_STATS = web.AppKey("sim_stats", SimStats)
