"""Exactly once under crashes: 300 authorized actions, the actuator SIGKILLed at random points, the broker stopped
and restarted mid-run. Afterwards the fleet's own journal must show every authorized action executed exactly once
and nothing else, and every action must have exactly one ActionExecuted(executed) event on the topic.

The broker is the shared stack's: it is stopped (controlled shutdown) and started again once, in this test only,
and the test waits for it to be healthy before it ends (a failure restarts it too).
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.bus.producer import BusProducer
from tests.integration.test_actuator_handlers import authorization
from tests.integration.test_actuator_kafka import (  # noqa: F401 - fleet and schema are fixtures
    ActuatorProcess, Topics, fleet, read_topic, schema, wait_for)

N_ACTIONS = 300
N_KILLS = 25
SERVICES = ("frontend", "checkout", "recommendation", "cart", "payment", "email", "shipping", "currency",
            "productcatalog", "ad")

pytestmark = pytest.mark.slow


def restart_broker(stack_info, down_s: float) -> None:
    """Stop the stack's Kafka broker, keep it down for ``down_s``, start it and wait until it is healthy."""
    from pilothouse.stack import procs
    from pilothouse.stack.config import Settings

    settings = Settings(data_dir=stack_info.data_dir)
    assert procs.stop(settings.run_dir, "kafka", sig=signal.SIGTERM, timeout_s=30) in ("stopped", "killed")
    time.sleep(down_s)
    ensure_broker(stack_info)


def ensure_broker(stack_info) -> None:
    from pilothouse.stack import kafka
    from pilothouse.stack.config import Settings

    settings = Settings(data_dir=stack_info.data_dir)
    proc = kafka.start(settings, kafka.find_java(), kafka.lib_dir(settings))
    kafka.wait_ready(settings, stack_info, proc)


def executed_count(store: Store) -> tuple[int, int]:
    with store.transaction() as tx:
        row = tx._one("SELECT count(*) FILTER (WHERE status <> 'started') AS done, "
                      "(SELECT count(*) FROM {s}.outbox WHERE sent_at IS NULL) AS unsent FROM {s}.executions")
    return row["done"], row["unsent"]


def test_executed_set_equals_authorized_set_across_actuator_and_broker_crashes(
        stack_info, bus_settings, new_topic, fleet, schema, tmp_path):  # noqa: F811 - fixtures
    rng = random.Random(int(time.time()))
    key = Ed25519PrivateKey.generate()
    topics = Topics(new_topic, partitions=3)
    act = ActuatorProcess(stack_info=stack_info, topics=topics, fleet=fleet, key=key, schema=schema,
                          log_path=tmp_path / "actuator.log")
    admin = bus_settings("admin")
    store = Store(stack_info.postgres_dsn, schema)

    # Each service alternates 4 and 5 replicas (all start below 4), so every action passes its precondition when
    # its service's actions run in order: they share the service as key, hence a partition.
    recs = [authorization(key, params={"service": SERVICES[i % 10], "replicas": 4 + (i // 10) % 2},
                          action_id=f"crash-{uuid.uuid4().hex[:8]}-{i:03d}",
                          expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
            for i in range(N_ACTIONS)]
    producer = BusProducer(admin)
    for r in recs:
        producer.produce(r, key=r.target, topic=topics.authorized)
    producer.flush(30)

    kills, broker_restarted, progress = 0, False, []
    try:
        act.start()
        while kills < N_KILLS:
            before = executed_count(store)[0] if _schema_exists(store) else 0
            if before >= N_ACTIONS:
                break
            if kills % 5 == 4:
                time.sleep(rng.uniform(0.1, 2.0))  # somewhere in start-up (migrate, group join, catch-up)
            else:
                # Mid-processing: once this run has executed something, at a random point after it (mid-call,
                # between the call and its record, mid-relay...).
                wait_for(lambda b=before: executed_count(store)[0] > b if _schema_exists(store) else False, 60,
                         "progress after a restart")
                time.sleep(rng.uniform(0.0, 1.0))
            act.kill()
            kills += 1
            progress.append(executed_count(store)[0])
            act.start()
            if kills == 4:  # the broker goes away while the actuator runs: consume, call the fleet, fail to relay
                restart_broker(stack_info, down_s=rng.uniform(2.0, 5.0))
                broker_restarted = True
        wait_for(lambda: executed_count(store) == (N_ACTIONS, 0), 180, "every action recorded and relayed")
    finally:
        act.stop()
        ensure_broker(stack_info)  # no-op if it is running; restarts it if the test failed while it was down
    mid_run = [p for p in progress if 0 < p < N_ACTIONS]
    assert broker_restarted and len(mid_run) >= 5, f"too few kills while actions were running: {progress}"

    # 1. The target's own journal (from outside the actuator): exactly the authorized set, each applied once.
    log = fleet.get("/actions/log")
    journal = {e["key"]: e["executions"] for e in log["entries"]}
    assert set(journal) == {r.action_id for r in recs}
    assert set(journal.values()) == {1} and log["total_executions"] == N_ACTIONS

    # 2. The topic: one executed event per action (a copy re-sent by the relay after a crash has the same event_id).
    events = read_topic(admin, topics.executions, lambda got: len({e.event_id for e in got}) >= N_ACTIONS,
                        timeout_s=90)
    unique = {e.event_id: e for e in events}.values()
    per_action: dict[str, list[str]] = {}
    for e in unique:
        per_action.setdefault(e.action_id, []).append(e.outcome)
    assert per_action == {r.action_id: ["executed"] for r in recs}
    # How often the hard path ran: the target was called again for a key after a crash (answered from its journal).
    recalled = sum(1 for e in log["entries"] if e["requests"] > 1)
    print(f"\nkills={kills} (actions done at each kill: {progress}) broker_restarted={broker_restarted} "
          f"events={len(events)} unique_events={len(unique)} keys_called_more_than_once={recalled}")


def _schema_exists(store: Store) -> bool:
    with store.transaction() as tx:
        return tx._one("SELECT to_regclass(%s) AS t", (f"{store.schema}.executions",))["t"] is not None
