"""`proxy demo`: three SIMULATED tiers and the real proxy in front of them, no API key needed.

It sends a few requests so a newcomer sees routing, failover and the headers, then keeps serving
so they can try their own calls with curl or the SDK.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.config import Config, build_config
from proxy.sim import Behaviour, SimSettings, start_sim

_TIERS = (
    # name, upstream model, paid, latency range (s)
    ("llama", "llama3.1:8b", False, (0.15, 0.40)),
    ("ollama", "qwen2.5:7b", False, (0.08, 0.20)),
    ("kimi", "kimi-k2.5", True, (0.30, 0.60)),
)
_SCENARIOS: tuple[tuple[str, dict[str, str], bool], ...] = (
    ("default chain", {}, False),
    ("default chain, streamed", {}, True),
    ("minor re-plan (never paid)", {"X-Replan": "minor"}, False),
    ("complex (Kimi first)", {"X-Complexity": "complex"}, False),
)


async def run_demo(port: int, failure_rate: float, requests: int, *, serve: bool = True) -> int:
    runners: list[web.AppRunner] = []
    raw_tiers: dict[str, Any] = {}
    for name, model, paid, latency in _TIERS:
        settings = SimSettings(
            name=name,
            latency=latency,
            failure_rate=failure_rate if name == "llama" else 0.05,
            simulated_label=True,
            record_requests=False,
        )
        if name == "llama":
            settings.script.append(Behaviour(status=503))  # the first call always shows a failover
        runner, url = await start_sim(settings)
        runners.append(runner)
        raw_tiers[name] = {"base_url": url, "model": model, "paid": paid, "timeout_seconds": 2.0}
        if paid:
            raw_tiers[name]["price"] = {"input_per_mtok": 0.60, "output_per_mtok": 2.50, "per_call_usd": 0.0008}
    config = build_config(
        {
            "tiers": raw_tiers,
            "routing": {"escalate_after_failures": 3, "breaker_cooldown_seconds": 5},
            "retries": {"max_fallback_retries": 1},
        },
        "<demo>",
        {},
    )
    ledger_dir = tempfile.TemporaryDirectory(prefix="proxy-demo-")
    db = str(Path(ledger_dir.name) / "ledger.db")
    proxy_runner, base = await _start_proxy(config, port, db)
    runners.append(proxy_runner)
    try:
        _banner(base, config)
        await _show(base, requests)
        await _show_report(base)
        if serve:
            print(f"\nThe proxy keeps serving at {base} (SIMULATED tiers). Try:\n{_curl(base)}\nCtrl-C to stop.")
            await asyncio.Event().wait()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        for r in reversed(runners):
            await r.cleanup()
        ledger_dir.cleanup()
    return 0


async def _start_proxy(config: Config, port: int, db: str) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(config, db_path=db), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


def _banner(base: str, config: Config) -> None:
    print("proxy demo: the tiers below are SIMULATED (local fake servers with realistic latency);")
    print("no request leaves this machine and no API key is used.\n")
    for t in config.tiers:
        print(f"  {t.id:<7} {'paid' if t.paid else 'free'}  simulated {t.model} at {t.base_url}")
    print(f"\nproxy: {base}\n")
    print(f"{'#':>2}  {'scenario':<30} {'status':>6}  {'route':<13} {'tier':<7} {'tries':>5}  {'ms':>6}")


async def _show(base: str, requests: int) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(requests):
            label, headers, stream = _SCENARIOS[i % len(_SCENARIOS)]
            body = {"model": "auto", "stream": stream, "messages": [{"role": "user", "content": "next step?"}]}
            t0 = time.monotonic()
            async with session.post(f"{base}/chat/completions", json=body, headers=headers) as resp:
                await resp.read()
                ms = (time.monotonic() - t0) * 1000
                h = resp.headers
                print(
                    f"{i + 1:>2}  {label:<30} {resp.status:>6}  {h.get('X-Proxy-Route', '-'):<13} "
                    f"{h.get('X-Proxy-Tier', '-'):<7} {h.get('X-Proxy-Attempts', '-'):>5}  {ms:>6.0f}"
                )
    print("\ntries > 1 means the proxy failed over: a simulated tier answered 503 and the next one served.")


async def _show_report(base: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{base.removesuffix('/v1')}/proxy/report") as resp:
        doc = await resp.json()
    calls = ", ".join(f"{tier}: {n}" for tier, n in doc["calls"].items())
    print(
        f"\nledger (a temporary SQLite file): calls {{{calls}}}, paid cost ${doc['cost_usd']:.6f}, "
        f"savings ${doc['savings_usd']:.6f}, free calls {doc['free_call_pct'] or 0:.1f}%"
    )


def _curl(base: str) -> str:
    return (
        f"  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\\n"
        '       -H \'X-Replan: minor\' -d \'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}\''
    )
