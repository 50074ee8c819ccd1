"""Token usage as upstreams report it, and an estimate where they report none."""

from __future__ import annotations

from proxy.records import Usage, UsageSource

# ~4 bytes of English/JSON per token: rough, but it keeps an unreported call from costing 0.
_BYTES_PER_TOKEN = 4


def parse_usage(raw: object, source: UsageSource) -> Usage | None:
    """OpenAI's `usage` object -> Usage; None when absent or not usable. Chat and completions
    say prompt/completion tokens, the Responses API input/output tokens, embeddings only the
    prompt's."""
    if not isinstance(raw, dict):
        return None
    responses = "input_tokens" in raw
    prompt = raw.get("input_tokens" if responses else "prompt_tokens")
    completion = raw.get("output_tokens" if responses else "completion_tokens", 0 if "total_tokens" in raw else None)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    cached = 0
    details = raw.get("input_tokens_details" if responses else "prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        cached = details["cached_tokens"]
    elif isinstance(raw.get("cached_tokens"), int):  # Moonshot's older field
        cached = raw["cached_tokens"]
    return Usage(max(prompt, 0), max(completion, 0), min(max(cached, 0), max(prompt, 0)), source)


def estimate_usage(request_bytes: int, completion_tokens: int) -> Usage:
    """For a call whose upstream sent no usage: prompt from the request size, completion counted."""
    return Usage(
        prompt_tokens=max(request_bytes // _BYTES_PER_TOKEN, 1),
        completion_tokens=max(completion_tokens, 0),
        cached_tokens=0,
        source=UsageSource.ESTIMATED,
    )


def estimate_tokens(text_bytes: int) -> int:
    return text_bytes // _BYTES_PER_TOKEN
