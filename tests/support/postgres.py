"""A real PostgreSQL server for the tests: Debian's `initdb` / `pg_ctl` in a temporary directory,
on a loopback port, with password authentication over TCP.

As root (CI, the dev VMs) the server runs as the `postgres` user through `runuser`, since
PostgreSQL refuses to run as root. Without the binaries the tests skip, or fail with the install
command when PROXY_REQUIRE_POSTGRES=1 (set by .ci/run, which installs them).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.proc import free_port

REQUIRE = "PROXY_REQUIRE_POSTGRES"
INSTALL = "apt-get install -y postgresql"
USER = "proxy"


def find_bindir() -> Path | None:
    """Debian's versioned bin directory (the newest), or wherever `initdb` is on PATH."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def require_bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        msg = f"PostgreSQL's initdb/pg_ctl not found: {INSTALL}"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {msg}")
        pytest.skip(msg)
    return bindir


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    _n: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, db: str = "postgres", *, with_password: bool = True) -> str:
        auth = f"{USER}:{self.password}" if with_password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def init(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        opts = f"-k {self.root} -p {self.port} -h 127.0.0.1 -c fsync=off"  # no fsync: the OS outlives a stopped server
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is the nearest to a kill: no checkpoint, connections cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = self._run("psql", "-h", str(self.root), "-p", str(self.port), "-U", USER, "-d", db,
                        "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql)  # fmt: skip
        return out.stdout

    def new_database(self) -> str:
        """A fresh empty database; returns its URL (with the password)."""
        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)


def start_server() -> PostgresServer:
    bindir = require_bindir()
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="proxy-pg-")))
    try:
        server.init()
        server.start()
    except subprocess.CalledProcessError as e:
        log = server.root / "log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        shutil.rmtree(server.root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {e.stderr or e.stdout}\n{detail}")
    return server


def remove(server: PostgresServer) -> None:
    server.stop("immediate")
    shutil.rmtree(server.root, ignore_errors=True)
