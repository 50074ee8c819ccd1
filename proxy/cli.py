"""Command line: argument parsing and dispatch only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "proxy.yaml"
log = logging.getLogger("proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy", description="OpenAI-compatible proxy with a cost-aware fallback chain"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    serve.add_argument("--db", help="ledger SQLite file or postgresql:// URL (default: ledger.url or ledger.path)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="processes serving the port (default 1); without state.url they share a private redis-server",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="one line per request; json for log shippers"
    )

    check = sub.add_parser("check", help="validate the config and show what each tier resolves to")
    _config_arg(check)

    demo = sub.add_parser("demo", help="run simulated tiers and the proxy in front of them (no API key needed)")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--failure-rate", type=float, default=0.3, help="share of simulated llama calls that fail")
    demo.add_argument("--requests", type=int, default=12, help="demo requests to send, then keep serving")
    demo.add_argument("--no-serve", action="store_true", help="exit after the demo requests")

    report = sub.add_parser("report", help="cost report from the ledger")
    report.add_argument("--db", default=None, help="ledger file or postgresql:// URL (default: the config's)")
    report.add_argument("--since", default="24h", help="24h, 7d, 30d or all (default 24h)")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _config_arg(report)

    ledger = sub.add_parser("ledger", help="ledger maintenance")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    imp = ledger_sub.add_parser("import", help="import rows spilled to the JSON-lines file back into SQLite")
    imp.add_argument("--db", default=None, help="ledger SQLite file or postgresql:// URL (default: from the config)")
    _config_arg(imp)
    cp = ledger_sub.add_parser("copy", help="copy a SQLite ledger into PostgreSQL (or another file); idempotent")
    cp.add_argument("--from", dest="source", required=True, help="the SQLite ledger file to read (not modified)")
    cp.add_argument("--to", dest="dest", required=True, help="postgresql://user@host/db, or another SQLite file")
    _config_arg(cp)
    return parser


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help=f"config file (default: ./{DEFAULT_CONFIG} if present)")


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"expected a number of processes from 1 to 256, got {text!r}")
    return n


def _load(path: str | None) -> Config:
    if path is None:
        path = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None
    return load_config(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from proxy.ops.serve import serve

            return serve(
                _load(args.config),
                host=args.host,
                port=args.port,
                db=args.db,
                log_level=args.log_level,
                log_format=args.log_format,
                workers=args.workers,
            )
        if args.command == "check":
            from proxy.ops.check import describe

            print(describe(_load(args.config)))
            return 0
        if args.command == "demo":
            from proxy.sim.demo import run_demo

            return asyncio.run(run_demo(args.port, args.failure_rate, args.requests, serve=not args.no_serve))
        if args.command == "report":
            from proxy.ledger.report_text import report_main

            code, text = report_main(args.db or _load(args.config), args.since, args.json)
            print(text)
            return code
        if args.command == "ledger" and args.ledger_command == "copy":
            from proxy.ledger.copy import copy_main

            code, text = copy_main(_load(args.config), args.source, args.dest)
            print(text)
            return code
        if args.command == "ledger":
            from proxy.ledger.spill import import_main

            code, text = import_main(args.db, _load(args.config))
            print(text)
            return code
    except ConfigError as e:
        print(f"proxy: config error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
