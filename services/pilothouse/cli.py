"""The ``pilothouse`` command: one entry point that dispatches to each part's own ``main(argv)``.

Each subcommand's module is imported only when it runs, so ``pilothouse stack status`` does not load Faust, presidio
or Playwright.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("pilothouse.stack.cli:main", "provision, start, inspect and stop the local stack (up|status|down|env|apply)"),
    "demo": ("pilothouse.demo:main", "the whole loop on real monitoring: fault -> incident -> ... -> verified"),
    "redteam": ("pilothouse.redteam:main", "attack the running system (compromised model, forgeries, ACLs, poison, canaries)"),
    "bench": ("pilothouse.cli:bench", "run a benchmark and write JSON: bench NAME --out FILE (bus, ...)"),
    "eval": ("pilothouse.cli:evaluate", "evaluate root-cause analysis on fault datasets: eval rca --dataset DIR ..."),
    "sensing": ("pilothouse.sensing.__main__:main", "run the sensing service (all|gateway|correlator)"),
    "reasoning": ("pilothouse.reasoning.__main__:main", "run the reasoning service"),
    "actuator": ("pilothouse.actuator.__main__:main", "run the actuator service"),
    "ingest": ("pilothouse.sensing.normalize:main", "normalise an alert/telemetry payload file offline; check mapping rules"),
    "console": ("pilothouse.console.__main__:main", "run the approval console (serve) or hash a password"),
    "approve": ("pilothouse.decide_cli:approve", "approve a pending action as yourself (via the console API)"),
    "reject": ("pilothouse.decide_cli:reject", "reject a pending action or hypothesis (via the console API)"),
    "validate": ("pilothouse.decide_cli:validate", "validate a hypothesis: gate 1 (via the console API)"),
    "redact": ("pilothouse.sensing.redaction:main", "redact log lines or JSON records: redact [FILE] [--json]"),
    "ledger": ("pilothouse.ledger.cli:main", "run the ledger service, verify it (Kafka + Postgres), prove an entry, keygen"),
    "policy": ("pilothouse.policy.cli:main", "run the policy service, replay past decisions, decide, schema, keygen"),
    "fleet": ("pilothouse.fleet.cli:main", "run the sandbox fleet (the simulated microservices the demo acts on)"),
    "catalogue": ("pilothouse.catalogue_cli:main", "apply the topic catalogue to any broker (deployment init job)"),
    "schemas": ("pilothouse.cli:schemas", "check schemas: schemas check|codegen|compat [--against REF]"),
}

# bench NAME -> module under benchmarks/ (import name pilothouse.benchmarks.NAME)
BENCHMARKS = ("all", "bus", "redaction", "policy", "ledger", "sensing", "actuator", "reasoning", "e2e")


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    """Help text."""
    lines = ["usage: pilothouse COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def bench(argv: list[str]) -> int:
    """``pilothouse bench NAME ...``: run benchmarks/NAME.py's main."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: pilothouse bench {{{','.join(BENCHMARKS)}}} --out FILE [options]")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"pilothouse bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"pilothouse.benchmarks.{'suite' if name == 'all' else name}")
    except ModuleNotFoundError as e:
        if e.name == f"pilothouse.benchmarks.{name}":
            print(f"pilothouse bench: benchmark {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(argv[1:]) or 0)


def evaluate(argv: list[str]) -> int:
    """``pilothouse eval rca ...``."""
    if not argv or argv[0] != "rca":
        print("usage: pilothouse eval rca --dataset DIR --format nezha|rcaeval --out FILE [--with-llm]", file=sys.stderr)
        return 2
    from pilothouse.evaluation import main as rca_main

    return int(rca_main(argv[1:]) or 0)


def schemas(argv: list[str]) -> int:
    """``pilothouse schemas check|codegen|compat``."""
    from pilothouse.bus import codegen, compatibility

    sub = argv[0] if argv else "check"
    if sub == "codegen":
        return codegen.main([])
    if sub == "compat":
        return compatibility.main(argv[1:])
    if sub == "check":
        return codegen.main(["--check"]) or compatibility.main(argv[1:])
    print(f"pilothouse schemas: unknown subcommand {sub!r} (check|codegen|compat)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pilothouse`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pilothouse: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(_load(COMMANDS[name][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
