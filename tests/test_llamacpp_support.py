"""Smoke test: the tiny GGUF model served by the real llama.cpp (xllamacpp)."""

from __future__ import annotations

import pathlib

import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.support.llamacpp import LlamaCppServer
from tests.support.tiny_gguf import write_tiny_model

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "Write a plan."},
]


def test_tiny_model_served_by_llamacpp(tmp_path: pathlib.Path) -> None:
    model_path = write_tiny_model(tmp_path / "tiny.gguf")
    with LlamaCppServer(n_parallel=2) as server:
        base_url = server.start(model_path)
        assert base_url == server.base_url
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")

        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=10)
        try:
            assert [m.id for m in client.models.list().data] == [server.model]

            resp = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8)
            assert resp.object == "chat.completion"
            assert len(resp.choices) == 1
            choice = resp.choices[0]
            assert choice.message.role == "assistant"
            assert isinstance(choice.message.content, str) and choice.message.content
            assert choice.finish_reason in ("length", "stop")
            assert resp.usage is not None
            assert resp.usage.prompt_tokens > 0
            assert 0 < resp.usage.completion_tokens <= 8
            assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

            chunks = list(
                client.chat.completions.create(
                    model=server.model,
                    messages=MESSAGES,
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            content_chunks = [c for c in chunks if c.choices]
            assert content_chunks[-1].choices[0].finish_reason in ("length", "stop")
            text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
            assert text
            final = chunks[-1]  # include_usage: trailing chunk, no choices
            assert final.choices == []
            assert final.usage is not None
            assert 0 < final.usage.completion_tokens <= 8
            assert final.usage.prompt_tokens == resp.usage.prompt_tokens
        finally:
            client.close()
    assert not server.running
