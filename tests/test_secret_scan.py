"""The run-wide upstream-key scan (tests/support/secret_scan.py) finds what it is meant to find."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.secret_scan import SecretScan

PLANTED = "sk-planted-0123456789"


def test_scan_finds_a_key_in_any_file_under_the_tree(tmp_path: Path) -> None:
    scan = SecretScan((PLANTED,))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ledger.db-wal").write_bytes(b"\x00\x01 Bearer " + PLANTED.encode() + b"\x00")
    (tmp_path / "proxy.log").write_text("a clean log line\n")
    scan.scan_tree(tmp_path)
    assert scan.files == 2
    assert len(scan.found) == 1 and "ledger.db-wal" in scan.found[0]
    assert PLANTED not in scan.found[0], "the report names where, without repeating the key"


async def test_scan_sees_response_heads_and_bodies(aiohttp_client: Callable[..., Awaitable[Any]]) -> None:
    scan = SecretScan((PLANTED,))

    async def leaky(request: web.Request) -> web.Response:
        return web.Response(text=f"upstream said: bad key {PLANTED}")

    async def clean(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.on_response_prepare.append(scan.on_response_prepare)
    app.router.add_get("/leaky", leaky)
    app.router.add_get("/clean", clean)
    client = await aiohttp_client(app)
    assert (await client.get("/clean")).status == 200
    assert (await client.get("/leaky")).status == 200
    assert scan.responses == 2
    assert scan.found == [f"{PLANTED[:10]}... in response to GET /leaky"]
