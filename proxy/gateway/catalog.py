"""What this proxy serves under /v1: GET /v1/models and /v1/models/{id}, and a 404 or 405 in
OpenAI's format for every other /v1 path or method."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.config import Config
from proxy.errors import MethodNotAllowed, NotFound
from proxy.gateway.state import STATE
from proxy.records import Api

_KNOWN = {**{api.path: "POST" for api in Api}, "/v1/models": "GET"}
_SERVED = ", ".join(f"POST {api.path}" for api in Api) + ", GET /v1/models and GET /v1/models/{id}"


def _model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "proxy", **extra}


def _catalog(config: Config) -> list[dict[str, Any]]:
    data = [_model("auto")]
    for t in config.usable_tiers:
        data.append(_model(t.id, upstream_model=t.model, paid=t.paid))
        data.extend(_model(a, alias_of=t.id) for a in t.aliases)
    return data


async def get_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _catalog(request.app[STATE].config)})


async def get_model(request: web.Request) -> web.Response:
    """`client.models.retrieve(id)`: any name `GET /v1/models` lists."""
    config = request.app[STATE].config
    wanted = request.match_info["model_id"]
    for entry in _catalog(config):
        if entry["id"] == wanted:
            return web.json_response(entry)
    names = ", ".join(e["id"] for e in _catalog(config))
    raise NotFound(
        f"The model {wanted!r} does not exist on this proxy. Use one of: {names}.",
        param="model",
        code="model_not_found",
    )


async def unknown_v1(request: web.Request) -> web.Response:
    allowed = _KNOWN.get(request.path)
    model_id = request.path.removeprefix("/v1/models/")
    if allowed is None and model_id != request.path and model_id and "/" not in model_id:
        allowed = "GET"  # /v1/models/{id}; "/v1/models/" itself (no id) is no endpoint
    if allowed is not None and allowed != request.method:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    raise NotFound(
        f"Unknown endpoint {request.method} {request.path}: this proxy serves {_SERVED}.",
        code="unknown_url",
    )
