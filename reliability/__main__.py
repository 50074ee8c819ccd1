"""`python -m reliability [--output RELIABILITY.md] [--soak-requests N] [--artifacts DIR]`

Runs `pytest tests/test_faults.py tests/test_adversarial.py tests/test_soak.py [tests/test_fuzz.py]` with --junitxml and
the environment variables the tests write their details to, then renders RELIABILITY.md. The
exit code is pytest's: the report is written either way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reliability.report import REPO, render, run_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__.split("\n\n")[1])
    parser.add_argument("--output", type=Path, default=REPO / "RELIABILITY.md", help="default: RELIABILITY.md")
    parser.add_argument("--soak-requests", type=int, default=None, help="SOAK_REQUESTS (default 3000)")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep junit.xml and the JSON files here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    run = run_suite(args.artifacts, args.soak_requests, args.pytest_args)
    args.output.write_text(render(run))
    print(f"wrote {args.output} (pytest exit code {run.exit_code})")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
