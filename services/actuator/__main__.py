"""``python -m pilothouse.actuator`` (``pilothouse actuator``): wiring only.

Settings: ``PILOTHOUSE_ACTUATOR_*`` (see config.py and README.md); Kafka: ``PILOTHOUSE_KAFKA_*`` (BusSettings).
"""

from __future__ import annotations

import argparse
import sys

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.actuator.config import Settings
from pilothouse.actuator.executors import Executor, ExecutorRegistry, FleetExecutor, HttpExecutor
from pilothouse.actuator.followup import FollowUpWorker
from pilothouse.actuator.handlers import ActuatorHandlers, KillSwitchGate, Topics
from pilothouse.actuator.outbox import OutboxRelay
from pilothouse.bus.actions import load_actions
from pilothouse.bus.attestation import HumanKeyFile
from pilothouse.bus.authorization import load_public_key
from pilothouse.bus.config import BusSettings
from pilothouse.bus.consumer import ConsumerLoop
from pilothouse.bus.errors import PilothouseError
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.service import ServiceRuntime

RECORDS = {
    "pending": "pilothouse.policy.ApprovalRequested",
    "authorized": "pilothouse.policy.ActionAuthorized",
    "kill_switch": "pilothouse.console.KillSwitchChanged",
}


def build(settings: Settings, bus: BusSettings) -> ServiceRuntime:
    """Assemble the actuator process: three consumer loops, the outbox relay and the follow-up worker."""
    store = Store(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)
    store.migrate()
    executors: list[Executor] = [HttpExecutor(t) for t in settings.http_targets]
    if settings.fleet_url:
        executors.append(FleetExecutor(settings.fleet_url, timeout_s=settings.fleet_timeout_s,
                                       token=settings.fleet_token.get_secret_value() if settings.fleet_token else None))
    registry = ExecutorRegistry(executors)
    handlers = ActuatorHandlers(
        store=store, registry=registry, catalogue=load_actions(),
        keys={kid: load_public_key(b64) for kid, b64 in settings.trusted_keys.items()},
        topics=Topics(settings.topic_shadow, settings.topic_executions, settings.topic_verifications),
        max_skew_s=settings.max_clock_skew_s, shadow_horizon_s=settings.shadow_horizon_s,
        humans=HumanKeyFile(settings.human_keys).registry)
    expected = {settings.topic_pending: RECORDS["pending"], settings.topic_authorized: RECORDS["authorized"],
                settings.topic_kill_switch: RECORDS["kill_switch"]}
    dlq = BusProducer(bus)

    def loop(purpose: str, topic: str, handler, **kw) -> ConsumerLoop:
        # Static membership: a restarted process takes its partitions back at once (no session-timeout wait).
        return ConsumerLoop(bus, group_id=f"{settings.group_prefix}.{purpose}", handlers={topic: handler},
                            dlq_producer=dlq, expected_records=expected,
                            extra_config={"group.instance.id": f"{settings.instance_id}.{purpose}",
                                          "session.timeout.ms": 10000}, **kw)

    # Its own group per instance: every instance reads the whole (compacted) kill-switch topic before executing.
    kill = loop(f"kill-switch.{settings.instance_id}", settings.topic_kill_switch, handlers.on_kill_switch)
    handlers.gate = gate = KillSwitchGate(store, kill, settings.topic_kill_switch)
    shadow = loop("shadow", settings.topic_pending, handlers.on_approval_requested)
    # An authorized action is never dead-lettered because a dependency is down: wait for it (bounded backoff).
    execute = loop("execute", settings.topic_authorized, handlers.on_action_authorized, max_retries=10**9)
    relay = OutboxRelay(store, BusProducer(bus), poll_s=settings.relay_poll_s)
    followup = FollowUpWorker(handlers, poll_s=settings.recovery_poll_s)

    runtime = ServiceRuntime("actuator", settings.observability_port, log_level=settings.log_level)
    runtime.add_worker("kill-switch", gate.run, stop=gate.stop, close=kill.close)
    runtime.add_worker("shadow", shadow.run, stop=shadow.stop, close=shadow.close)
    runtime.add_worker("execute", execute.run, stop=execute.stop, close=execute.close)
    runtime.add_worker("outbox", relay.run, stop=relay.stop, close=relay.close)
    runtime.add_worker("followup", followup.run, stop=followup.stop)
    runtime.add_closer(registry.close)
    runtime.add_closer(store.close)
    runtime.add_closer(lambda: dlq.flush(10.0))
    return runtime


def main(argv: list[str] | None = None) -> int:
    """Run the actuator until SIGTERM. Exit codes: 0 stopped cleanly, 1 a worker failed, 2 bad settings."""
    argparse.ArgumentParser(prog="pilothouse actuator",
                            description="Run the actuator service (settings from PILOTHOUSE_ACTUATOR_* and "
                                        "PILOTHOUSE_KAFKA_*).").parse_args(argv)
    try:
        settings = Settings()
        bus = BusSettings(client_id="pilothouse-actuator")
        runtime = build(settings, bus)
    except (PilothouseError, ValueError) as e:
        print(f"pilothouse actuator: cannot start: {e}", file=sys.stderr)
        return 2
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())
