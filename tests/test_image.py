"""The image deploy/Dockerfile builds, run as deploy/README.md runs it, on a real Docker engine.

Needs an engine (`docker info` answers): `.ci/docker-engine` starts one on a machine that has
none, and CI runs it with PROXY_REQUIRE_DOCKER=1, so that a missing engine fails there instead of
skipping. The container runs with the host's network (the fake upstreams listen on loopback) and
with the README's hardening flags; everything it does is checked from outside, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.sim import SIM_STATS, SimSettings, create_sim_app
from tests.support.secret_scan import KIMI_KEY

ROOT = Path(__file__).resolve().parent.parent
TAG = "proxy:test"
PORT = 8080  # the image's CMD and HEALTHCHECK port, used as shipped
MSG = {"model": "auto", "messages": [{"role": "user", "content": "plan"}]}


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done


def _engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if not _engine():
        if os.environ.get("PROXY_REQUIRE_DOCKER") == "1":
            pytest.fail("PROXY_REQUIRE_DOCKER=1 but no Docker engine answers: run .ci/docker-engine")
        pytest.skip("no Docker engine (run .ci/docker-engine to start one)")
    docker("build", "-q", "-f", "deploy/Dockerfile", "-t", TAG, str(ROOT), timeout=900)
    yield TAG


def test_image_checks_its_config_as_a_numeric_non_root_user(image: str) -> None:
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    check = docker("run", "--rm", image, "check", "--config", "/etc/proxy/proxy.yaml")
    assert "llama" in check.stdout, check.stdout


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


async def _wait_healthy(name: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    status = ""
    while time.monotonic() < deadline:
        inspect = await asyncio.to_thread(docker, "inspect", "--format", "{{json .State}}", name)
        state = json.loads(inspect.stdout)
        status = state.get("Health", {}).get("Status", "")
        if status == "healthy" or not state["Running"]:
            return status
        await asyncio.sleep(0.3)
    return status


async def test_container_serves_reloads_and_stops_cleanly(
    image: str, tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is taken on this machine: the image's HEALTHCHECK needs it")
    sims = {}
    for name in ("llama", "kimi"):
        app = create_sim_app(SimSettings(name=name))
        server = await aiohttp_server(app)
        sims[name] = (str(server.make_url("/v1")), app[SIM_STATS])
    config = {
        "server": {"host": "0.0.0.0", "port": PORT, "shutdown_timeout_seconds": 10},
        "tiers": {
            "llama": {"base_url": sims["llama"][0], "model": "llama3.1:8b", "timeout_seconds": 5},
            "kimi": {
                "base_url": sims["kimi"][0],
                "model": "kimi-k2.5",
                "paid": True,
                "api_key_env": "MOONSHOT_API_KEY",
            },
        },
        "ledger": {"path": "/var/lib/proxy/ledger.db"},
    }
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cfg.chmod(0o644)
    name, volume = f"proxy-test-{uuid.uuid4().hex[:8]}", f"proxy-test-ledger-{uuid.uuid4().hex[:8]}"
    run = ["run", "-d", "--name", name, "--init", "--network", "host", "--env", f"MOONSHOT_API_KEY={KIMI_KEY}"]
    run += ["-v", f"{cfg}:/etc/proxy/proxy.yaml:ro", "-v", f"{volume}:/var/lib/proxy"]
    run += ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    run += ["--stop-timeout", "45", "--health-interval", "1s", "--health-start-period", "1s", image]
    try:
        await asyncio.to_thread(docker, *run)
        assert await _wait_healthy(name, 60) == "healthy", docker("logs", name, check=False).stderr[-3000:]
        url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=MSG) as r:
                assert r.status == 200 and r.headers["X-Proxy-Tier"] == "llama"
            async with s.post(url, json={**MSG, "stream": True}, headers={"X-Complexity": "complex"}) as r:
                assert r.status == 200 and r.headers["X-Proxy-Tier"] == "kimi"
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
        assert sims["kimi"][1].requests[-1].headers["authorization"] == f"Bearer {KIMI_KEY}"

        config["tiers"]["llama"]["model"] = "llama3.1:8b-reloaded"
        cfg.write_text(yaml.safe_dump(config))
        await asyncio.to_thread(docker, "kill", "-s", "HUP", name)
        for _ in range(100):
            if "reloaded" in docker("logs", name).stderr:
                break
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s, s.post(url, json=MSG) as r:
            assert r.headers["X-Proxy-Model"] == "llama3.1:8b-reloaded"

        await asyncio.to_thread(docker, "stop", name, timeout=60)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        assert state["ExitCode"] == 0, state
        logs = docker("logs", name)
        assert KIMI_KEY not in logs.stdout + logs.stderr

        count = "import sqlite3; print(sqlite3.connect('/var/lib/proxy/ledger.db').execute("
        count += "'SELECT count(*), group_concat(DISTINCT tier) FROM requests').fetchone())"
        ledger = docker("run", "--rm", "-v", f"{volume}:/var/lib/proxy", "--entrypoint", "python", image, "-c", count)
        assert ledger.stdout.strip() in ("(3, 'llama,kimi')", "(3, 'kimi,llama')"), ledger.stdout
        owner = docker(
            "run",
            "--rm",
            "-v",
            f"{volume}:/var/lib/proxy",
            "--entrypoint",
            "stat",
            image,
            "-c",
            "%u",
            "/var/lib/proxy/ledger.db",
        )
        assert owner.stdout.strip() == "10001"
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def compose(
    project: str, files: list[Path], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    flags = [a for f in files for a in ("-f", str(f))]
    return docker("compose", "-p", project, *flags, *args, timeout=timeout, check=check)


@pytest.fixture
def ollama_standin(image: str, tmp_path: Path) -> str:
    """The ollama/ollama image's stand-in: the proxy image (aiohttp, proxy.sim) plus an
    `ollama` command (tests/support/ollama_standin.py), running as root like the real one."""
    if docker("compose", "version", check=False).returncode != 0:
        pytest.fail("no `docker compose` (v2.24+) plugin: run .ci/docker-engine")
    ctx = tmp_path / "standin"
    ctx.mkdir()
    shutil.copy(ROOT / "tests" / "support" / "ollama_standin.py", ctx / "ollama")
    (ctx / "Dockerfile").write_text(
        f"FROM {image}\nUSER root\nCOPY ollama /usr/local/bin/ollama\n"
        "RUN chmod 0755 /usr/local/bin/ollama && mkdir -p /root/.ollama\n"
        'ENTRYPOINT ["ollama"]\nCMD ["serve"]\n'
    )
    tag = "proxy-test/ollama-standin:latest"
    docker("build", "-q", "-t", tag, str(ctx), timeout=300)
    return tag


async def test_compose_starts_proxy_after_ollama_and_the_pull(image: str, ollama_standin: str, tmp_path: Path) -> None:
    """deploy/docker-compose.yml as the README runs it, the Ollama image replaced by the stand-in
    and health checks every second (an override file changes only those)."""
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is taken on this machine: compose publishes the proxy there")
    override = tmp_path / "override.yml"
    fast = {"interval": "1s", "start_period": "1s"}
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "ollama": {"image": ollama_standin, "healthcheck": fast},
                    "ollama-pull": {"image": ollama_standin},
                    "proxy": {"image": image, "healthcheck": fast},
                }
            }
        )
    )
    files = [ROOT / "deploy" / "docker-compose.yml", override]
    project = f"proxy-test-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(compose, project, files, "up", "-d", "--build", timeout=900)
        pull = compose(project, files, "logs", "--no-log-prefix", "ollama-pull").stdout
        assert "llama3.1:8b: pulling" in pull and "qwen2.5:7b: pulling" in pull, pull
        proxy = f"{project}-proxy-1"
        assert await _wait_healthy(proxy, 60) == "healthy", compose(project, files, "logs", "proxy").stdout[-3000:]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{PORT}/readyz") as r:
                ready = await r.json()
                assert r.status == 200 and not ready["tiers"]["kimi"]["usable"], ready
            url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
            async with s.post(url, json=MSG) as r:
                assert r.status == 200 and r.headers["X-Proxy-Tier"] == "llama", await r.text()
            async with s.post(url, json=MSG, headers={"X-Complexity": "complex"}) as r:
                assert r.status == 200 and r.headers["X-Proxy-Tier"] != "kimi", "no key in proxy.env: kimi is skipped"

        # A second start finds the models on the volume and pulls nothing.
        compose(project, files, "rm", "-f", "-s", "ollama-pull")
        await asyncio.to_thread(compose, project, files, "up", "-d", timeout=300)
        again = compose(project, files, "logs", "--no-log-prefix", "ollama-pull").stdout
        assert "llama3.1:8b: present" in again and "qwen2.5:7b: present" in again, again

        compose(project, files, "kill", "-s", "HUP", "proxy")
        for _ in range(100):
            if "reloaded /etc/proxy/proxy.yaml" in compose(project, files, "logs", "proxy").stdout:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no reload after SIGHUP:\n" + compose(project, files, "logs", "proxy").stdout[-2000:])
        await asyncio.to_thread(compose, project, files, "stop", "proxy", timeout=120)
        state = json.loads(docker("inspect", "--format", "{{json .State}}", proxy).stdout)
        assert state["ExitCode"] == 0, state
        assert (
            "ledger /var/lib/proxy/ledger.db closed: 2 requests written"
            in compose(project, files, "logs", "proxy").stdout
        )
    finally:
        compose(project, files, "down", "-v", "--remove-orphans", timeout=300, check=False)


def readme_systemd_commands() -> list[str]:
    """deploy/README.md's systemd block, one shell line each, `sudo` and comments dropped (the
    container runs them as root); `journalctl -f` would follow forever, so it is left out."""
    text = (ROOT / "deploy" / "README.md").read_text()
    block = text.split("## systemd", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = []
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].replace("sudo ", "").strip()
        lines.append(line.replace("; journalctl -u proxy -f", ""))
    return [line for line in lines if line]


@pytest.fixture
def systemd_box(image: str, tmp_path: Path) -> Iterator[str]:
    """A container with systemd as PID 1 (Debian bookworm, the base image plus systemd and
    procps), the repository copied to /src, nothing of the proxy installed."""
    ctx = tmp_path / "systemd"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM python:3.11-slim-bookworm\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd systemd-sysv procps"
        " >/dev/null && rm -rf /var/lib/apt/lists/*\n"
        'STOPSIGNAL SIGRTMIN+3\nCMD ["/sbin/init"]\n'
    )
    docker("build", "-q", "-t", "proxy-test/systemd", str(ctx), timeout=600)
    name = f"proxy-test-systemd-{uuid.uuid4().hex[:8]}"
    # systemd needs to mount (CAP_SYS_ADMIN) and its cgroups; the sandbox refuses --privileged.
    run = ["run", "-d", "--name", name, "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined"]
    run += ["--security-opt", "apparmor=unconfined", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]
    run += ["--tmpfs", "/run", "--tmpfs", "/run/lock", "proxy-test/systemd"]
    docker(*run)
    try:
        for _ in range(100):
            state = docker("exec", name, "systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)
        files = ["pyproject.toml", "README.md", "proxy", "proxy.yaml", "deploy"]
        tar = subprocess.run(["tar", "-C", str(ROOT), "-c", *files], capture_output=True, check=True).stdout
        docker("exec", name, "mkdir", "/src")
        subprocess.run(["docker", "exec", "-i", name, "tar", "-x", "-C", "/src"], input=tar, check=True, timeout=60)
        yield name
    finally:
        docker("rm", "-f", name, check=False)


def test_readme_systemd_steps_run_the_hardened_unit_under_systemd(systemd_box: str) -> None:
    """Every command of deploy/README.md's systemd section, in order, under a real systemd: the
    unit's sandboxing (dynamic user, seccomp filter, W^X memory, read-only system) lets the proxy
    serve a call and a stream, reload and stop cleanly."""

    def sh(command: str, timeout: float = 300) -> str:
        done = docker("exec", "-w", "/src", systemd_box, "sh", "-c", command, timeout=timeout, check=False)
        assert done.returncode == 0, (
            f"`{command}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
        return done.stdout

    commands = readme_systemd_commands()
    start = next(i for i, c in enumerate(commands) if "enable --now" in c)
    for command in commands[: start + 1]:
        sh(command, timeout=600)
    # proxy.yaml's llama and ollama tiers are an Ollama at localhost:11434: a simulated one.
    sim = "from aiohttp import web; from proxy.sim import create_sim_app as app; "
    sim += "web.run_app(app(), host='127.0.0.1', port=11434, print=None)"
    docker("exec", "-d", systemd_box, "/opt/proxy/venv/bin/python", "-c", sim)
    call = (
        "import json, sys, time, urllib.request as u\n"
        "msgs = [{'role': 'user', 'content': 'hi'}]\n"
        "body = json.dumps({'model': 'auto', 'stream': sys.argv[1] == 's', 'messages': msgs})\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        r = u.urlopen(u.Request('http://127.0.0.1:8080/v1/chat/completions', body.encode(),"
        " {'Content-Type': 'application/json'}), timeout=5)\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "print(r.status, r.headers['X-Proxy-Tier'], r.read()[-14:])\n"
    )
    assert sh(f'python3 -c "{call}" p').startswith("200 llama")
    assert sh(f'python3 -c "{call}" s').strip() == "200 llama b'data: [DONE]\\n\\n'"
    user = sh("ps -o user= -p $(systemctl show -p MainPID --value proxy)").strip()
    assert user == "llmproxy", f"the service runs as {user!r}, not its dynamic user"

    for command in commands[start + 1 :]:
        sh(command)
    journal = sh("journalctl -u proxy --no-pager")
    assert "reloaded /etc/proxy/proxy.yaml" in journal, journal[-2000:]
    assert "Requests: 2" in sh("/opt/proxy/venv/bin/proxy report --db /var/lib/proxy/ledger.db --since all")

    sh("systemctl stop proxy")
    status = sh("systemctl show proxy -p Result -p ExecMainStatus")
    assert "Result=success" in status and "ExecMainStatus=0" in status, status
    assert "closed: 2 requests written, 0 spilled, 0 lost" in sh("journalctl -u proxy --no-pager")
