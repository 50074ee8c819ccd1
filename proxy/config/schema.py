"""What proxy.yaml may say: the msgspec structs it is decoded into, strictly.

Unknown keys and wrong types are errors that name the key (see `load.py`). These are the
file's shapes; `resolved.py` has the frozen types the rest of the proxy reads.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec

Positive = Annotated[float, msgspec.Meta(gt=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Money = Decimal


# Client headers meant for OpenAI itself or the SDKs' telemetry: held back from every tier unless
# the tier names them in `forward_headers` (`x-stainless-*`: every header of that family).
HELD_BACK_HEADERS = ("OpenAI-Organization", "OpenAI-Project", "x-stainless-*")


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class PriceSpec(Strict, frozen=True):
    """USD prices; per million tokens, or flat per call when the upstream reports no usage."""

    input_per_mtok: Money = Decimal(0)
    cached_input_per_mtok: Money | None = None  # defaults to the input price
    output_per_mtok: Money = Decimal(0)
    per_call_usd: Money | None = None


class TierSpec(Strict, frozen=True):
    base_url: str
    model: str
    api_key_env: str | None = None
    paid: bool = False
    enabled: bool = True
    aliases: list[str] = []
    timeout_seconds: Positive = 30.0
    stream_idle_timeout_seconds: Positive = 30.0
    # Optional cap on a whole stream after its first event (time spent waiting for a slow
    # client does not count); None: a stream may last as long as its events keep coming.
    stream_max_seconds: Positive | None = None
    connect_timeout_seconds: Positive = 5.0
    max_connections: AtLeastOne = 256
    price: PriceSpec = PriceSpec()
    # How the tier is reached: a private CA's PEM file for its HTTPS certificate, no certificate
    # check at all (warned about: anyone on the path can read the key), an HTTP(S) proxy.
    ca_bundle: str | None = None
    verify_tls: bool = True
    http_proxy: str | None = None
    # The OpenAI endpoints the tier serves (under its base_url); a request to another endpoint
    # leaves the tier out of its chain. None: all of them.
    endpoints: list[Literal["chat/completions", "responses", "completions", "embeddings"]] | None = None
    # Held-back client headers this tier does get (names from HELD_BACK_HEADERS, e.g. OpenAI-Project).
    forward_headers: list[str] = []


class RoutingSpec(Strict, frozen=True):
    primary: str = "llama"
    default_model: str = "auto"
    use_llama_for_minor_replans: bool = True
    escalate_after_failures: AtLeastOne = 3
    breaker_cooldown_seconds: Positive = 30.0
    recovery_threshold: AtLeastOne = 1
    # A request that tried two tiers or more and saw each fail (not just rate limit) opens their
    # breakers at once: one chain walk finds an outage; then 503 at once until the probes.
    open_breakers_on_outage: bool = True
    # Model names besides the tiers' ids, aliases and upstream model ids (config/names.py):
    # a client's name -> "auto" or a tier (id, alias or upstream model id).
    models: dict[str, str] = {}
    # A `model` that is none of these: "refuse" (404 model_not_found, catching typos) or "auto".
    unknown_model: Literal["refuse", "auto"] = "refuse"


class RetrySpec(Strict, frozen=True):
    max_fallback_retries: AtLeastOne = 2  # attempts per tier
    max_total_retries: AtLeastOne = 5  # attempts per request
    # A paid tier gets one attempt per request; "when_asked": a second only when it answered
    # 429/503 with a Retry-After that fits the deadline; "always": retried like a free tier.
    paid_retries: Literal["when_asked", "always"] = "when_asked"
    backoff_initial_seconds: Positive = 0.1
    backoff_max_seconds: Positive = 2.0
    request_deadline_seconds: Positive = 120.0


class ServerSpec(Strict, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: AtLeastOne = 8 * 1024 * 1024
    max_response_bytes: AtLeastOne = 64 * 1024 * 1024
    shutdown_timeout_seconds: Positive = 30.0
    body_read_timeout_seconds: Positive = 30.0  # a client must send its whole body within this
    # A connection must send a complete request head within this of opening or of its previous
    # response, else it is closed: idle keep-alive connections and slowloris clients alike.
    idle_timeout_seconds: Positive = 30.0
    # A streaming client must accept each write within this, else it is cut: the call is recorded as
    # client_cancelled and the tier's attempt as cancelled, never as the tier's failure.
    client_write_timeout_seconds: Positive = 30.0
    # With auth.keys configured, /metrics needs a valid key unless this is true (a scraper on a
    # trusted network without credentials); without keys /metrics is open either way.
    public_metrics: bool = False
    # Client connections held at once; one more gets a 503 and is closed, so the descriptors left
    # stay free for upstream connections and the ledger (see the open-files limit in deploy/).
    max_connections: AtLeastOne = 10_000
    # Browser origins (scheme://host[:port]) whose pages may call the proxy; empty: CORS off. "*"
    # (any origin) only with auth.keys, so that a key is still what lets a page in.
    cors: list[str] = []
    # `proxy serve --workers N`: "auto" pins worker i to the i-th CPU when the N workers are as many
    # as the CPUs the proxy may use (a machine of its own); "off" lets the kernel move them.
    worker_affinity: Literal["auto", "off"] = "auto"


class ClientKeySpec(Strict, frozen=True):
    """A client allowed in: its secret from an environment variable, or only its SHA-256."""

    name: str
    secret_env: str | None = None
    sha256: str | None = None  # hex digest of the secret, for configs that must not hold it
    requests_per_minute: AtLeastOne | None = None
    daily_usd: Money | None = None  # spend cap for this client, per UTC day


class AuthSpec(Strict, frozen=True):
    keys: list[ClientKeySpec] = []


class LedgerSpec(Strict, frozen=True):
    # SQLite: the ledger file. With `url`: the base of the local spill file and journal only.
    path: str = "ledger.db"
    # postgresql://user@host:5432/db: the ledger on PostgreSQL instead of the file (docs/ledger.md).
    url: str | None = None
    password_env: str | None = None  # the PostgreSQL password, from this environment variable
    store_text: bool = False
    batch_size: AtLeastOne = 500
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 2000  # wait this long for a lock before retrying


class BudgetSpec(Strict, frozen=True):
    daily_usd: Money | None = None
    weekly_usd: Money | None = None
    monthly_usd: Money | None = None
    soft_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    # A paid call holds its worst-case cost while in flight; this many output tokens when the
    # client sets neither max_completion_tokens nor max_tokens.
    reserve_output_tokens: AtLeastOne = 4096


class StateSpec(Strict, frozen=True):
    """Where breakers, budgets and client limits live: in the process (no url) or in Redis/Valkey,
    shared by every process and machine that names the same url and prefix (proxy/state/)."""

    url: str | None = None  # redis://[:password@]host:port/db, rediss://..., unix:///path.sock
    prefix: str = "proxy"  # every key is {prefix}:...; two proxies sharing a Redis need two prefixes
    # Each Redis call; past it (or on any error) the process uses its own state until Redis answers again.
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 250
    reconnect_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 1.0  # the background retry and heartbeat
    # A reservation not settled by then is dropped (its process died holding it); above the request deadline.
    hold_seconds: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    # How many processes share this state across every machine, at least (replicas x workers).
    # While Redis is lost each takes 1/N of what is left, N the largest of this, `--workers` and
    # the most processes its heartbeat has seen: a process that never saw the others (it started
    # first, or Redis failed at once) would otherwise count itself alone and take everything.
    processes: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1


class QualitySpec(Strict, frozen=True):
    """The quality gate: which 200 answers count as bad, hence as failed attempts."""

    enabled: bool = True  # off: no answer is ever checked, whatever the request or its headers say
    json_object: bool = True  # response_format json_object: the content parses as a JSON object
    json_schema: bool = True  # response_format json_schema: the content validates against the schema
    tool_calls: bool = True  # tools offered: each call names one, its arguments validate
    cut_or_empty: bool = True  # with any check on: finish_reason "length" or no answer at all is bad
    # What a request that sends no X-Proxy-Check header gets: "auto" checks what it asked for,
    # "json" also wants a JSON object when the prompt alone asked for one, "off" checks nothing.
    default: Literal["auto", "json", "off"] = "auto"
    # Checked streams wait until the answer is complete and checked, so a bad one can still fail
    # over (time to first token becomes the whole answer's time); off: relayed live, checked after.
    hold_streams: bool = True
    max_schemas: AtLeastOne = 256  # compiled schemas kept, most recently used first


def _default_tiers() -> dict[str, TierSpec]:
    return {
        "llama": TierSpec(
            base_url="http://localhost:11434/v1",
            model="llama3.1:8b",
            timeout_seconds=30.0,
            aliases=["llama3.1-8b", "llama-3.1-8b"],
        ),
        "ollama": TierSpec(
            base_url="http://localhost:11434/v1",
            model="qwen2.5:7b",
            timeout_seconds=20.0,
            aliases=["ollama-7b"],
        ),
        "kimi": TierSpec(
            base_url="https://api.moonshot.ai/v1",
            model="kimi-k2.5",
            api_key_env="MOONSHOT_API_KEY",
            paid=True,
            timeout_seconds=30.0,
            aliases=["kimi-k2"],
            endpoints=["chat/completions", "responses"],  # Moonshot's API has no completions or embeddings
            price=PriceSpec(
                input_per_mtok=Decimal("0.60"),
                cached_input_per_mtok=Decimal("0.15"),
                output_per_mtok=Decimal("2.50"),
                per_call_usd=Decimal("0.0008"),
            ),
        ),
    }


class FileSpec(Strict, frozen=True):
    server: ServerSpec = ServerSpec()
    routing: RoutingSpec = RoutingSpec()
    retries: RetrySpec = RetrySpec()
    tiers: dict[str, TierSpec] = msgspec.field(default_factory=_default_tiers)
    ledger: LedgerSpec = LedgerSpec()
    budgets: BudgetSpec = BudgetSpec()
    quality: QualitySpec = QualitySpec()
    auth: AuthSpec = AuthSpec()
    state: StateSpec = StateSpec()
