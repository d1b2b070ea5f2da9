"""Command line of the sandbox fleet: serve it, and drive a running one (faults, actions, shadow, state).

    python -m pilothouse.fleet --port 19100 --state-dir DIR          # serve (same as `serve ...`)
    python -m pilothouse.fleet inject latency productcatalog --instance productcatalog-1 --param delay_ms=500
    python -m pilothouse.fleet faults | clear f-1 | clear --all
    python -m pilothouse.fleet act scale_replicas --param service=recommendation --param replicas=4 [--dry-run]
    python -m pilothouse.fleet shadow rollback_deploy --param service=checkout --horizon 120
    python -m pilothouse.fleet state
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from pilothouse.fleet.errors import FleetError
from pilothouse.fleet.model import ACTIONS, FAULT_PARAMS

DEFAULT_PORT = 19100
TOKEN_ENV = "PILOTHOUSE_FLEET_TOKEN"
COMMANDS = ("serve", "inject", "clear", "faults", "act", "shadow", "state", "actions-log")


def _param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(raw)  # numbers, true/false, null, quoted strings
    except ValueError:
        return name, raw  # a bare word is a string


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilothouse fleet", description="The pilothouse sandbox fleet.")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the fleet server (the default command)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--state-dir", type=Path, required=True, help="state file and logs; resumed if present")
    serve.add_argument("--seed", type=int, default=7, help="simulation seed (a resumed fleet keeps its own)")
    serve.add_argument("--base-rps", type=float, default=100.0, help="load on the frontend, requests/s")
    serve.add_argument("--hop-delay", type=int, default=2, help="seconds a fault takes to reach each caller")
    serve.add_argument("--clock", choices=("realtime", "manual"), default="realtime",
                       help="realtime: one tick per second; manual: only POST /advance moves time")
    serve.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second (realtime)")
    serve.add_argument("--service-log", type=Path, help="JSON-lines log of the simulated services "
                                                        "(default STATE_DIR/services.jsonl)")

    def client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="the fleet's base URL")
        return p

    inject = client(sub.add_parser("inject", help="inject a fault"))
    inject.add_argument("kind", choices=sorted(FAULT_PARAMS))
    inject.add_argument("service")
    inject.add_argument("--instance")
    inject.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE")

    clear = client(sub.add_parser("clear", help="clear one fault, or all"))
    clear.add_argument("fault_id", nargs="?")
    clear.add_argument("--all", action="store_true")
    clear.add_argument("--service", help="with --all: only this service's faults")

    client(sub.add_parser("faults", help="list faults (ground truth: for operators and tests)"))
    client(sub.add_parser("state", help="print the observable state"))
    log = client(sub.add_parser("actions-log", help="per-key action executions"))
    log.add_argument("--key")

    act = client(sub.add_parser("act", help="call an action"))
    act.add_argument("action", choices=ACTIONS)
    act.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE")
    act.add_argument("--dry-run", action="store_true")
    act.add_argument("--key", help="Idempotency-Key (default: a fresh uuid4)")

    shadow = client(sub.add_parser("shadow", help="predict an action's SLO effect against doing nothing"))
    shadow.add_argument("action", choices=(*ACTIONS, "none"))
    shadow.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE")
    shadow.add_argument("--horizon", type=int, default=120, help="simulated seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: `pilothouse fleet ...` / `python -m pilothouse.fleet ...`. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    try:
        if args.command == "serve":
            return _serve(args)
        return _client(args)
    except FleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"error: cannot reach the fleet at {args.url}: {e}", file=sys.stderr)
        return 3


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pilothouse.fleet.server import FleetRuntime, create_app

    token = os.environ.get(TOKEN_ENV) or None
    rt = FleetRuntime.open(args.state_dir, seed=args.seed, base_rps=args.base_rps, hop_delay=args.hop_delay,
                           clock=args.clock, speed=args.speed, token=token, service_log=args.service_log)
    print(f"fleet: tick {rt.fleet.state.tick}, state in {args.state_dir}, listening on "
          f"http://{args.host}:{args.port} (clock {args.clock})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(rt), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _client(args: argparse.Namespace) -> int:
    headers = {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=args.url, headers=headers, timeout=60.0) as http:
        if args.command == "inject":
            r = http.post("/faults", json={"kind": args.kind, "service": args.service, "instance": args.instance,
                                           "params": dict(args.param)})
        elif args.command == "clear":
            if args.all == bool(args.fault_id):
                print("error: name one fault id, or --all", file=sys.stderr)
                return 2
            r = (http.post("/faults/clear", json={"service": args.service}) if args.all
                 else http.delete(f"/faults/{args.fault_id}"))
        elif args.command == "faults":
            r = http.get("/faults")
        elif args.command == "state":
            r = http.get("/state")
        elif args.command == "actions-log":
            r = http.get("/actions/log", params={"key": args.key} if args.key else None)
        elif args.command == "act":
            key = args.key or str(uuid.uuid4())
            r = http.post(f"/actions/{args.action}", json=dict(args.param),
                          params={"dry_run": "true"} if args.dry_run else None, headers={"Idempotency-Key": key})
        else:
            r = http.post("/shadow", json={"action": args.action, "params": dict(args.param),
                                           "horizon_s": args.horizon})
    print(json.dumps(r.json(), indent=2))
    return 0 if r.is_success else 1
