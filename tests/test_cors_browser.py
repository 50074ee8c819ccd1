"""A real browser calling `proxy serve` through CORS: Debian's chromium, headless, loads a page served
on another origin whose script calls the proxy (plain and streamed, with the headers a browser build
of the openai SDK sends, so the browser preflights), then a page on an origin not in server.cors
whose calls fail. Each page posts what its script saw back to its own server.

Without chromium the test is skipped; CI (.ci/run) installs it and sets PROXY_REQUIRE_CHROMIUM=1, so
that there a missing browser fails instead."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.sim import Behaviour
from tests.support.faults import KIMI_ENV, SimThread, proxy_config
from tests.support.proc import ProxyProc, start_proxy

REQUIRE = "PROXY_REQUIRE_CHROMIUM"
KEY = "cors-browser-key-0123456789"
TIERS = ("llama", "ollama", "kimi")

# The allowed page: the calls an app built on openai-node (dangerouslyAllowBrowser) makes, with
# the headers that SDK adds in a browser; then it hands over to the refused page.
ALLOWED_JS = """
const sdk = {"X-Stainless-Lang": "js", "X-Stainless-Package-Version": "5.0.0", "X-Stainless-OS": "Unknown",
  "X-Stainless-Arch": "unknown", "X-Stainless-Runtime": "browser:chrome", "X-Stainless-Runtime-Version": "156.0.0",
  "X-Stainless-Retry-Count": "0", "X-Stainless-Timeout": "600", "OpenAI-Project": "proj_browser"};
const json = {"Content-Type": "application/json", "Authorization": "Bearer " + KEY, ...sdk};
const body = (extra) => JSON.stringify({model: "auto", messages: [{role: "user", content: "plan"}], ...extra});
const seen = (r) => ({status: r.status, tier: r.headers.get("X-Proxy-Tier"), route: r.headers.get("X-Proxy-Route"),
  rid: r.headers.get("X-Request-Id"), type: r.headers.get("Content-Type")});
async function run() {
  const out = {};
  step = "plain";
  let r = await fetch(PROXY + "/v1/chat/completions", {method: "POST", body: body({}),
    headers: {...json, "X-Tier": "ollama", "X-Request-Id": "browser-plain"}});
  out.plain = {...seen(r), answer: (await r.json()).choices[0].message.content};
  step = "stream";
  r = await fetch(PROXY + "/v1/chat/completions", {method: "POST", body: body({stream: true}), headers: json});
  const reader = r.body.getReader(), text = new TextDecoder();
  let reads = 0, events = "";
  for (;;) { const {done, value} = await reader.read(); if (done) break; reads++; events += text.decode(value); }
  out.stream = {...seen(r), reads, events};
  step = "no key";
  r = await fetch(PROXY + "/v1/chat/completions", {method: "POST", body: body({}),
    headers: {"Content-Type": "application/json", ...sdk}});
  out.no_key = {...seen(r), error: (await r.json()).error};
  return out;
}
"""
# The refused page: a call that needs a preflight, and a "simple" one (text/plain) that does not.
REFUSED_JS = """
const failure = (e) => ({failed: e.name + ": " + e.message});
async function run() {
  const out = {};
  out.preflighted = await fetch(PROXY + "/v1/chat/completions", {method: "POST", headers: {
    "Content-Type": "application/json", "Authorization": "Bearer " + KEY}, body: "{}"})
    .then((r) => ({status: r.status}), failure);
  out.simple = await fetch(PROXY + "/v1/chat/completions", {method: "POST",
    body: JSON.stringify({model: "auto", messages: [{role: "user", content: "plan"}]})})
    .then((r) => ({status: r.status}), failure);
  return out;
}
"""
PAGE = """<!doctype html><html><body><pre id="out">running</pre><script>
const PROXY = {proxy}, KEY = {key}, NEXT = {next};
let step = "start";
{script}
run().catch((e) => ({{error: step + ": " + String(e)}})).then(async (out) => {{
  document.getElementById("out").textContent = JSON.stringify(out);
  await fetch("/result", {{method: "POST", body: JSON.stringify(out)}});
  if (NEXT) location.href = NEXT;
}});
</script></body></html>"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but chromium is not installed: apt-get install -y chromium")
        pytest.skip("no chromium: apt-get install -y chromium")
    return path


class Pages:
    """Two page servers, each its own origin; `results[name]` is set by the page's script."""

    def __init__(self) -> None:
        self.html: dict[str, str] = {}
        self.results: dict[str, asyncio.Future[Any]] = {}

    def app(self, name: str) -> web.Application:
        self.results[name] = asyncio.get_running_loop().create_future()

        async def page(_: web.Request) -> web.Response:
            return web.Response(text=self.html[name], content_type="text/html")

        async def result(request: web.Request) -> web.Response:
            if not self.results[name].done():
                self.results[name].set_result(json.loads(await request.text()))
            return web.Response()

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_post("/result", result)
        return app


async def browse(url: str, work: Path, pages: Pages, timeout: float = 30) -> dict[str, Any]:
    """Chromium on `url` until every page has reported; then it is stopped."""
    log = work / "chromium.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={work / 'profile'}",
            url,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    try:
        async with asyncio.timeout(timeout):
            return {name: await fut for name, fut in pages.results.items()}
    except TimeoutError:
        raise AssertionError(f"the pages did not report within {timeout}s:\n{log.read_text()[-3000:]}") from None
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def test_a_page_on_another_origin_calls_through_cors_and_a_stranger_cannot(
    sims: SimThread, tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    chromium()
    pages = Pages()
    allowed = await aiohttp_server(pages.app("allowed"))
    refused = await aiohttp_server(pages.app("refused"))
    origin = str(allowed.make_url("")).rstrip("/")
    sims.reset()
    sims.sims["llama"].always(Behaviour(chunks=4, chunk_delay=0.05))  # a stream the page reads in parts
    urls = {name: sim.url for name, sim in sims.sims.items()}
    config = proxy_config(
        urls,
        tmp_path / "ledger.db",
        server={"cors": [origin]},
        auth={"keys": [{"name": "web", "secret_env": "CORS_BROWSER_KEY"}]},
    )
    proxy: ProxyProc = await start_proxy(tmp_path / "proxy", config, {**KIMI_ENV, "CORS_BROWSER_KEY": KEY})
    try:
        for name, script, nxt in (
            ("allowed", ALLOWED_JS, str(refused.make_url("/"))),
            ("refused", REFUSED_JS, ""),
        ):
            pages.html[name] = PAGE.format(
                proxy=json.dumps(proxy.url), key=json.dumps(KEY), next=json.dumps(nxt), script=script
            )
        seen = await browse(str(allowed.make_url("/")), tmp_path, pages)
        hits = sims.hits()
    finally:
        assert await proxy.stop() == 0

    ok = seen["allowed"]
    assert "error" not in ok, ok
    # plain: the routing header went through the preflight, the X-Proxy-* and X-Request-Id came back readable
    assert ok["plain"]["status"] == 200 and ok["plain"]["answer"], ok
    assert (ok["plain"]["tier"], ok["plain"]["route"], ok["plain"]["rid"]) == ("ollama", "pinned", "browser-plain")
    # streamed: read as it came, to the end
    stream = ok["stream"]
    assert stream["status"] == 200 and stream["type"].startswith("text/event-stream"), stream
    assert stream["tier"] == "llama" and stream["reads"] >= 2, stream
    assert stream["events"].count("data: {") >= 4 and stream["events"].rstrip().endswith("data: [DONE]")
    # the client-key middleware's 401 is readable too (it carries the CORS headers)
    assert ok["no_key"]["status"] == 401 and ok["no_key"]["error"]["code"] == "missing_api_key", ok

    bad = seen["refused"]
    assert "error" not in bad, bad
    assert bad["preflighted"]["failed"].startswith("TypeError"), bad  # the preflight got 403
    assert bad["simple"]["failed"].startswith("TypeError"), bad  # refused, and no CORS headers to read it by
    assert hits == {"llama": 1, "ollama": 1, "kimi": 0}, hits  # the stranger's calls reached no tier

    # what the browser sent that is no tier's business did not cross
    for name in ("llama", "ollama"):
        for req in sims.sims[name].stats.requests:
            crossed = [h for h in req.headers if h in ("origin", "referer", "authorization", "openai-project")]
            crossed += [h for h in req.headers if h.startswith(("sec-", "x-stainless-"))]
            assert not crossed, f"{name} got {crossed}"
