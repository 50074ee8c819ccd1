"""deploy/: the Dockerfile, compose file, systemd unit and Kubernetes manifests agree with the code.

No docker, systemd or cluster needed: the files are parsed, and whatever they tell the proxy to do
(subcommand, flags, config, HTTP paths, ports) is checked against the real CLI parser, the real
config loader and the routes the real app registers.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.app import create_app
from proxy.cli import build_parser
from proxy.config import Config, build_config, load_config
from proxy.ops.serve import FIXED_DESCRIPTORS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_PATH = "/etc/proxy/proxy.yaml"
LEDGER_DIR = "/var/lib/proxy"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
KIMI_KEY_ENV = "MOONSHOT_API_KEY"
FREE_MODELS = {"llama": "llama3.1:8b", "ollama": "qwen2.5:7b"}

# Parametrized tests over these lists would be skipped, not failed, if a list came out empty:
# test_the_file_lists_hold_the_deploy_files guards them.
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
DEPLOY_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
# kustomization.yaml holds no cluster resource: test_k8s_kustomization_* check it.
K8S_RESOURCE_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_file_lists_hold_the_deploy_files() -> None:
    assert DEPLOY / "docker-compose.yml" in YAML_FILES and K8S / "deployment.yaml" in YAML_FILES, YAML_FILES
    assert {DEPLOY / "Dockerfile", DEPLOY / "proxy.service", SECRET_EXAMPLE} <= set(DEPLOY_FILES), DEPLOY_FILES
    assert {K8S / "deployment.yaml", K8S / "service.yaml", SECRET_EXAMPLE} <= set(K8S_RESOURCE_FILES)


# ------------------------------------------------------------------------------------ helpers


@cache
def routes() -> frozenset[str]:
    """The canonical paths of every resource the real app registers."""
    app = create_app(load_config(None, {}))
    return frozenset(r.resource.canonical for r in app.router.routes() if r.resource is not None)


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Parse with the real parser: an unknown subcommand or flag fails the test, naming the file."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `proxy {shlex.join(argv)}` is not accepted by proxy.cli.build_parser() ({e})")


def serve_args(argv: list[str], where: str) -> argparse.Namespace:
    args = parse_cli(argv, where)
    assert args.command == "serve", f"{where}: runs `proxy {args.command}`, not `proxy serve`"
    assert args.config == CONFIG_PATH, f"{where}: --config {args.config}"
    assert args.port is not None, f"{where}: no --port"
    assert args.db is not None and posixpath.dirname(args.db) == LEDGER_DIR, f"{where}: --db {args.db}"
    return args


def strip_proxy(argv: list[str], where: str) -> list[str]:
    """`proxy serve ...` or `/opt/.../bin/proxy serve ...` -> `serve ...`."""
    assert argv, f"{where}: empty command"
    assert posixpath.basename(argv[0]) == "proxy", f"{where}: runs {argv[0]!r}, not the `proxy` console script"
    return argv[1:]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_one(kind: str, path: Path) -> dict[str, Any]:
    docs = [d for d in load_yaml(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def duration_seconds(text: str | int | float) -> float:
    """Compose durations ('45s', '1m30s') and plain numbers of seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


# --------------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # also inside a continuation, as docker does
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        instr, _, rest = full.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [rest for instr, rest in dockerfile() if instr == name]


def final_stage() -> list[tuple[str, str]]:
    lines = dockerfile()
    last_from = max(i for i, (instr, _) in enumerate(lines) if instr == "FROM")
    return lines[last_from:]


def exec_form(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return shlex.split(text)


def docker_entrypoint() -> list[str]:
    entry = [rest for instr, rest in final_stage() if instr == "ENTRYPOINT"]
    return exec_form(entry[-1]) if entry else []


def docker_serve() -> argparse.Namespace:
    cmd = [rest for instr, rest in final_stage() if instr == "CMD"]
    argv = docker_entrypoint() + (exec_form(cmd[-1]) if cmd else [])
    return serve_args(strip_proxy(argv, "deploy/Dockerfile"), "deploy/Dockerfile ENTRYPOINT+CMD")


def test_dockerfile_serves_with_real_subcommand_and_flags() -> None:
    args = docker_serve()
    assert args.host == "0.0.0.0"
    assert args.port == 8080
    assert args.db == f"{LEDGER_DIR}/ledger.db"


def test_dockerfile_base_is_slim_python_311_or_newer() -> None:
    defaults = dict(arg.split("=", 1) for arg in instructions("ARG") if "=" in arg)
    bases = instructions("FROM")
    assert bases, "no FROM in deploy/Dockerfile"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base.split()[0])
        m = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?", image)
        assert m, f"FROM {base}: expected a python:3.x-slim image"
        assert (int(m.group(1)), int(m.group(2))) >= (3, 11), image


def test_dockerfile_builds_without_a_registry_for_its_frontend() -> None:
    """A `# syntax=` line makes BuildKit pull its frontend image first: no build where only the
    base image is at hand (a compose build here failed so)."""
    first = (DEPLOY / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first


def test_dockerfile_installs_the_package_without_pip_cache() -> None:
    runs = " ".join(instructions("RUN"))
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), "expected `pip install --no-cache-dir .`"


def test_dockerfile_runs_as_non_root() -> None:
    users = [rest for instr, rest in final_stage() if instr == "USER"]
    assert users, "no USER in the final stage: the proxy would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0"), users[-1]
    assert group not in ("root", "0"), users[-1]
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert user.isdigit(), f"USER {users[-1]}: use a numeric uid so runAsNonRoot can check it"


# Debian's base-passwd (passwd.master, group.master): on every Debian image before any RUN.
DEBIAN_USERS = set(
    [
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "_apt",
        "nobody",
    ]
)
DEBIAN_GROUPS = set(
    [
        "root",
        "daemon",
        "bin",
        "sys",
        "adm",
        "tty",
        "disk",
        "lp",
        "mail",
        "news",
        "uucp",
        "man",
        "proxy",
        "kmem",
        "dialout",
        "fax",
        "voice",
        "cdrom",
        "floppy",
        "tape",
        "sudo",
        "audio",
        "dip",
        "www-data",
        "backup",
        "operator",
        "list",
        "irc",
        "src",
        "shadow",
        "utmp",
        "video",
        "sasl",
        "plugdev",
        "staff",
        "games",
        "users",
        "nogroup",
    ]
)


def test_dockerfile_creates_no_user_or_group_debian_already_has() -> None:
    """`groupadd proxy` fails on a Debian base (a real build failed so): the name is taken."""
    runs = " ".join(r for instr, r in final_stage() if instr == "RUN")
    groups = re.findall(r"groupadd\b[^&;]*?\s([\w-]+)\s*(?:&&|;|$)", runs)
    users = re.findall(r"useradd\b[^&;]*?\s([\w-]+)\s*(?:&&|;|$)", runs)
    assert groups and users, runs
    assert not set(groups) & DEBIAN_GROUPS, groups
    assert not set(users) & DEBIAN_USERS, users


def test_dockerfile_healthcheck_hits_readyz_with_python() -> None:
    (check,) = instructions("HEALTHCHECK")
    port = docker_serve().port
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/\w+)", check)
    assert m, f"HEALTHCHECK does not fetch a local URL: {check}"
    assert int(m.group(1)) == port
    assert m.group(2) == "/readyz"
    assert m.group(2) in routes()
    assert "urllib" in check and "curl" not in check, "slim images have no curl"


def test_dockerfile_exposes_port_and_ledger_volume() -> None:
    args = docker_serve()
    exposed = {int(p.split("/")[0]) for e in instructions("EXPOSE") for p in e.split()}
    assert args.port in exposed
    volumes = {v for rest in instructions("VOLUME") for v in exec_form(rest)}
    assert posixpath.dirname(args.db) in volumes


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "Dockerfile.dockerignore is an allow-list starting with `*`"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for rest in instructions("COPY"):
        words = exec_form(rest)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words[:-1] if not w.startswith("--")]
    assert sources, "no COPY from the build context in deploy/Dockerfile"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the build context"
        assert src.rstrip("/") in allowed, f"COPY {src}: excluded by deploy/Dockerfile.dockerignore"


# ------------------------------------------------------------------------------------ systemd


def unit() -> dict[str, list[str]]:
    """Service-section settings; a key may repeat (SystemCallFilter=), so each maps to a list."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / "proxy.service").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"proxy.service: not a setting: {raw!r}"
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def service(key: str) -> str:
    values = unit().get(f"Service.{key}")
    assert values, f"proxy.service: no {key}="
    return values[-1]


def systemd_serve() -> argparse.Namespace:
    argv = shlex.split(service("ExecStart").lstrip("-@:+!"))
    return serve_args(strip_proxy(argv, "proxy.service ExecStart"), "proxy.service ExecStart")


def test_systemd_execstart_uses_real_subcommand_and_flags() -> None:
    args = systemd_serve()
    assert args.port == 8080
    assert args.db == f"/var/lib/{service('StateDirectory')}/ledger.db", "the ledger belongs in StateDirectory"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "proxy"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ],
)
def test_systemd_setting(key: str, expected: str) -> None:
    assert service(key) == expected


def test_systemd_user_syscalls_and_keys() -> None:
    settings = unit()
    assert service("DynamicUser") == "yes" or service("User") not in ("", "root", "0")
    # A dynamic user's name defaults to the unit's; a static user of that name would be used instead.
    user = settings.get("Service.User", ["proxy"])[-1]
    assert user not in DEBIAN_USERS, f"User={user}: Debian has a static user of that name; systemd would run as it"
    assert "@system-service" in settings["Service.SystemCallFilter"]
    assert service("EnvironmentFile").lstrip("-") == "/etc/proxy/proxy.env"
    assert "Service.MemoryDenyWriteExecute" in settings, "decide MemoryDenyWriteExecute explicitly"


def test_systemd_stop_timeout_exceeds_shutdown_timeout() -> None:
    default = load_config(None, {}).server.shutdown_timeout_seconds
    repo = load_config(ROOT / "proxy.yaml", {}).server.shutdown_timeout_seconds
    assert float(service("TimeoutStopSec").removesuffix("s")) > max(default, repo)


def descriptors_needed(config: Config) -> int:
    """What `proxy serve` warns about when the open-files limit is below it."""
    return config.server.max_connections + sum(t.max_connections for t in config.tiers) + FIXED_DESCRIPTORS


def test_systemd_open_files_limit_covers_max_connections() -> None:
    soft, _, hard = service("LimitNOFILE").partition(":")
    hard = hard or soft  # LimitNOFILE=N sets both
    # The seccomp filter denies setrlimit (~@resources): the proxy cannot raise the soft limit itself.
    assert "~@privileged @resources" in unit()["Service.SystemCallFilter"]
    assert soft == hard, "the proxy cannot raise its soft limit under this unit's seccomp filter"
    for config in (load_config(None, {}), load_config(ROOT / "proxy.yaml", {})):
        assert int(soft) >= descriptors_needed(config), "LimitNOFILE= is below what the config asks for"
    assert "2" in service("RestartPreventExitStatus").split(), "exit 2 (config, unusable ledger): no restart"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_systemd_analyze_verifies_the_unit_and_rates_it_hardened(tmp_path: Path) -> None:
    """systemd's own checks, offline: no unknown or misspelt setting, and an exposure of 1.4/10
    (`systemd-analyze security`; 10 is unprotected) must not creep up."""
    installed = service("ExecStart").split()[0]
    unit_file = tmp_path / "proxy.service"
    # verify also checks that ExecStart's binary exists: point it at this environment's `proxy`.
    unit_file.write_text(
        (DEPLOY / "proxy.service").read_text().replace(installed, str(Path(sys.executable).parent / "proxy"))
    )
    verify = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=15", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-600:] + security.stderr


# ------------------------------------------------------------------------------------- configs


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "docker-compose.yml")
    return doc


def compose_config_file() -> Path:
    """The file compose mounts at /etc/proxy/proxy.yaml in the proxy service."""
    for volume in compose()["services"]["proxy"]["volumes"]:
        src, _, rest = volume.partition(":")
        if rest.split(":")[0] == CONFIG_PATH:
            return (DEPLOY / src).resolve()
    raise AssertionError(f"docker-compose.yml: nothing is mounted at {CONFIG_PATH}")


def configmap_config() -> dict[str, Any]:
    cm = k8s_one("ConfigMap", K8S / "configmap.yaml")
    raw = yaml.safe_load(cm["data"][posixpath.basename(CONFIG_PATH)])
    assert isinstance(raw, dict)
    return raw


def deploy_configs() -> dict[str, dict[str, Any]]:
    path = compose_config_file()
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return {path.name: raw, "k8s/configmap.yaml": configmap_config()}


@pytest.mark.parametrize("name", ["proxy.docker.yaml", "k8s/configmap.yaml"])
def test_deploy_config_loads(name: str) -> None:
    raw = deploy_configs()[name]
    config = build_config(raw, name, env={})  # unknown keys and wrong types raise ConfigError
    assert {t.id for t in config.tiers} == {"llama", "ollama", "kimi"}
    for tier_id, model in FREE_MODELS.items():
        assert config.tier(tier_id).model == model
        assert config.tier(tier_id).usable
    kimi = config.tier("kimi")
    assert kimi.paid and kimi.api_key_env == KIMI_KEY_ENV
    assert not kimi.usable, "without the key in the environment the paid tier must be skipped"
    with_key = build_config(raw, name, env={KIMI_KEY_ENV: "placeholder"})
    assert all(t.usable for t in with_key.tiers)
    assert config.ledger.path == f"{LEDGER_DIR}/ledger.db", "ledger.path should name the --db file"
    assert config.server.port == 8080


def test_compose_config_is_the_image_default() -> None:
    """The Dockerfile bakes in the file compose mounts, so both start from the same config."""
    copies = [exec_form(rest) for rest in instructions("COPY")]
    assert [f"deploy/{compose_config_file().name}", CONFIG_PATH] in copies


# ------------------------------------------------------------------------------------- compose


def test_compose_proxy_service() -> None:
    services = compose()["services"]
    proxy = services["proxy"]
    build = proxy["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"

    command = proxy["command"]
    argv = docker_entrypoint() + (command if isinstance(command, list) else shlex.split(command))
    args = serve_args(strip_proxy(argv, "docker-compose.yml"), "docker-compose.yml proxy.command")
    published = [str(p).rsplit(":", 1)[-1] for p in proxy["ports"]]
    assert str(args.port) in published

    test = " ".join(proxy["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/readyz" in test and "/readyz" in routes()

    config = build_config(deploy_configs()["proxy.docker.yaml"], "proxy.docker.yaml", env={})
    assert duration_seconds(proxy["stop_grace_period"]) > config.server.shutdown_timeout_seconds

    volumes = compose()["volumes"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    assert mounts[posixpath.dirname(args.db)] in volumes, "the ledger should be on a named volume"

    env_files = [e["path"] if isinstance(e, dict) else e for e in proxy["env_file"]]
    assert "./proxy.env" in env_files
    assert "proxy.env" in (DEPLOY / ".gitignore").read_text().split(), "the filled-in proxy.env must not be committed"


def test_compose_open_files_limit_covers_max_connections() -> None:
    nofile = compose()["services"]["proxy"]["ulimits"]["nofile"]
    soft, hard = (nofile, nofile) if isinstance(nofile, int) else (nofile["soft"], nofile["hard"])
    config = build_config(deploy_configs()["proxy.docker.yaml"], "proxy.docker.yaml", env={})
    assert min(soft, hard) >= descriptors_needed(config)


def test_k8s_workloads_say_how_the_open_files_limit_is_set() -> None:
    """Kubernetes has no nofile field: the manifests point at the README section that explains it."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "### Open files in Kubernetes" in readme
    for file in ("deployment.yaml", "statefulset.example.yaml"):
        text = (K8S / file).read_text(encoding="utf-8")
        assert "raises its soft limit to the hard one" in text and '"Open files"' in text, file


def test_compose_ollama_and_model_pull() -> None:
    services = compose()["services"]
    ollama = services["ollama"]
    assert ollama["image"].split(":")[0] == "ollama/ollama"
    assert ollama["healthcheck"]["test"]
    models_volume = next(v.split(":")[0] for v in ollama["volumes"] if v.split(":")[1] == "/root/.ollama")
    assert models_volume in compose()["volumes"]

    depends = services["proxy"]["depends_on"]
    assert depends["ollama"]["condition"] == "service_healthy"
    init = [name for name, d in depends.items() if d["condition"] == "service_completed_successfully"]
    assert len(init) == 1, "the proxy should wait for the one-shot model pull"
    pull = services[init[0]]
    assert pull["restart"] == "no"
    assert pull["depends_on"]["ollama"]["condition"] == "service_healthy"
    script = " ".join(pull.get("entrypoint", []) + pull.get("command", []))
    config = build_config(deploy_configs()["proxy.docker.yaml"], "proxy.docker.yaml", env={})
    for tier_id in FREE_MODELS:
        tier = config.tier(tier_id)
        assert tier.model in script, f"the pull does not fetch {tier.model}, the {tier_id} tier's model"
        assert tier.base_url == "http://ollama:11434/v1"


# ----------------------------------------------------------------------------------------- k8s


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(match)


@pytest.mark.parametrize(
    ("file", "kind"), [("deployment.yaml", "Deployment"), ("statefulset.example.yaml", "StatefulSet")]
)
def test_k8s_workload(file: str, kind: str) -> None:
    wl = k8s_one(kind, K8S / file)
    name = f"k8s/{file}"
    pod = wl["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container["args"], f"{name} args")
    assert "command" not in container, "keep the image's ENTRYPOINT (proxy); pass only args"
    assert docker_entrypoint() == ["proxy"]

    ports = [p["containerPort"] for p in container["ports"]]
    assert ports == [args.port]

    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz" and ready["path"] == "/readyz"
    assert {live["path"], ready["path"]} <= routes()
    assert container_port(container, live["port"]) == container_port(container, ready["port"]) == args.port

    service_doc = k8s_one("Service", K8S / "service.yaml")
    (svc_port,) = service_doc["spec"]["ports"]
    assert container_port(container, svc_port["targetPort"]) == args.port
    labels = wl["spec"]["template"]["metadata"]["labels"]
    # An empty selector is a subset of any labels, and selects every pod or none.
    assert service_doc["spec"]["selector"] and service_doc["spec"]["selector"].items() <= labels.items()
    assert wl["spec"]["selector"]["matchLabels"] and wl["spec"]["selector"]["matchLabels"].items() <= labels.items()

    sc, psc = container["securityContext"], pod["securityContext"]
    assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm = k8s_one("ConfigMap", K8S / "configmap.yaml")
    config_volume = volumes[mounts[posixpath.dirname(args.config)]]
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    assert posixpath.basename(args.config) in cm["data"]
    assert "emptyDir" in volumes[mounts["/tmp"]]

    ledger = mounts[posixpath.dirname(args.db)]
    if kind == "Deployment":
        assert wl["spec"]["replicas"] == 1, "one writer per SQLite ledger"
        assert wl["spec"]["strategy"]["type"] == "Recreate", "a rolling update would run two writers"
        pvc = k8s_one("PersistentVolumeClaim", K8S / "pvc.yaml")
        assert volumes[ledger]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    else:
        templates = [t["metadata"]["name"] for t in wl["spec"]["volumeClaimTemplates"]]
        assert ledger in templates and ledger not in volumes, "each replica needs its own ledger claim"

    secret = k8s_one("Secret", SECRET_EXAMPLE)
    from_secret = {}
    for env in container["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        from_secret[env["name"]] = secret["stringData"][ref["key"]]
    assert KIMI_KEY_ENV in from_secret

    raw = configmap_config()
    client_envs = {k["secret_env"] for k in raw["auth"]["keys"]}
    assert client_envs and client_envs <= set(from_secret), "every client key's variable comes from the Secret"
    config = build_config(raw, "k8s/configmap.yaml", env=from_secret)
    assert config.auth_required and len(config.client_keys) == len(client_envs), "a ClusterIP is open to every pod"
    assert not config.warnings, config.warnings
    without = build_config(raw, "k8s/configmap.yaml", env={})
    assert without.auth_required and not without.client_keys, "no Secret: closed, not open"
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_seconds


# The oldest Kubernetes release still supported upstream when this was written, and the newest the
# schemas know: a field added or removed in between shows up here.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_RESOURCE_FILES, ids=lambda p: p.name)
def test_k8s_manifest_matches_kubernetes_schema(path: Path, version: str) -> None:
    """Strict: a misspelt or misplaced field (`readynessProbe`) is an error, as kubectl's
    server-side field validation would make it."""
    docs = [d for d in load_yaml(path) if not d.get("apiVersion", "").startswith("kustomize.config.k8s.io/")]
    assert docs, f"{path.name}: no cluster resource to validate"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")
def test_kubectl_kustomize_renders_what_apply_k_would_send() -> None:
    """`kubectl apply -k deploy/k8s` sends what `kubectl kustomize` renders: the resources, valid."""
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"], kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_k8s_kustomization_lists_existing_files_but_not_the_example_secret() -> None:
    (kust,) = load_yaml(K8S / "kustomization.yaml")
    assert kust["resources"], "kustomization.yaml lists no resources"
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource
        assert "example" not in resource, f"{resource} is an example, not for `kubectl apply -k`"


# ------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs)


PLACEHOLDER = re.compile(r"REPLACE|CHANGE_?ME|<[^>]+>", re.IGNORECASE)
# `NAME = value` or `NAME: value` where NAME says key/secret/token/password and the value ends the line
# (or is followed by a comment, a comma, a brace or a backslash): prose like "no Secret: the ..." is not one.
ASSIGNMENT = re.compile(
    r"""(?imx) \b([\w.-]*(?:api[_-]?key|secret|token|passw(?:or)?d)[\w-]*)\b ["']? [ \t]* [:=] [ \t]*
        ["']?([^\s"'#,]*)["']? [ \t]* (?=$|[#,}\\])"""
)
KEY_SHAPED = [
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # OpenAI / Moonshot style
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(?:AKIA|ghp_|gho_|github_pat_|xox[bp]-|AIza)[A-Za-z0-9_-]{10,}"),
]


def harmless(value: str) -> bool:
    """Empty, a variable reference, the *name* of an environment variable, or a boolean."""
    return (
        value in ("", "true", "false", "yes", "no", "null")
        or value.startswith("$")
        or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None
    )


def high_entropy(token: str) -> bool:
    classes = sum(bool(re.search(c, token)) for c in ("[a-z]", "[A-Z]", "[0-9]"))
    return len(token) >= 32 and classes == 3


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_secret_looking_values(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern in KEY_SHAPED:
        found = pattern.search(text)
        assert found is None, f"{path.name}: looks like a real key: {found.group(0)[:6]}..."
    for token in re.findall(r"[A-Za-z0-9+/=_-]{32,}", text):
        assert not high_entropy(token), f"{path.name}: high-entropy value {token[:8]}..."
    for name, value in ASSIGNMENT.findall(text):
        if harmless(value):
            continue
        assert path == SECRET_EXAMPLE and PLACEHOLDER.search(value), f"{path.name}: {name} = {value!r}"


def test_secret_example_holds_only_placeholders() -> None:
    secret = k8s_one("Secret", SECRET_EXAMPLE)
    assert "data" not in secret, "base64 `data:` hides what the value is; use stringData placeholders"
    assert secret["stringData"]
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER.search(value), f"secret.example.yaml: {key} is not an obvious placeholder"
    assert "EXAMPLE" in SECRET_EXAMPLE.read_text().upper().split("\n", 1)[0]


# ------------------------------------------------------- several replicas: PostgreSQL and Redis

SHARED = K8S / "shared"
SHARED_ENV = {KIMI_KEY_ENV: "placeholder", "PROXY_CLIENT_KEY": "placeholder"}


def assert_shared_config(config: Config, where: str) -> None:
    assert config.ledger.url is not None and config.ledger.url.startswith("postgresql://"), where
    assert config.state.url is not None and config.state.url.startswith("redis://"), where
    assert posixpath.dirname(config.ledger.path) == LEDGER_DIR, f"{where}: the spill file and journal"
    assert ":" not in config.ledger.url.split("://", 1)[1].split("@", 1)[0], f"{where}: no password in the url"


def test_compose_shared_profile_runs_postgres_redis_and_a_proxy_with_workers_against_them() -> None:
    services = compose()["services"]
    for name in ("postgres", "redis", "proxy-shared"):
        assert services[name]["profiles"] == ["shared"], f"{name} only with --profile shared"
    for name in ("ollama", "ollama-pull", "proxy"):
        assert "profiles" not in services[name], f"{name} starts without a profile"
    shared = services["proxy-shared"]
    args = parse_cli(strip_proxy(docker_entrypoint() + shared["command"], "proxy-shared"), "proxy-shared")
    assert args.command == "serve" and args.config == CONFIG_PATH and args.workers >= 2
    assert args.db is None, "--db would override ledger.url"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in shared["volumes"]}
    path = (DEPLOY / mounts[CONFIG_PATH]).resolve()
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    password_env = raw["ledger"]["password_env"]
    config = build_config(raw, path.name, env={password_env: "placeholder"})
    assert_shared_config(config, path.name)
    assert config.ledger.url is not None and "@postgres:" in config.ledger.url and "redis:6379" in str(config.state.url)
    assert mounts[LEDGER_DIR] in compose()["volumes"]
    assert duration_seconds(shared["stop_grace_period"]) > config.server.shutdown_timeout_seconds
    pg = services["postgres"]
    assert pg["environment"]["POSTGRES_USER"] == "proxy" and pg["environment"]["POSTGRES_DB"] == "proxy"
    assert f"{password_env}=" in (DEPLOY / "proxy.env.example").read_text().splitlines()
    assert password_env == "POSTGRES_PASSWORD", "the postgres image and the proxy read the same variable"
    assert shared["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert shared["depends_on"]["redis"]["condition"] == "service_healthy"
    published = {str(p).rsplit(":", 2)[-2] for p in shared["ports"]}
    assert published.isdisjoint(str(p).rsplit(":", 2)[-2] for p in services["proxy"]["ports"]), "distinct host ports"


SHARED_FILES = sorted(p for p in SHARED.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_shared_k8s_files_exist() -> None:
    assert {p.name for p in SHARED_FILES} == {"configmap.yaml", "deployment.yaml", "service.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.name)
def test_k8s_shared_manifest_matches_kubernetes_schema(path: Path, version: str) -> None:
    for doc in load_yaml(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_shared_deployment_runs_several_replicas_against_postgres_and_redis() -> None:
    wl = k8s_one("Deployment", SHARED / "deployment.yaml")
    assert wl["spec"]["replicas"] >= 2 and wl["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = wl["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse_cli(container["args"], "shared/deployment.yaml")
    assert args.command == "serve" and args.config == CONFIG_PATH and args.db is None and args.workers >= 2
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not any("persistentVolumeClaim" in v for v in volumes.values()), "no per-replica ledger"
    cm = k8s_one("ConfigMap", SHARED / "configmap.yaml")
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    raw = yaml.safe_load(cm["data"][posixpath.basename(CONFIG_PATH)])
    secret = k8s_one("Secret", SECRET_EXAMPLE)
    env = {}
    for e in container["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref
        env[e["name"]] = secret["stringData"][ref["key"]]
    assert raw["ledger"]["password_env"] in env, "the PostgreSQL password comes from the Secret"
    config = build_config(raw, "k8s/shared/configmap.yaml", env=env)
    assert_shared_config(config, "k8s/shared/configmap.yaml")
    assert config.auth_required and not config.warnings, config.warnings
    # Every process counted while Redis is lost, even one whose heartbeat never saw the others.
    assert config.state.processes >= wl["spec"]["replicas"] * args.workers
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_seconds
    service = k8s_one("Service", SHARED / "service.yaml")
    assert service == k8s_one("Service", K8S / "service.yaml"), "the same Service as deploy/k8s"
    labels = wl["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_shared_kustomization_lists_its_files() -> None:
    (kust,) = load_yaml(SHARED / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(p.name for p in SHARED_FILES)


def test_the_statefulset_is_labelled_as_the_no_database_option() -> None:
    head = (K8S / "statefulset.example.yaml").read_text(encoding="utf-8").split("apiVersion:", 1)[0]
    assert "NO-DATABASE OPTION" in head and "shared/" in head and "N times each budget" in head


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")
def test_kubectl_kustomize_renders_the_shared_variant() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(SHARED)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout) if d)
    assert kinds == ["ConfigMap", "Deployment", "Service"], kinds


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="needs docker compose")
@pytest.mark.parametrize("profile", [[], ["--profile", "shared"]], ids=["default", "shared"])
def test_docker_compose_accepts_the_file(profile: list[str]) -> None:
    argv = ["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), *profile, "config", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
