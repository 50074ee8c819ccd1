"""Run the real llama.cpp HTTP server (from the ``xllamacpp`` wheel) for tests.

By default the server runs in a child process (``python -m
tests.support.llamacpp MODEL [PORT]``) so that a llama.cpp abort
(``GGML_ASSERT``) can never take the test runner down, its log goes to a file
instead of the pytest output, and it can always be killed. ``in_process=True``
runs ``xllamacpp.Server`` inside the current interpreter instead (a bit
faster; the HTTP server and the inference loop are native threads that do not
need the GIL, so an asyncio client in the same process works too).

Typical session fixture::

    @pytest.fixture(scope="session")
    def llamacpp(tmp_path_factory):
        model = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")
        server = LlamaCppServer()
        server.start(model)          # -> "http://127.0.0.1:PORT/v1"
        yield server                 # server.base_url, server.model, ...
        server.stop()
"""

from __future__ import annotations

import argparse
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ALIAS = "tiny-llama"
HOST = "127.0.0.1"
_ANNOUNCE = "LLAMACPP_LISTENING "

# Repo root (…/tests/support/llamacpp.py -> …), so `-m tests.support.llamacpp`
# resolves no matter what the caller's cwd is.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class LlamaCppServerError(RuntimeError):
    """The llama.cpp server failed to start (message includes its log tail)."""


def make_params(
    model_path: str | os.PathLike[str],
    *,
    port: int = 0,
    host: str = HOST,
    alias: str = DEFAULT_ALIAS,
    n_parallel: int = 4,
    n_ctx_per_slot: int = 512,
    n_threads: int = 1,
    n_threads_http: int | None = None,
    seed: int | None = 42,
    verbosity: int | None = None,
    embeddings: bool = False,
    pooling: str = "mean",
) -> Any:
    """Build an ``xllamacpp.CommonParams`` for a small CPU-only test server.

    ``port=0`` lets the OS pick a free port; the real address is then
    ``xllamacpp.Server(...).listening_address``. ``embeddings=True`` turns on
    ``/v1/embeddings`` (llama.cpp's ``--embeddings``) with ``pooling`` (none,
    mean, cls, last) over the token vectors; completions are still served.
    """
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = str(model_path)
    p.n_parallel = n_parallel
    p.n_ctx = n_ctx_per_slot * n_parallel  # split evenly across the slots
    p.port = port
    p.hostnames = [host]  # must be a list
    p.model_alias = {alias}  # must be a set; a str would become a set of chars
    p.cpuparams.n_threads = n_threads
    p.cpuparams_batch.n_threads = n_threads
    # Every in-flight (streaming) request holds one HTTP thread; keep spare
    # ones for /health, /v1/models and requests queued behind busy slots.
    p.n_threads_http = n_threads_http if n_threads_http else max(8, 2 * n_parallel + 2)
    p.n_gpu_layers = 0
    if seed is not None:
        p.sampling.seed = seed  # default is random; per-request "seed" overrides
    if verbosity is not None:
        p.verbosity = verbosity
    if embeddings:
        p.embedding = True
        p.pooling_type = getattr(xllamacpp.llama_pooling_type, f"LLAMA_POOLING_TYPE_{pooling.upper()}")
    return p


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class LlamaCppServer:
    """Start/stop a llama.cpp server on loopback serving one GGUF model."""

    def __init__(
        self,
        *,
        alias: str = DEFAULT_ALIAS,
        n_parallel: int = 4,
        n_ctx_per_slot: int = 512,
        n_threads: int = 1,
        port: int = 0,
        seed: int | None = 42,
        verbosity: int | None = None,
        startup_timeout: float = 30.0,
        in_process: bool = False,
        log_path: str | os.PathLike[str] | None = None,
        embeddings: bool = False,
        pooling: str = "mean",
    ) -> None:
        self.alias = alias
        self.n_parallel = n_parallel
        self.n_ctx_per_slot = n_ctx_per_slot
        self.n_threads = n_threads
        self.requested_port = port
        self.seed = seed
        self.verbosity = verbosity
        self.startup_timeout = startup_timeout
        self.in_process = in_process
        self._log_path_arg = pathlib.Path(log_path) if log_path else None
        self.embeddings = embeddings
        self.pooling = pooling

        self.log_path: pathlib.Path | None = None
        self.root_url: str | None = None  # "http://127.0.0.1:PORT"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: Any = None  # xllamacpp.Server when in_process
        self._own_log = False

    # -- public API ---------------------------------------------------------

    @property
    def model(self) -> str:
        """The model id to put in requests (the alias)."""
        return self.alias

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self.root_url is None:
            raise RuntimeError("server not started")
        return self.root_url + "/v1"

    @property
    def port(self) -> int:
        if self.root_url is None:
            raise RuntimeError("server not started")
        return int(self.root_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        if self.in_process:
            return self._server is not None
        return self._proc is not None and self._proc.poll() is None

    def start(self, model_path: str | os.PathLike[str]) -> str:
        """Start serving ``model_path``; return ``base_url`` once /health is OK."""
        if self.root_url is not None:
            raise RuntimeError("server already started")
        model_path = pathlib.Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(model_path)
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        try:
            if self.in_process:
                self._start_in_process(model_path)
            else:
                self._start_subprocess(model_path, deadline)
            self._wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self.base_url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (idempotent). SIGTERM, then SIGKILL after ``timeout``."""
        if self._server is not None:
            server, self._server = self._server, None
            del server  # ~Server(): terminates the loop and joins its thread
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        self.root_url = None

    def log_tail(self, n_chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _params(self, model_path: pathlib.Path) -> Any:
        return make_params(
            model_path,
            port=self.requested_port,
            alias=self.alias,
            n_parallel=self.n_parallel,
            n_ctx_per_slot=self.n_ctx_per_slot,
            n_threads=self.n_threads,
            seed=self.seed,
            verbosity=self.verbosity,
            embeddings=self.embeddings,
            pooling=self.pooling,
        )

    def _start_in_process(self, model_path: pathlib.Path) -> None:
        import xllamacpp

        # Blocks (holding the GIL) until the model is loaded; ~20 ms here.
        try:
            self._server = xllamacpp.Server(self._params(model_path))
        except RuntimeError as e:
            raise LlamaCppServerError(f"xllamacpp.Server failed: {e}") from e
        self.root_url = self._server.listening_address.rstrip("/")

    def _start_subprocess(self, model_path: pathlib.Path, deadline: float) -> None:
        if self._log_path_arg is not None:
            self.log_path = self._log_path_arg
            self._own_log = False
        else:
            fd, name = tempfile.mkstemp(prefix="llamacpp-", suffix=".log")
            os.close(fd)
            self.log_path = pathlib.Path(name)
            self._own_log = True
        cmd = [
            sys.executable,
            "-m",
            "tests.support.llamacpp",
            str(model_path),
            str(self.requested_port),
            "--alias",
            self.alias,
            "--n-parallel",
            str(self.n_parallel),
            "--n-ctx-per-slot",
            str(self.n_ctx_per_slot),
            "--threads",
            str(self.n_threads),
        ]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.verbosity is not None:
            cmd += ["--verbosity", str(self.verbosity)]
        if self.embeddings:
            cmd += ["--embeddings", "--pooling", self.pooling]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        with open(self.log_path, "ab") as log:
            # stdin is a pipe the child blocks on: if this process dies, the
            # child sees EOF and exits, so no orphaned servers.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(_REPO_ROOT),
                env=env,
            )
        self.root_url = self._read_announcement(deadline)

    def _read_announcement(self, deadline: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LlamaCppServerError(
                        f"llama.cpp server did not start within {self.startup_timeout:g}s; log tail:\n{self.log_tail()}"
                    )
                if sel.select(min(remaining, 0.5)):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:  # EOF: the child exited
                        rc = self._proc.wait(5)
                        raise LlamaCppServerError(
                            f"llama.cpp server exited with code {rc} during startup; log tail:\n{self.log_tail()}"
                        )
                    buf += chunk
                    for line in buf.decode(errors="replace").splitlines():
                        if line.startswith(_ANNOUNCE):
                            return line[len(_ANNOUNCE) :].strip().rstrip("/")

    def _wait_healthy(self, deadline: float) -> None:
        url = f"{self.root_url}/health"
        last: str = "no response"
        while True:
            if not self.in_process and self._proc is not None and self._proc.poll() is not None:
                raise LlamaCppServerError(
                    f"llama.cpp server exited with code {self._proc.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                status, body = _get(url, timeout=1.0)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"  # 503 while loading
            except OSError as e:
                last = repr(e)
            if time.monotonic() >= deadline:
                raise LlamaCppServerError(
                    f"llama.cpp server at {self.root_url} not healthy within "
                    f"{self.startup_timeout:g}s (last: {last}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)


# -- child process entry point ----------------------------------------------


def _serve_forever(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a GGUF model with xllamacpp on loopback.")
    ap.add_argument("model")
    ap.add_argument("port", nargs="?", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--alias", default=DEFAULT_ALIAS)
    ap.add_argument("--n-parallel", type=int, default=4)
    ap.add_argument("--n-ctx-per-slot", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--verbosity", type=int, default=None)
    ap.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings too")
    ap.add_argument("--pooling", default="mean", choices=("none", "mean", "cls", "last"))
    ap.add_argument(
        "--ignore-stdin",
        action="store_true",
        help="run until SIGTERM/SIGINT instead of until stdin reaches EOF",
    )
    args = ap.parse_args(argv)

    # Keep the real stdout only for the announcement line; anything llama.cpp
    # prints to fd 1 goes to stderr (the log) so the pipe can never fill up.
    announce = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)

    import xllamacpp

    params = make_params(
        args.model,
        port=args.port,
        alias=args.alias,
        n_parallel=args.n_parallel,
        n_ctx_per_slot=args.n_ctx_per_slot,
        n_threads=args.threads,
        seed=args.seed,
        verbosity=args.verbosity,
        embeddings=args.embeddings,
        pooling=args.pooling,
    )
    server = xllamacpp.Server(params)  # returns once the model is loaded
    try:
        announce.write(_ANNOUNCE + server.listening_address + "\n")
        announce.flush()
        announce.close()
        if args.ignore_stdin:
            while True:
                signal.pause()
        # Block until the parent closes our stdin (or dies) or sends SIGTERM.
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        del server  # clean shutdown: terminate the loop, join, free the model
    return 0


if __name__ == "__main__":
    sys.exit(_serve_forever())
