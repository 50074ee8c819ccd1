#!/usr/bin/env python
"""A stand-in for the `ollama` command of the ollama/ollama image, for the compose run in
tests/test_image.py: Docker Hub, and so the real image and its 9 GB of models, is out of reach.

`ollama serve` answers OpenAI's /v1/chat/completions with proxy.sim, and Ollama's /api/tags,
/api/show and /api/pull from a list of "pulled" model names kept on the models volume;
`ollama list`, `show` and `pull` ask the server at $OLLAMA_HOST, as the real CLI does, and exit
non-zero when it cannot answer. That is all deploy/docker-compose.yml asks of the image.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

STORE = Path("/root/.ollama/standin-models.json")


def _pulled() -> list[str]:
    return json.loads(STORE.read_text()) if STORE.exists() else []


def serve() -> None:
    from aiohttp import web

    from proxy.sim import SimSettings, create_sim_app

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": m} for m in _pulled()]})

    async def show(request: web.Request) -> web.Response:
        model = (await request.json()).get("model")
        if model not in _pulled():
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        return web.json_response({"model": model})

    async def pull(request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(sorted({*_pulled(), model})))
        return web.json_response({"status": "success"})

    app = create_sim_app(SimSettings(name="ollama"))
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/pull", pull)
    web.run_app(app, host="0.0.0.0", port=11434, print=None)


def _ask(path: str, body: dict[str, str] | None = None) -> dict[str, object]:
    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(f"{host}{path}", data=data, timeout=5) as resp:
        answer: dict[str, object] = json.loads(resp.read())
        return answer


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("serve", [])
    if command == "serve":
        serve()
        return 0
    try:
        if command == "list":
            print("\n".join(str(m) for m in _ask("/api/tags")["models"]))  # type: ignore[attr-defined]
        elif command == "show":
            _ask("/api/show", {"model": args[0]})
        elif command == "pull":
            print(_ask("/api/pull", {"model": args[0]})["status"])
        else:
            print(f"ollama stand-in: unknown command {command!r}", file=sys.stderr)
            return 2
    except (urllib.error.URLError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
