"""A scan of everything the test run leaves behind for the upstream keys the tests configure.

Every file under pytest's base temp dir (ledgers and their WAL and spill files, `proxy serve`
logs, reports), every test's captured stdout, stderr and log records, and the head and body of
every non-streamed response of an in-process proxy. A hit fails the run (exit status 1) and names
where the key was found; the terminal summary says what was scanned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

# The upstream (tier) keys the tests put in the environment; only the proxy and the fake upstreams
# may ever hold them.
KIMI_KEY = "sk-test-kimi-secret"
KIMI_PROCESS_KEY = "sk-kimi-SECRET-do-not-leak-42"
UPSTREAM_KEYS = (KIMI_KEY, KIMI_PROCESS_KEY)


@dataclass
class SecretScan:
    secrets: tuple[str, ...]
    basetemp: Path | None = None
    found: list[str] = field(default_factory=list)
    files: int = 0
    sections: int = 0
    responses: int = 0

    def check(self, where: str, data: bytes) -> None:
        for secret in self.secrets:
            if secret.encode() in data:
                self.found.append(f"{secret[:10]}... in {where}")

    def scan_tree(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.files += 1
                self.check(str(path), path.read_bytes())

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        self.responses += 1
        head = "".join(f"{k}: {v}\n" for k, v in response.headers.items()).encode()
        body = response.body if isinstance(response, web.Response) else None
        self.check(f"response to {request.method} {request.path}", head + (body if isinstance(body, bytes) else b""))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, content in report.sections:
            self.sections += 1
            self.check(f"{report.nodeid} ({name})", content.encode())

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.basetemp is not None and self.basetemp.exists():
            self.scan_tree(self.basetemp)
        if self.found:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        scanned = f"{self.files} files, {self.sections} captured outputs, {self.responses} responses"
        if self.found:
            terminalreporter.write_sep("=", "UPSTREAM KEY LEAKED", red=True)
            for hit in self.found:
                terminalreporter.write_line(hit)
        else:
            terminalreporter.write_line(f"secret scan: no upstream key in {scanned}")


SCAN = SecretScan(UPSTREAM_KEYS)
