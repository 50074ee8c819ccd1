"""proxy/openapi.yaml: a valid OpenAPI 3.1 document, in step with the routes create_app
registers, and true: the real answers of the in-process app (status, media type, headers, body)
are what it documents."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from multidict import CIMultiDictProxy
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.core.result import Ok

from proxy import __version__
from proxy.app import create_app
from proxy.sim import Behaviour
from tests.conftest import ProxyFactory, Upstream, make_config, tier_config

OPENAPI = Path(__file__).resolve().parent.parent / "proxy" / "openapi.yaml"
DOC: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
DOC_URI = "urn:proxy:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(DOC_URI, Resource.from_contents(DOC, DRAFT202012))
CATCH_ALL = "/v1/{tail}"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
VALID = {"messages": [{"role": "user", "content": "plan"}]}


# ---------------------------------------------------------------------------------- validity


def test_the_document_is_valid_openapi_31() -> None:
    assert DOC["openapi"].startswith("3.1")
    validate_openapi(DOC)


def test_schemathesis_loads_every_operation() -> None:
    schema = schemathesis.openapi.from_path(str(OPENAPI))
    labels = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis cannot use an operation: {result}"
        labels.append(result.ok().label)
    assert sorted(labels) == sorted(f"{m.upper()} {p}" for p, m in documented_operations())


def test_every_documented_response_has_content_or_is_a_ref() -> None:
    for path, method in documented_operations():
        for status, response in DOC["paths"][path][method]["responses"].items():
            response = resolve(response)
            assert re.fullmatch(r"[1-5][0-9][0-9]", status), f"{method} {path}: explicit status codes only"
            assert response.get("content"), f"{method.upper()} {path} {status} documents no media type"


# ------------------------------------------------------------------------ routes <-> document


def documented_operations() -> set[tuple[str, str]]:
    return {(path, m) for path, item in DOC["paths"].items() for m in item if m in HTTP_METHODS}


def registered_operations() -> set[tuple[str, str]]:
    """(path, method) for every route create_app registers; HEAD comes with each GET and the
    /v1 catch-all answers 404/405 by design, so neither is documented."""
    app = create_app(make_config({"tiers": {"llama": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}}))
    found = set()
    for route in app.router.routes():
        assert route.resource is not None
        path = route.resource.canonical
        if path == CATCH_ALL or route.method == "HEAD":
            continue
        found.add((re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path), route.method.lower()))
    return found


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    documented, registered = documented_operations(), registered_operations()
    assert registered - documented == set(), "routes create_app registers that proxy/openapi.yaml does not document"
    assert documented - registered == set(), "operations proxy/openapi.yaml documents that create_app does not route"


async def test_get_openapi_yaml_serves_this_file(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    resp = await client.get("/openapi.yaml")
    assert resp.status == 200, f"GET /openapi.yaml answered {resp.status}"
    body = await resp.read()
    # The file holds a placeholder for the version, which is written once, in proxy/__init__.py.
    assert b"__VERSION__" in OPENAPI.read_bytes()
    assert body == OPENAPI.read_bytes().replace(b"__VERSION__", __version__.encode())
    assert yaml.safe_load(body)["info"]["version"] == __version__
    check(resp, body, "/openapi.yaml", "get")


# ---------------------------------------------------------------- the document is true


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = DOC
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema from the document, its $refs made absolute (`_fix_refs`)."""
    return Draft202012Validator(schema, registry=REGISTRY)


def _fix_refs(node: Any) -> Any:
    """Point the schema's local $refs at the document in the registry."""
    if isinstance(node, dict):
        return {k: (DOC_URI + v if k == "$ref" and v.startswith("#") else _fix_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_refs(v) for v in node]
    return node


def check(resp: Any, body: bytes, path: str, method: str) -> dict[str, Any]:
    """Assert that the document describes this answer: status, media type, headers, body."""
    operation = DOC["paths"][path][method]
    responses = operation["responses"]
    status = str(resp.status)
    assert status in responses, f"{method.upper()} {path} answered {status}, documented: {sorted(responses)}"
    documented = resolve(responses[status])
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    content = documented.get("content", {})
    assert media_type in content, f"{method.upper()} {path} {status}: {media_type} not in {sorted(content)}"
    headers: CIMultiDictProxy[str] = resp.headers
    for name, spec in documented.get("headers", {}).items():
        spec = resolve(spec)
        value = headers.get(name)
        if spec.get("required"):
            assert value is not None, f"{method.upper()} {path} {status}: header {name} is required"
        if value is not None:
            errors = list(validator(_fix_refs(spec["schema"])).iter_errors(value))
            assert not errors, f"{method.upper()} {path} {status}: header {name}={value!r}: {errors[0].message}"
    schema = _fix_refs(content[media_type].get("schema", {}))
    if media_type == "application/json":
        doc = json.loads(body)
        errors = list(validator(schema).iter_errors(doc))
        assert not errors, f"{method.upper()} {path} {status}: {errors[0].message} in {body[:500]!r}"
        return doc if isinstance(doc, dict) else {"value": doc}
    if media_type == "text/event-stream":
        for raw in body.split(b"\n\n"):
            lines = [ln for ln in raw.decode().splitlines() if ln and not ln.startswith(":")]
            if not lines:
                continue
            event: dict[str, Any] = {}
            for ln in lines:
                key, _, value = ln.partition(":")
                event[key] = (event.get(key, "") + "\n" if key in event else "") + value.removeprefix(" ")
            errors = list(validator(schema).iter_errors(event))
            assert not errors, f"SSE event {event}: {errors[0].message}"
    return {}


async def call(client: TestClient[web.Request, web.Application], method: str, path: str, **kw: Any) -> Any:
    resp = await client.request(method, path, **kw)
    body = await resp.read()
    return resp, body


async def test_operations_endpoints_answer_as_documented(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream]
) -> None:
    client = await make_proxy(budgets={"daily_usd": 5})
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        resp, body = await call(client, "GET", path)
        assert resp.status == 200
        check(resp, body, path, "get")
    # a report with a tier row, the budget and the ledger state in it
    resp, body = await call(client, "POST", "/v1/chat/completions", json={**VALID, "model": "kimi"})
    assert resp.status == 200
    check(resp, body, "/v1/chat/completions", "post")
    for since in ("24h", "7d", "30d", "all", " 12H ", "000001d"):
        resp, body = await call(client, "GET", "/proxy/report", params={"since": since})
        doc = check(resp, body, "/proxy/report", "get")
        assert resp.status == 200
    assert doc["tiers"] and doc["budget"]["windows"] and "ledger" in doc
    for since in ("0h", "1234567h", "1y", "", "all7d"):
        resp, body = await call(client, "GET", "/proxy/report", params={"since": since})
        assert resp.status == 400
        assert check(resp, body, "/proxy/report", "get")["error"]["param"] == "since"


async def test_readyz_not_ready_is_documented(aiohttp_client: Any, upstreams: dict[str, Upstream]) -> None:
    tiers = tier_config(upstreams)
    only_kimi = {"kimi": {**tiers["kimi"], "api_key_env": "FUZZ_UNSET_KEY"}}
    config = make_config({"tiers": only_kimi, "routing": {"primary": "kimi"}})
    client = await aiohttp_client(create_app(config, with_ledger=False))
    resp, body = await call(client, "GET", "/readyz")
    assert resp.status == 503
    check(resp, body, "/readyz", "get")
    resp, body = await call(client, "GET", "/proxy/report")
    assert resp.status == 404
    check(resp, body, "/proxy/report", "get")
    resp, body = await call(client, "POST", "/v1/chat/completions", json=VALID)
    assert resp.status == 503
    check(resp, body, "/v1/chat/completions", "post")


async def test_chat_answers_are_documented(make_proxy: ProxyFactory, upstreams: dict[str, Upstream]) -> None:
    client = await make_proxy(server={"max_body_bytes": 2000}, budgets={"daily_usd": 5})
    chat = "/v1/chat/completions"
    cases: list[tuple[dict[str, Any], int]] = [
        ({"json": VALID}, 200),
        ({"json": {**VALID, "stream": True}}, 200),
        ({"json": {**VALID, "stream": True, "stream_options": {"include_usage": True}}}, 200),
        ({"json": VALID, "headers": {"X-Request-Id": "abc-123", "X-Replan": "minor", "X-Fallback": "off"}}, 200),
        ({"data": b"not json"}, 400),
        ({"json": [1]}, 400),
        ({"json": {"messages": []}}, 400),
        ({"json": VALID, "headers": {"X-Complexity": "hard"}}, 400),
        ({"json": VALID, "headers": {"X-Tier": "kimi", "X-Replan": "minor"}}, 400),
        ({"json": {**VALID, "model": "gpt-5"}}, 404),
        ({"json": {**VALID, "padding": "x" * 3000}}, 413),
    ]
    for kwargs, status in cases:
        resp, body = await call(client, "POST", chat, **kwargs)
        assert resp.status == status, (kwargs, body[:300])
        check(resp, body, chat, "post")


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        (Behaviour(status=500), 502),
        (Behaviour(status=429), 429),
        (Behaviour(status=422), 422),
        (Behaviour(status=400), 400),
        (Behaviour(stall=True), 504),
    ],
)
async def test_upstream_failures_are_documented(
    make_proxy: ProxyFactory, upstreams: dict[str, Upstream], behaviour: Behaviour, status: int
) -> None:
    for u in upstreams.values():
        u.always(behaviour)
    fast = {name: {"timeout_seconds": 0.2} for name in upstreams}
    client = await make_proxy(tiers=tier_config(upstreams, **fast))
    resp, body = await call(client, "POST", "/v1/chat/completions", json=VALID)
    assert resp.status == status, body[:300]
    check(resp, body, "/v1/chat/completions", "post")


async def test_client_key_answers_are_documented(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(
        auth={"keys": [{"name": "t", "secret_env": "OPENAPI_KEY", "requests_per_minute": 1}]},
        env={"OPENAPI_KEY": "sk-openapi"},
    )
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/proxy/report", "get")):
        resp, body = await call(client, method.upper(), path, json=VALID if method == "post" else None)
        assert resp.status == 401
        check(resp, body, path, method)
    good = {"Authorization": "Bearer sk-openapi"}
    resp, body = await call(client, "GET", "/v1/models", headers=good)
    assert resp.status == 200
    check(resp, body, "/v1/models", "get")
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/proxy/report", "get")):
        resp, body = await call(client, method.upper(), path, headers=good, json=VALID if method == "post" else None)
        assert resp.status == 429
        check(resp, body, path, method)
        assert resp.headers["Retry-After"].isdigit()


async def test_a_body_that_never_arrives_is_a_documented_408(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(server={"body_read_timeout_seconds": 0.2})
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    status = int(head.split(b" ")[1])
    assert status == 408
    assert str(status) in DOC["paths"]["/v1/chat/completions"]["post"]["responses"]
