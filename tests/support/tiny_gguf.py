"""Write a tiny, deterministic, random-weight GGUF model for tests.

The model is a 2-block ``llama`` architecture with 64 embedding dims and a
~330-token SentencePiece (SPM) vocabulary, small enough (~400 KB) to be
written in milliseconds and loaded by llama.cpp in well under a second.

Its output is gibberish, but the output projection is biased so that:

* control tokens (``<unk>``, ``<s>``, ``</s>``, ``<|im_start|>``,
  ``<|im_end|>``) have a logit of exactly 0 and are practically never sampled,
  so a completion nearly always runs until ``max_tokens``
  (``finish_reason == "length"``);
* ordinary words ("▁the", "▁plan", ...) dominate the byte-fallback and letter
  tokens, so the generated text is readable-ish UTF-8 (" the plan river ...").

Usage::

    from tests.support.tiny_gguf import write_tiny_model
    model_path = write_tiny_model(tmp_path / "tiny.gguf")
"""

from __future__ import annotations

import pathlib

import numpy as np
from gguf import GGUFWriter, TokenType

ARCH = "llama"
MODEL_NAME = "tiny-llama"

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX_TRAIN = 512
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
SEED = 1234

# ChatML, the same shape as Qwen's template minus tools; works with both
# llama.cpp's Jinja engine and its legacy built-in "chatml" detection.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# fmt: off
_WORDS = (
    "the", "plan", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as",
    "was", "at", "by", "from", "this", "be", "river", "stone", "light", "quiet", "model", "token",
    "proxy", "test", "hello", "world", "yes", "no", "fast", "slow", "green", "blue", "red", "cloud",
    "tree", "road", "house", "water", "fire", "sky", "small", "large", "answer", "question",
)
# fmt: on

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
IM_START_ID = 3
IM_END_ID = 4


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types); every token string is unique."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(tok: str, score: float, ttype: TokenType) -> None:
        tokens.append(tok)
        scores.append(score)
        types.append(int(ttype))

    add("<unk>", 0.0, TokenType.UNKNOWN)
    add("<s>", 0.0, TokenType.CONTROL)
    add("</s>", 0.0, TokenType.CONTROL)
    add("<|im_start|>", 0.0, TokenType.CONTROL)
    add("<|im_end|>", 0.0, TokenType.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, TokenType.BYTE)
    # Single pieces so SPM can tokenize plain ASCII text without falling back
    # to bytes for everything (SPM only merges pairs that are in the vocab).
    add("\u2581", -1000.0, TokenType.NORMAL)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c, -1000.0, TokenType.NORMAL)
    for i, w in enumerate(_WORDS):
        add("\u2581" + w, -float(i + 1), TokenType.NORMAL)

    assert len(set(tokens)) == len(tokens), "duplicate token strings"
    return tokens, scores, types


def _tensors(n_vocab: int, types: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random F32 weights, shapes in numpy (row-major) order.

    GGUF stores dims reversed, so numpy (rows, cols) == ggml ne[cols, rows];
    e.g. llama.cpp expects token_embd ne = [n_embd, n_vocab] -> (n_vocab, n_embd).
    """
    head_dim = N_EMBD // N_HEAD
    q_dim = N_HEAD * head_dim
    kv_dim = N_HEAD_KV * head_dim

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        if scale is None:
            scale = 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out: dict[str, np.ndarray] = {
        "token_embd.weight": w(n_vocab, N_EMBD, scale=1.0),
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
    }

    # Output projection: the final hidden state is RMS-normalised (norm ~ 8),
    # so a unit-variance row gives logits with std ~ 8. Words get full scale,
    # letters/bytes a small one, control tokens exactly zero (never sampled).
    output = w(n_vocab, N_EMBD, scale=1.0)
    first_word = n_vocab - len(_WORDS)
    for tok_id, ttype in enumerate(types):
        if ttype in (TokenType.CONTROL, TokenType.UNKNOWN):
            output[tok_id] = 0.0
        elif ttype == TokenType.BYTE:
            output[tok_id] *= 0.05
        elif tok_id < first_word:  # "\u2581" and single letters
            output[tok_id] *= 0.1
    out["output.weight"] = output

    for i in range(N_LAYERS):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "attn_q.weight"] = w(q_dim, N_EMBD)
        out[p + "attn_k.weight"] = w(kv_dim, N_EMBD)
        out[p + "attn_v.weight"] = w(kv_dim, N_EMBD)
        out[p + "attn_output.weight"] = w(N_EMBD, q_dim)
        out[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "ffn_gate.weight"] = w(N_FF, N_EMBD)
        out[p + "ffn_up.weight"] = w(N_FF, N_EMBD)
        out[p + "ffn_down.weight"] = w(N_EMBD, N_FF)
    return out


def write_tiny_model(path: pathlib.Path) -> pathlib.Path:
    """Write the tiny model to ``path`` (parents created) and return ``path``.

    Deterministic: the same bytes every call (fixed numpy seed).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    tokens, scores, types = build_vocab()

    writer = GGUFWriter(str(path), ARCH)
    try:
        writer.add_name(MODEL_NAME)
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYERS)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_file_type(0)  # ALL_F32

        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(UNK_ID)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_eot_token_id(IM_END_ID)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        for name, arr in _tensors(len(tokens), types, rng).items():
            writer.add_tensor(name, arr)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(write_tiny_model(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
