"""End to end with the real llama.cpp server as the free tiers and the real OpenAI SDK as client."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import make_config
from tests.support.background import running_proxy
from tests.support.llamacpp import LlamaCppServer
from tests.support.proc import closed_port_url

MESSAGES: list[Any] = [{"role": "user", "content": "the plan"}]
# cache_prompt off: llama.cpp would otherwise report cached tokens on the second identical call
DETERMINISTIC = {"max_tokens": 8, "temperature": 0, "seed": 7, "cache_prompt": False}


def _config(llamacpp: LlamaCppServer, llama_url: str | None = None) -> Any:
    return make_config(
        {
            "tiers": {
                "llama": {"base_url": llama_url or llamacpp.base_url, "model": "llama3.1:8b", "timeout_seconds": 5},
                "ollama": {"base_url": llamacpp.base_url, "model": "qwen2.5:7b", "timeout_seconds": 5},
                "kimi": {
                    "base_url": closed_port_url(),
                    "model": "kimi-k2.5",
                    "paid": True,
                    "api_key_env": "TEST_KIMI_KEY",
                },
            }
        }
    )


@pytest.fixture(scope="module")
def proxy_url(llamacpp: LlamaCppServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_proxy(_config(llamacpp), str(tmp_path_factory.mktemp("ledger") / "ledger.db")) as url:
        yield url


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="client-key", max_retries=0, timeout=10)


def test_sync_sdk_non_streaming(proxy_url: str) -> None:
    raw = sdk(proxy_url).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=8)
    completion = raw.parse()
    assert raw.headers["x-proxy-tier"] == "llama"
    assert raw.headers["x-proxy-route"] == "default"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_sync_sdk_streaming(proxy_url: str) -> None:
    chunks = list(sdk(proxy_url).chat.completions.create(model="auto", messages=MESSAGES, max_tokens=8, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks), "no usage chunk unless the client asks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text

    with_usage = list(
        sdk(proxy_url).chat.completions.create(
            model="auto", messages=MESSAGES, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 8


async def test_async_sdk_non_streaming_and_streaming(proxy_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=proxy_url, api_key="k", max_retries=0, timeout=10)
    completion = await client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=4)
    assert completion.choices[0].message.role == "assistant"
    stream = await client.chat.completions.create(model="ollama", messages=MESSAGES, max_tokens=4, stream=True)
    finish = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finish[-1] == "length"
    await client.close()


def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


_VOLATILE = re.compile(rb'"(id|created|timings)":("[^"]*"|\d+|\{[^{}]*\})')


def _blank(raw: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":_', raw)


def test_same_bytes_as_direct_call_apart_from_what_must_change(proxy_url: str, llamacpp: LlamaCppServer) -> None:
    body = {"model": "llama3.1:8b", "messages": MESSAGES, **DETERMINISTIC}
    d_status, direct = post(f"{llamacpp.base_url}/chat/completions", body)
    p_status, proxied = post(f"{proxy_url}/chat/completions", {**body, "model": "auto"})
    assert d_status == p_status == 200
    # id, created and timings differ between any two calls to llama.cpp; every other byte is the same
    assert _blank(proxied) == _blank(direct)
    assert orjson.loads(proxied)["choices"] == orjson.loads(direct)["choices"]


def _stream_events(url: str, body: dict[str, Any]) -> list[bytes]:
    _, raw = post(f"{url}/chat/completions", body)
    return [_blank(e) for e in raw.split(b"\n\n") if e.strip()]


def test_stream_same_events_as_direct_call(proxy_url: str, llamacpp: LlamaCppServer) -> None:
    body = {"model": "llama3.1:8b", "messages": MESSAGES, "stream": True, **DETERMINISTIC}
    with_usage = {**body, "stream_options": {"include_usage": True}}
    direct = _stream_events(llamacpp.base_url, with_usage)
    assert len(direct) == 8 + 4  # role, 8 tokens, finish, usage, [DONE]
    assert _stream_events(proxy_url, {**with_usage, "model": "auto"}) == direct

    # Without include_usage the proxy still asks llama.cpp for usage (for the ledger) and hides the
    # usage chunk; llama.cpp then carries its non-standard `timings` there instead of on the finish chunk.
    direct = [e.replace(b',"timings":_', b"") for e in _stream_events(llamacpp.base_url, body)]
    assert len(direct) == 8 + 3
    assert _stream_events(proxy_url, {**body, "model": "auto"}) == direct


def test_failover_from_dead_llama_to_llamacpp_ollama(llamacpp: LlamaCppServer, tmp_path: Path) -> None:
    with running_proxy(_config(llamacpp, llama_url=closed_port_url()), str(tmp_path / "l.db")) as url:
        raw = sdk(url).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=4)
        assert raw.headers["x-proxy-tier"] == "ollama"
        assert raw.headers["x-proxy-attempts"] == "3"  # llama refused twice, then ollama
        assert raw.parse().choices[0].message.content


def test_sdk_sees_openai_errors(proxy_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(proxy_url).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk(proxy_url).chat.completions.create(model="auto", messages=MESSAGES, extra_headers={"X-Replan": "x"})
