"""``pilothouse catalogue apply``: apply the topic catalogue to ANY broker (the deployment's init job).

The local stack does this itself in ``pilothouse stack up``; a real deployment (docker-compose.yml, Kubernetes) runs
this once per release with the admin credentials and one password per service principal from the environment:
``PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS``, ``PILOTHOUSE_KAFKA_USERNAME`` / ``PILOTHOUSE_KAFKA_PASSWORD`` (a super user),
``PILOTHOUSE_PRINCIPAL_PASSWORD_<PRINCIPAL>`` for each catalogue principal. Idempotent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pilothouse.bus.admin import apply_catalogue
from pilothouse.bus.catalogue import load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PilothouseError
from pilothouse.stack.plan import derive_plan

PASSWORD_ENV = "PILOTHOUSE_PRINCIPAL_PASSWORD_"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="pilothouse catalogue")
    ap.add_argument("command", choices=["apply", "show"])
    ap.add_argument("--replication-factor", type=int, default=-1, help="-1: the broker's default")
    args = ap.parse_args(argv)
    catalogue = load_catalogue()
    plan = derive_plan(catalogue)
    if args.command == "show":
        print(json.dumps({t.name: {"record": t.record, "producers": t.producers, "consumers": t.consumers}
                          for t in catalogue.topics.values()}, indent=2))
        return 0
    missing = [p for p in catalogue.principals if not os.environ.get(PASSWORD_ENV + p.upper())]
    if missing:
        print("missing passwords: set " + ", ".join(PASSWORD_ENV + p.upper() for p in missing), file=sys.stderr)
        return 2
    settings = BusSettings()
    try:
        report = apply_catalogue(
            settings.librdkafka(), topics=plan.topics, grants=plan.grants,
            passwords={p: os.environ[PASSWORD_ENV + p.upper()] for p in catalogue.principals},
            replication_factor=args.replication_factor,
        )
    except PilothouseError as e:
        print(f"catalogue apply failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    return 0
