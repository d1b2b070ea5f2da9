"""`pilothouse stack …`: up, status [--json], down, env [PRINCIPAL], apply [--json].

Exit codes: 0 ok; 1 a component failed or is unhealthy (the message names its log); 2 a prerequisite is missing
(one line: what, and the command that installs it) or the usage is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

from pilothouse.bus.errors import PilothouseError
from pilothouse.stack import lifecycle
from pilothouse.stack.config import Settings
from pilothouse.stack.errors import MissingPrerequisite
from pilothouse.stack.info import StackInfo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilothouse stack",
        description="The local stack on 127.0.0.1: Kafka, PostgreSQL, OPA and an LLM server, state in one data dir "
        "(PILOTHOUSE_DATA_DIR, default <repo>/.stack), downloads cached in PILOTHOUSE_CACHE_DIR.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="provision (first run), start, and apply the topic catalogue; idempotent")
    p_status = sub.add_parser("status", help="health of each component")
    p_status.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("down", help="stop every component (SIGTERM, wait, then SIGKILL)")
    p_env = sub.add_parser("env", help="print `export PILOTHOUSE_...=...` lines (Kafka credentials for PRINCIPAL)")
    p_env.add_argument("principal", nargs="?", help="Kafka principal whose credentials to export (e.g. ledger)")
    p_apply = sub.add_parser("apply", help="re-apply services/bus/catalogue.yaml (topics, users, ACLs)")
    p_apply.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _print_report(report, out) -> None:
    parts = [
        f"{len(report.created_topics)} topics created",
        f"{len(report.created_users)} users created",
        f"{len(report.reset_users)} passwords reset",
        f"{len(report.created_acls)} ACLs created",
        f"{len(report.revoked_acls)} ACLs revoked",
    ]
    print(f"catalogue: {', '.join(parts)}" + ("" if report.changed else " (no change)"), file=out)
    for line in report.revoked_acls:
        print(f"  revoked (not in the catalogue): {line}", file=out)
    for line in report.drift:
        print(f"  drift (left as is): {line}", file=out)


def _up(out) -> int:
    result = lifecycle.up(log=lambda m: print(m, file=out, flush=True))
    _print_report(result.report, out)
    print(
        f"stack up in {result.timings['total_s']:.1f}s; connection details in "
        f"{StackInfo.path_for(result.info.data_dir)} (`pilothouse stack env PRINCIPAL`)",
        file=out,
    )
    return 0


def _status(as_json: bool, out) -> int:
    health = lifecycle.status()
    if as_json:
        print(json.dumps(health, indent=2, sort_keys=True), file=out)
    else:
        for name, h in health.items():
            state = "healthy" if h["healthy"] else "UNHEALTHY"
            detail = ", ".join(f"{k}={v}" for k, v in h.items() if k != "healthy" and v is not None)
            print(f"{name:9} {state:10} {detail}", file=out)
    return 0 if all(h["healthy"] for h in health.values()) else 1


def _down(out) -> int:
    for name, outcome in lifecycle.down().items():
        print(f"{name:9} {outcome}", file=out)
    return 0


def _env(principal: str | None, out) -> int:
    info = StackInfo.load()
    for line in info.export_lines(principal):
        print(line, file=out)
    return 0


def _apply(as_json: bool, out) -> int:
    report = lifecycle.apply_catalogue()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2), file=out)
    else:
        _print_report(report, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pilothouse stack`; returns the exit code. Errors are one clear line, never a traceback."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        Settings()  # validate the environment once, up front
        if args.command == "up":
            return _up(out)
        if args.command == "status":
            return _status(args.json, out)
        if args.command == "down":
            return _down(out)
        if args.command == "env":
            return _env(args.principal, out)
        if args.command == "apply":
            return _apply(args.json, out)
    except MissingPrerequisite as e:
        print(f"pilothouse stack {args.command}: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"pilothouse stack {args.command}: invalid PILOTHOUSE_* setting: {e.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except PilothouseError as e:
        print(f"pilothouse stack {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pilothouse stack {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        if os.environ.get("PILOTHOUSE_DEBUG"):
            raise
        print(
            f"pilothouse stack {args.command}: unexpected {type(e).__name__}: {e} (PILOTHOUSE_DEBUG=1 shows the trace)",
            file=sys.stderr,
        )
        return 1
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    raise SystemExit(main())
