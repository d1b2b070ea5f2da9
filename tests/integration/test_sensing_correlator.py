"""The Faust correlation worker on the real broker: incidents on the topic, and a SIGKILL mid-stream that neither
loses nor duplicates incidents (the worker is a subprocess; uuid-named topics and app id)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import AlertReceived, AlertsReceived, RedactionManifest
from pilothouse.bus.serde import Serde
from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
from pilothouse.sensing.correlation import Correlator, DependencyMap, MemoryStore
from pilothouse.sensing.handlers import alert_input, alert_partition

SERVICES = ["frontend", "checkout", "payment", "cart", "redis", "ad", "email", "currency", "shipping"]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
KEY = "correlator-test-pseudonym-key-01"


def _alerts(n: int, run: str) -> list[AlertReceived]:
    """n alerts: bursts of 25 every 40 simulated minutes (so several incidents form), some alerts firing twice
    (deduplicated) and some resolving."""
    out = []
    for i in range(n):
        burst, j = divmod(i, 25)
        fp = f"{run}-b{burst}-a{j % 18}"  # j >= 18 repeats an earlier fingerprint of the burst
        status = "resolved" if j in (22, 23) else "firing"
        at = T0 + timedelta(minutes=40 * burst, seconds=10 * j)
        eid = f"{run}-{i}"
        out.append(AlertReceived(
            event_id=eid, correlation_id=eid, occurred_at=at, producer="sensing", source="alertmanager",
            fingerprint=fp if status == "firing" else f"{run}-b{burst}-a{j - 20}", status=status,
            severity="warning", service=SERVICES[(j * 7 + burst) % len(SERVICES)], summary=f"alert {j}",
            starts_at=at, received_at=at, redaction=RedactionManifest(ruleset_version="rs-test", scanned=True)))
    return out


def _messages(alerts: list[AlertReceived], partitions: int, per_record: int = 4) -> list[tuple[int, bytes]]:
    """The alerts as the gateway writes them: AlertsReceived records of up to ``per_record`` alerts, each on the
    partition of its alerts' fingerprints, in order: (partition, value)."""
    serde, groups = Serde(), {}
    for a in alerts:
        groups.setdefault(alert_partition(a.fingerprint, partitions), []).append(a)
    out = []
    for partition, items in groups.items():
        for i in range(0, len(items), per_record):
            first = items[i]
            record = AlertsReceived(event_id=f"{first.event_id}+", correlation_id=f"{first.event_id}+",
                                    occurred_at=first.received_at, producer="sensing", alerts=items[i:i + per_record])
            out.append((partition, serde.encode(record)))
    return out


def _send(producer: BusProducer, topic: str, alerts: list[AlertReceived], per_record: int = 4) -> None:
    for partition, value in _messages(alerts, producer.partitions(topic), per_record):
        producer.produce_bytes(topic, value, key=None, partition=partition)
    producer.flush(10)


def _env(stack_info, settings: dict[str, str], data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTHOUSE_")}
    env.update({
        "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": stack_info.kafka.bootstrap_servers,
        "PILOTHOUSE_KAFKA_USERNAME": "admin",
        "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password("admin"),
        "PILOTHOUSE_REDACTION_PSEUDONYM_KEY": KEY,
        "PILOTHOUSE_SENSING_DATA_DIR": str(data_dir),
        "PILOTHOUSE_SENSING_CORRELATOR_OBSERVABILITY_PORT": "0",
        "PILOTHOUSE_SENSING_GROUP_WINDOW_S": "900",
        **settings,
    })
    return env


@pytest.fixture
def app_id(stack_info):
    """A uuid-named Faust app id; afterwards its changelog/assignor topics and consumer group are deleted (Faust
    creates them on the broker and would leave them behind)."""
    from confluent_kafka.admin import AdminClient

    name = f"pilothouse-sensing-test-{uuid.uuid4().hex[:8]}"
    yield name
    admin = AdminClient(stack_info.kafka_config("admin"))
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name + "-")]
    for fut in (admin.delete_topics(mine).values() if mine else []):
        fut.result(30)
    for fut in admin.delete_consumer_groups([name]).values():
        try:
            fut.result(30)
        except Exception:  # noqa: BLE001 - a group with no committed offsets may already be gone
            pass


def _worker_setup(stack_info, new_topic, tmp_path: Path, app_id: str, **extra: str) -> tuple[str, str, dict]:
    """New alerts/telemetry/incidents topics (one partition each) and the worker's environment for them."""
    alerts_topic, telemetry_topic, incidents_topic = new_topic(1), new_topic(1), new_topic(1)
    env = _env(stack_info, {
        "PILOTHOUSE_SENSING_ALERTS_TOPIC": alerts_topic,
        "PILOTHOUSE_SENSING_TELEMETRY_TOPIC": telemetry_topic,
        "PILOTHOUSE_SENSING_INCIDENTS_TOPIC": incidents_topic,
        "PILOTHOUSE_SENSING_APP_ID": app_id,
        **extra,
    }, tmp_path / "data")
    return alerts_topic, incidents_topic, env


def _start(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The worker, logging at info level (Faust's recovery steps and the worker's offset checks: what a failure's
    log tail shows)."""
    return subprocess.Popen([sys.executable, "-m", "pilothouse.sensing.app_faust", "--verbose"], env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


class IncidentReader:
    """Reads the incidents topic on a thread: every IncidentUpdated, in order."""

    def __init__(self, bus_settings, topic: str) -> None:
        self.records: list = []
        self._stop = threading.Event()
        self._consumer = Consumer({**bus_settings("admin").librdkafka(), "group.id": f"test.{uuid.uuid4().hex[:12]}",
                                   "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        serde = Serde()
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is not None and not msg.error():
                rec = serde.decode(msg.value()).record
                assert msg.key().decode() == rec.incident_id
                self.records.append(rec)

    def latest(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for r in list(self.records):
            if r.incident_id not in out or r.version > out[r.incident_id].version:
                out[r.incident_id] = r
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def _reference(alerts: list[AlertReceived]) -> dict[str, tuple]:
    """What a crash-free run gives (one alerts partition: the offset order is the processing order)."""
    c, store = Correlator(DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())), MemoryStore()
    for offset, a in enumerate(alerts):
        c.apply(alert_input(a, offset), store)
    return {iid: (d["version"], d["state"], sorted({r["fingerprint"] for r in d["alerts"].values()}))
            for iid, d in store.incidents.items()}


def _summary(latest: dict) -> dict[str, tuple]:
    return {iid: (r.version, r.state, sorted(r.alert_fingerprints)) for iid, r in latest.items()}


def _wait_for(predicate, timeout_s: float, worker: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if worker is not None and worker.poll() is not None:
            return False  # the worker died: its log says why
        time.sleep(0.25)
    return predicate()


@pytest.mark.timeout(240)
def test_sigkill_mid_stream_neither_loses_nor_duplicates_incidents(stack_info, bus_settings, new_topic, tmp_path,
                                                                   app_id):
    alerts_topic, incidents_topic, env = _worker_setup(stack_info, new_topic, tmp_path, app_id,
                                                       PILOTHOUSE_SENSING_COMMIT_INTERVAL_S="1.0")
    run = uuid.uuid4().hex[:8]
    alerts = _alerts(300, run)
    expected = _reference(alerts)
    assert len(expected) >= 12  # the scenario really forms many incidents

    reader = IncidentReader(bus_settings, incidents_topic)
    producer = BusProducer(bus_settings("admin"))
    log_path = tmp_path / "worker.log"
    worker, burner = _start(env, log_path), None
    try:
        # first third, then the kill while the worker is busy with the second third
        _send(producer, alerts_topic, alerts[:100], per_record=1)  # one alert per record, as v1 had it
        # the worker coalesces updates per batch: a backlog of 100 alerts may come out as a handful of updates
        assert _wait_for(lambda: len(reader.records) >= 1, 90, worker), log_path.read_text()[-3000:]
        _send(producer, alerts_topic, alerts[100:200], per_record=7)
        time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        killed_with = len(reader.records)
        _send(producer, alerts_topic, alerts[200:], per_record=3)  # alerts keep coming while the worker is down

        # The restart runs with one core kept busy: under CPU pressure Faust's recovery used to lose alert records
        # fetched while it sought to the committed offsets (faust-streaming #596; pilothouse.bus.faust_recovery).
        # Without the fix, 6 of 8 runs lost records this way.
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        worker = _start(env, log_path)
        done = _wait_for(lambda: _summary(reader.latest()) == expected, 120, worker)
        burner.kill()
        got = _summary(reader.latest())
        assert done, (f"after restart: {len(got)} incidents vs {len(expected)} expected; "
                      f"missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}\n"
                      + log_path.read_text()[-3000:])
        assert 0 < killed_with < len(reader.records)  # the kill happened mid-stream

        # every alert belongs to exactly one current incident
        owners: dict[str, str] = {}
        for iid, r in reader.latest().items():
            for fp in r.alert_fingerprints:
                assert fp not in owners, f"{fp} is in {owners.get(fp)} and {iid}"
                owners[fp] = iid
        assert set(owners) == {a.fingerprint for a in alerts}
        # versions per incident only grow; a replayed version repeats the same content (idempotent writes)
        by_version: dict[tuple[str, int], object] = {}
        last: dict[str, int] = {}
        for r in reader.records:
            key = (r.incident_id, r.version)
            if key in by_version:
                prev = by_version[key]
                assert (prev.alert_fingerprints, prev.state, prev.change) == (r.alert_fingerprints, r.state, r.change)
            else:
                assert r.version > last.get(r.incident_id, 0)
            by_version[key] = r
            last[r.incident_id] = max(last.get(r.incident_id, 0), r.version)
            assert r.evidence and r.evidence_sha256 and r.redaction.scanned
            assert all(e.attributes.get("metrics_source") == "not configured" for e in r.evidence if e.kind == "alert")
    finally:
        if burner is not None and burner.poll() is None:
            burner.kill()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        reader.close()
        producer.flush(5)


@pytest.mark.timeout(180)
def test_a_poison_pill_is_dead_lettered_and_the_stream_goes_on(stack_info, bus_settings, new_topic, tmp_path, app_id):
    alerts_topic, incidents_topic, env = _worker_setup(stack_info, new_topic, tmp_path, app_id)
    run = uuid.uuid4().hex[:8]
    producer = BusProducer(bus_settings("admin"))
    good = _alerts(1, run)[0]
    producer.produce_bytes(alerts_topic, b"\xc3\x01" + b"\x00" * 8 + b"garbage", key=b"poison", partition=0)
    _send(producer, alerts_topic, [good])
    reader = IncidentReader(bus_settings, incidents_topic)
    worker = _start(env, tmp_path / "worker.log")
    try:
        assert _wait_for(lambda: len(reader.records) >= 1, 90, worker), (tmp_path / "worker.log").read_text()[-3000:]
        assert reader.records[0].alert_fingerprints == [good.fingerprint]
        dlq = Consumer({**bus_settings("admin").librdkafka(), "group.id": f"test.{uuid.uuid4().hex[:12]}",
                        "auto.offset.reset": "earliest"})
        dlq.subscribe([alerts_topic + ".dlq"])
        msg, deadline = None, time.monotonic() + 30
        while msg is None and time.monotonic() < deadline:
            m = dlq.poll(0.5)
            msg = m if m is not None and not m.error() else None
        dlq.close()
        assert msg is not None and msg.key() == b"poison"
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["pilothouse.dlq.original_topic"] == alerts_topic
        assert headers["pilothouse.dlq.original_offset"] == "0"
        assert "unknown schema fingerprint" in headers["pilothouse.dlq.reason"]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        reader.close()


@pytest.mark.timeout(180)
def test_offset_gaps_of_transactional_writes_neither_stall_nor_change_the_incidents(stack_info, bus_settings,
                                                                                     new_topic, tmp_path, app_id):
    """Alerts written in transactions: each commit marker takes an offset that is no record, so the partition's
    high-water mark stays ahead of the last alert. The correlator gathers a batch while the log holds more than it
    took; a gap must not keep it waiting (the last alert of each transaction would never be processed), and the
    incidents must be those of a plain run."""
    from confluent_kafka import Producer

    alerts_topic, incidents_topic, env = _worker_setup(stack_info, new_topic, tmp_path, app_id)
    run = uuid.uuid4().hex[:8]
    alerts = _alerts(100, run)
    expected = _reference(alerts)
    partitions = BusProducer(bus_settings("admin")).partitions(alerts_topic)
    producer = Producer({**bus_settings("admin").librdkafka(), "transactional.id": f"test.{run}"})
    producer.init_transactions(30)
    reader = IncidentReader(bus_settings, incidents_topic)
    worker = _start(env, tmp_path / "worker.log")
    try:
        for start in range(0, len(alerts), 25):  # four transactions: four markers, one after each burst
            producer.begin_transaction()
            for partition, value in _messages(alerts[start:start + 25], partitions, per_record=2):
                producer.produce(alerts_topic, value=value, partition=partition)
            producer.commit_transaction(30)
            time.sleep(0.5)  # the worker catches up in between: it meets each gap at the end of what it has
        done = _wait_for(lambda: _summary(reader.latest()) == expected, 90, worker)
        got = _summary(reader.latest())
        assert done, (f"{len(got)} incidents vs {len(expected)} expected\n"
                      + (tmp_path / "worker.log").read_text()[-3000:])
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        reader.close()


def _set_topic_config(stack_info, topic: str, name: str, value: str | None) -> None:
    """Set (or, with None, remove) one config of a topic."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(name, value, incremental_operation=op)])
    admin = AdminClient(stack_info.kafka_config("admin"))  # referenced until the result is in
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(30)


@pytest.mark.timeout(240)
def test_a_batch_that_cannot_be_published_stops_the_worker_and_a_restart_publishes_it(stack_info, bus_settings,
                                                                                        new_topic, tmp_path, app_id):
    """The incidents topic refuses the updates (its max.message.bytes is below an update's size), so a batch's
    publication fails for good. The worker must exit non-zero, for its supervisor to restart it, and not go on with
    that batch's alerts unprocessed and their offsets uncommittable; once the topic takes updates again, a restarted
    worker publishes every incident of those alerts (none was committed past)."""
    alerts_topic, incidents_topic, env = _worker_setup(stack_info, new_topic, tmp_path, app_id)
    _set_topic_config(stack_info, incidents_topic, "max.message.bytes", "100")
    run = uuid.uuid4().hex[:8]
    alerts = _alerts(30, run)
    expected = _reference(alerts)
    producer = BusProducer(bus_settings("admin"))
    _send(producer, alerts_topic, alerts)
    reader = IncidentReader(bus_settings, incidents_topic)
    log_path = tmp_path / "worker.log"
    worker = _start(env, log_path)
    try:
        try:
            code = worker.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker kept running after a publication failed:\n" + log_path.read_text()[-3000:])
        assert code != 0, log_path.read_text()[-3000:]
        assert "publishing a batch failed" in log_path.read_text()
        assert reader.records == []  # the broker refused every update

        _set_topic_config(stack_info, incidents_topic, "max.message.bytes", None)
        worker = _start(env, log_path)
        done = _wait_for(lambda: _summary(reader.latest()) == expected, 90, worker)
        got = _summary(reader.latest())
        assert done, f"{len(got)} incidents vs {len(expected)} expected\n" + log_path.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        reader.close()
