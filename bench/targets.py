"""The systems under test besides the upstream: this proxy and LiteLLM's proxy, both on the proxy core.

The proxy is `proxy serve --config <generated yaml> --port P` with the ledger on, primary tier
`llama` on the fast upstream and the other default tiers on the same upstream (plus `sse` and
`paced` tiers, pinned by model name, for the stream tests, and `plan2k` for the quality gate's
cost). LiteLLM runs from its own virtualenv (`bench/.litellm-venv`, `litellm[proxy]` pinned
below), one worker, local cost map, a master key, no database, two deployments on the same
upstream with a fallback list between them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from bench.procs import PROXY_CORE, Service, free_port, pinned, say

LITELLM_VERSION = "1.82.6"  # installs on Python 3.11 here; 1.82.7/1.82.8 were the compromised uploads
LITELLM_VENV = Path(__file__).resolve().parent / ".litellm-venv"
LITELLM_KEY = "sk-bench-master-key"
_KIMI_KEY_ENV = "BENCH_KIMI_KEY"


def proxy_config(fast: str, paced: str, workdir: Path, port: int) -> Path:
    """`fast`/`paced` are upstream base URLs (http://127.0.0.1:N)."""
    same = {"base_url": f"{fast}/v1"}
    doc = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": 10},
        "routing": {"primary": "llama"},
        "tiers": {
            "llama": {**same, "model": "llama3.1:8b", "aliases": ["llama3.1-8b"]},
            "ollama": {**same, "model": "qwen2.5:7b", "timeout_seconds": 20},
            "kimi": {
                **same,
                "model": "kimi-k2.5",
                "api_key_env": _KIMI_KEY_ENV,
                "paid": True,
                "price": {"input_per_mtok": 0.60, "cached_input_per_mtok": 0.15, "output_per_mtok": 2.50},
            },
            "sse": {"base_url": f"{fast}/stream/v1", "model": "llama3.1:8b"},
            "paced": {"base_url": f"{paced}/v1", "model": "llama3.1:8b"},
            # A ~2 KB JSON plan answer, for the quality gate's cost (bench/gatecost.py).
            "plan2k": {"base_url": f"{fast}/plan/v1", "model": "llama3.1:8b"},
        },
        "ledger": {"path": str(workdir / "ledger.db")},
    }
    path = workdir / "proxy-bench.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_proxy(fast: str, paced: str, workdir: Path) -> Service:
    port = free_port()
    config = proxy_config(fast, paced, workdir, port)
    exe = shutil.which("proxy") or str(Path(sys.executable).parent / "proxy")
    # As users run it: default log level, so one access line per request is written.
    argv = [exe, "serve", "--config", str(config), "--port", str(port)]
    env = {**os.environ, _KIMI_KEY_ENV: "sk-bench-unused"}
    return Service("proxy", pinned(PROXY_CORE, argv), port, workdir / "proxy.log", env).start(health="/readyz")


def ledger_rows(workdir: Path) -> int | None:
    """Rows in `requests` of the proxy's ledger; None when the proxy wrote no ledger (yet)."""
    path = workdir / "ledger.db"
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM requests").fetchone()[0])
    except sqlite3.Error as e:
        say(f"ledger at {path} cannot be read: {e}")
        return None


# ---------------------------------------------------------------------------- LiteLLM


def _litellm_bin() -> Path:
    return LITELLM_VENV / "bin" / "litellm"


def litellm_installed_version() -> str | None:
    py = LITELLM_VENV / "bin" / "python"
    if not py.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


def ensure_litellm() -> str:
    """Create bench/.litellm-venv with litellm[proxy]==LITELLM_VERSION unless it is there."""
    if litellm_installed_version() == LITELLM_VERSION and _litellm_bin().exists():
        return LITELLM_VERSION
    say(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (a few minutes)")
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    version = litellm_installed_version()
    if version != LITELLM_VERSION:
        raise RuntimeError(f"litellm install failed (found {version})")
    return version


def litellm_config(fast: str, paced: str, workdir: Path) -> Path:
    def deployment(name: str, model: str, base: str) -> dict[str, object]:
        return {
            "model_name": name,
            "litellm_params": {"model": f"openai/{model}", "api_base": base, "api_key": "sk-upstream-unused"},
        }

    doc = {
        "model_list": [
            deployment("bench", "llama3.1:8b", f"{fast}/v1"),
            deployment("bench-fallback", "qwen2.5:7b", f"{fast}/v1"),
            deployment("bench-sse", "llama3.1:8b", f"{fast}/stream/v1"),
            deployment("bench-paced", "llama3.1:8b", f"{paced}/v1"),
        ],
        "router_settings": {
            "fallbacks": [{"bench": ["bench-fallback"]}, {"bench-sse": ["bench-fallback"]}],
            "num_retries": 1,
        },
        "litellm_settings": {"request_timeout": 30, "telemetry": False},
        "general_settings": {"master_key": LITELLM_KEY},
    }
    path = workdir / "litellm-bench.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_floor(fast: str, paced: str, workdir: Path) -> Service:
    """bench/floor.py: a bare aiohttp forwarder, on the proxy's core."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", str(port), fast, paced]
    return Service("floor", pinned(PROXY_CORE, argv), port, workdir / "floor.log").start(health="/health")


def start_litellm(fast: str, paced: str, workdir: Path) -> Service:
    port = free_port()
    config = litellm_config(fast, paced, workdir)
    argv = [str(_litellm_bin()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    log_config = workdir / "litellm-logging.json"
    # uvicorn's per-request access log is off, as in a tuned deployment; errors still show.
    quiet = {"version": 1, "disable_existing_loggers": False, "loggers": {"uvicorn.access": {"level": "WARNING"}}}
    log_config.write_text(json.dumps(quiet))
    argv += ["--num_workers", "1", "--log_config", str(log_config)]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")}
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": LITELLM_KEY}
    env["PATH"] = f"{LITELLM_VENV / 'bin'}:{env.get('PATH', '')}"
    svc = Service("litellm", pinned(PROXY_CORE, argv), port, workdir / "litellm.log", env)
    return svc.start(timeout=180, health="/health/liveliness")
