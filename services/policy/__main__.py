"""``python -m pilothouse.policy`` (``pilothouse policy run``): wiring only.

Settings: ``PILOTHOUSE_POLICY_*`` (see config.py and README.md); Kafka: ``PILOTHOUSE_KAFKA_*`` (BusSettings).
"""

from __future__ import annotations

import argparse
import sys

from pilothouse.bus.attestation import HumanKeyFile
from pilothouse.bus.authorization import load_private_key
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PilothouseError
from pilothouse.bus.service import ServiceRuntime
from pilothouse.bus.transactions import TransactionalProcessor
from pilothouse.policy.adapters.opa import OpaPolicyEngine
from pilothouse.policy.adapters.postgres import Store
from pilothouse.policy.config import FreezeCalendar, Settings
from pilothouse.policy.handlers import Limits, PolicyHandlers, Topics

#: purpose -> the record its topic carries (tests and deployments may rename topics, never their records).
RECORDS = {
    "incidents": "pilothouse.sensing.IncidentUpdated",
    "hypotheses": "pilothouse.reasoning.HypothesesProposed",
    "proposals": "pilothouse.reasoning.ActionProposed",
    "validations": "pilothouse.console.HypothesisValidated",
    "shadow": "pilothouse.actuator.ShadowRunCompleted",
    "approvals": "pilothouse.console.ApprovalRecorded",
    "executions": "pilothouse.actuator.ActionExecuted",
    "verifications": "pilothouse.actuator.ActionVerified",
    "kill_switch": "pilothouse.console.KillSwitchChanged",
}


def consumed_topics(settings: Settings) -> dict[str, str]:
    """purpose -> topic name, for every topic the policy principal consumes."""
    return {p: getattr(settings, f"topic_{p}") for p in RECORDS}


def build_handlers(settings: Settings, store: Store, engine: OpaPolicyEngine) -> PolicyHandlers:
    return PolicyHandlers(
        store=store, engine=engine, signing_key=load_private_key(settings.signing_key.get_secret_value()),
        topics=Topics(settings.topic_decisions, settings.topic_pending, settings.topic_authorized),
        limits=Limits(environment=settings.environment, budget_window=settings.budget_window,
                      authorization_ttl=settings.authorization_ttl, approval_request_ttl=settings.approval_request_ttl),
        freezes=FreezeCalendar(settings.freeze_windows_file).windows,
        humans=HumanKeyFile(settings.human_keys).registry)


def build_processor(settings: Settings, bus: BusSettings, handlers: PolicyHandlers) -> TransactionalProcessor:
    topics = consumed_topics(settings)
    return TransactionalProcessor(
        bus, group_id=settings.group_id, transactional_id=settings.transactional_id,
        handlers=handlers.table(topics), expected_records={topics[p]: r for p, r in RECORDS.items()},
        batch_size=settings.batch_size, max_retries=settings.max_retries)


def build(settings: Settings, bus: BusSettings) -> ServiceRuntime:
    """Assemble the policy process: one transactional consume → decide → produce loop."""
    store = Store(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)
    store.migrate()
    engine = OpaPolicyEngine.from_url(settings.opa_url, timeout_s=settings.opa_timeout_s)
    engine.wait_until_ready(30.0)
    handlers = build_handlers(settings, store, engine)
    processor = build_processor(settings, bus, handlers)
    runtime = ServiceRuntime("policy", settings.observability_port, log_level=settings.log_level)
    runtime.add_worker("decide", processor.run, stop=processor.stop, close=processor.close)
    runtime.add_closer(engine.close)
    runtime.add_closer(store.close)
    return runtime


def main(argv: list[str] | None = None) -> int:
    """Run the policy service until SIGTERM. Exit codes: 0 stopped cleanly, 1 a worker failed, 2 cannot start."""
    argparse.ArgumentParser(prog="pilothouse policy run",
                            description="Run the policy service (settings from PILOTHOUSE_POLICY_* and "
                                        "PILOTHOUSE_KAFKA_*).").parse_args(argv)
    try:
        settings = Settings()
        bus = BusSettings(client_id="pilothouse-policy")
        runtime = build(settings, bus)
    except (PilothouseError, ValueError) as e:
        print(f"pilothouse policy: cannot start: {e}", file=sys.stderr)
        return 2
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())
