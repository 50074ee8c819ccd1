"""What this proxy serves under /v1: GET /v1/models, and a 404 or 405 in OpenAI's format for
every other /v1 path or method."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.errors import MethodNotAllowed, NotFound
from proxy.gateway.state import STATE

_KNOWN = {"/v1/chat/completions": "POST", "/v1/models": "GET"}


def _model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "proxy", **extra}


async def get_models(request: web.Request) -> web.Response:
    config = request.app[STATE].config
    data = [_model("auto")]
    for t in config.usable_tiers:
        data.append(_model(t.id, upstream_model=t.model, paid=t.paid))
        data.extend(_model(a, alias_of=t.id) for a in t.aliases)
    return web.json_response({"object": "list", "data": data})


async def unknown_v1(request: web.Request) -> web.Response:
    allowed = _KNOWN.get(request.path)
    if allowed is not None and allowed != request.method:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    raise NotFound(
        f"Unknown endpoint {request.method} {request.path}: this proxy serves POST /v1/chat/completions "
        "and GET /v1/models.",
        code="unknown_url",
    )
