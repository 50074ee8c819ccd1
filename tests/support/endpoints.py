"""A hand-made set of calls to the four OpenAI endpoints, with the per-endpoint figures the
ledger and the reports should show worked out by hand (prices: kimi 0.60 in / 0.15 cached in /
2.50 out per million tokens, llama and ollama free).

| id      | endpoint         | when   | answered by          | outcome          | tokens p/cached/c | nano-$    |
|---------|------------------|--------|----------------------|------------------|-------------------|-----------|
| chat-1  | chat/completions | first  | llama                | ok               | 100 / 0 / 20      | 0         |
| chat-2  | chat/completions | first  | kimi                 | ok               | 1000 / 400 / 200  | 920,000   |
| chat-3  | chat/completions | second | -                    | error (502)      | -                 | 0         |
| chat-4  | chat/completions | late   | llama                | ok               | 7 / 0 / 3         | 0         |
| resp-1  | responses        | first  | ollama               | ok, streamed     | 300 / 0 / 50      | 0         |
| resp-2  | responses        | second | kimi                 | ok               | 500 / 0 / 100     | 550,000   |
| resp-3  | responses        | second | -                    | client_cancelled | -                 | 0         |
| comp-1  | completions      | first  | llama                | ok               | 40 / 0 / 10       | 0         |
| comp-2  | completions      | second | kimi (llama timeout) | ok               | 200 / 0 / 100     | 370,000   |
| emb-1   | embeddings       | first  | ollama               | ok               | 12 / 0 / 0        | 0         |
| emb-2   | embeddings       | second | kimi                 | ok               | 2000 / 0 / 0      | 1,200,000 |
| emb-old | embeddings       | old    | llama                | ok               | 5 / 0 / 0         | 0         |

kimi: chat-2 = 600 x 0.60 + 400 x 0.15 + 200 x 2.50 = 920 micro-dollars; resp-2 = 300 + 250;
comp-2 = 120 + 250; emb-2 = 2000 x 0.60. Every call lasts 200 ms.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from proxy.config import Config, build_config
from proxy.ledger.report import EndpointReport
from proxy.records import Api, AttemptOutcome, CallRecord, Outcome, Usage
from tests.support.quality import TIERS
from tests.support.records import attempt, call

ENDPOINT_OF = {
    "chat-1": "chat/completions",
    "chat-2": "chat/completions",
    "chat-3": "chat/completions",
    "chat-4": "chat/completions",
    "resp-1": "responses",
    "resp-2": "responses",
    "resp-3": "responses",
    "comp-1": "completions",
    "comp-2": "completions",
    "emb-1": "embeddings",
    "emb-2": "embeddings",
    "emb-old": "embeddings",
}


def endpoint_config(batch_size: int = 500) -> Config:
    return build_config({"tiers": TIERS, "ledger": {"batch_size": batch_size}}, "test", {})


def endpoint_calls(first: float, second: float, late: float, old: float) -> list[CallRecord]:
    """The table above; calls at the same time point are a second apart."""

    def ok(rid: str, tier: str, at: float, api: Api, usage: Usage, **kw: Any) -> CallRecord:
        return call(rid, tier, at=at, api=api, usage=usage, duration_ms=200.0, **kw)

    return [
        ok("chat-1", "llama", first, Api.CHAT, Usage(100, 20)),
        ok("chat-2", "kimi", first + 1, Api.CHAT, Usage(1000, 200, 400)),
        ok("resp-1", "ollama", first + 2, Api.RESPONSES, Usage(300, 50), stream=True, ttft_ms=40.0),
        ok("comp-1", "llama", first + 3, Api.COMPLETIONS, Usage(40, 10)),
        ok("emb-1", "ollama", first + 4, Api.EMBEDDINGS, Usage(12, 0)),
        call(
            "chat-3",
            None,
            at=second,
            api=Api.CHAT,
            status=502,
            outcome=Outcome.ERROR,
            error="every tier failed",
            duration_ms=200.0,
            attempts=[attempt(1, "llama", AttemptOutcome.CONNECT_ERROR, started_at=second, error="refused")],
        ),
        ok("resp-2", "kimi", second + 1, Api.RESPONSES, Usage(500, 100)),
        call(
            "resp-3",
            None,
            at=second + 2,
            api=Api.RESPONSES,
            status=499,
            outcome=Outcome.CLIENT_CANCELLED,
            duration_ms=200.0,
            attempts=[attempt(1, "kimi", AttemptOutcome.CANCELLED, started_at=second + 2)],
        ),
        ok(
            "comp-2",
            "kimi",
            second + 3,
            Api.COMPLETIONS,
            Usage(200, 100),
            attempts=[
                attempt(1, "llama", AttemptOutcome.TIMEOUT, started_at=second + 3, error="no answer within 1.0 s"),
                attempt(2, "kimi", started_at=second + 4, usage=Usage(200, 100)),
            ],
        ),
        ok("emb-2", "kimi", second + 5, Api.EMBEDDINGS, Usage(2000, 0)),
        ok("chat-4", "llama", late, Api.CHAT, Usage(7, 3)),
        ok("emb-old", "llama", old, Api.EMBEDDINGS, Usage(5, 0)),
    ]


def _e(endpoint: str, calls: int, errors: int, cancelled: int, tokens: tuple[int, ...], usd: str) -> EndpointReport:
    """tokens: (prompt, completion, cached)"""
    return EndpointReport(endpoint, calls, errors, cancelled, *tokens, Decimal(usd))


# first, second and late in the window; old outside it. Busiest first, then by name.
EXPECTED_WINDOW = (
    _e("chat/completions", 4, 1, 0, (1107, 223, 400), "0.00092"),
    _e("responses", 3, 0, 1, (800, 150, 0), "0.00055"),
    _e("completions", 2, 0, 0, (240, 110, 0), "0.00037"),
    _e("embeddings", 2, 0, 0, (2012, 0, 0), "0.0012"),
)
# everything: emb-old too, so embeddings (3) now ties responses and comes first by name
EXPECTED_ALL = (
    EXPECTED_WINDOW[0],
    _e("embeddings", 3, 0, 0, (2017, 0, 0), "0.0012"),
    EXPECTED_WINDOW[1],
    EXPECTED_WINDOW[2],
)
TOTAL_COST = Decimal("0.00304")
