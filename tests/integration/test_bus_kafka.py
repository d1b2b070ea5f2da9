"""The bus against the real broker: round trip, dead letters with reasons, retries, commits, transactions."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from pilothouse.bus.consumer import DLQ_HEADER_PREFIX, ConsumerLoop
from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import RECORDS
from pilothouse.bus.schemas import load_schemas
from pilothouse.bus.serde import Serde
from pilothouse.bus.transactions import Output, TransactionalProcessor
from tests.kafka_reading import read_all
from tests.avro_samples import sample

ALERT = "pilothouse.sensing.AlertReceived"
INCIDENT = "pilothouse.sensing.IncidentUpdated"


def alert(i: int, **kw):
    base = sample(load_schemas().get(ALERT).expanded)
    base.update(event_id=f"ev-{i}", fingerprint=f"fp-{i}", occurred_at=datetime.now(timezone.utc), **kw)
    return RECORDS[ALERT].model_validate(base)


def test_records_round_trip_through_the_broker(bus_settings, new_topic, group_id):
    s = bus_settings()
    topic = new_topic(partitions=3)
    producer = BusProducer(s)
    sent = [alert(i) for i in range(50)]
    producer.wait([producer.produce(r, key=r.fingerprint, topic=topic) for r in sent])
    got = []
    loop = ConsumerLoop(s, group_id=group_id, handlers={topic: lambda r, ctx: got.append(r)},
                        dlq_producer=producer, expected_records={topic: ALERT})
    loop.run(max_messages=50, idle_timeout_s=20)
    loop.close()
    assert sorted(got, key=lambda r: r.event_id) == sorted(sent, key=lambda r: r.event_id)
    assert loop.dead_lettered == 0


def test_poison_pills_go_to_the_dlq_with_reasons_and_the_loop_keeps_going(bus_settings, new_topic, group_id):
    s = bus_settings()
    topic = new_topic()
    producer = BusProducer(s)
    serde = Serde(max_message_bytes=2000)
    wrong_type = Serde().encode(RECORDS[INCIDENT].model_validate(sample(load_schemas().get(INCIDENT).expanded)))
    fp = load_schemas().get("pilothouse.reasoning.DroppedClaim").fingerprint
    pills = {
        b"not avro at all": "unknown framing",
        b"\xc3\x01" + b"\x00" * 8 + b"x": "unknown schema fingerprint",
        b"\xc3\x01" + fp + b"\x00\xfe\xff\xff\xff\x07": "",  # memory bomb attempt on a non-topic type
        wrong_type: "not the type this topic carries",
        b"\xc3\x01" + b"\x00" * 5000: "above the 2000-byte limit",
    }
    ds = [producer.produce_bytes(topic, v, key=b"k", headers={"trace": "t1"}) for v in pills]
    good = alert(1)
    ds.append(producer.produce(good, key="k", topic=topic))
    ds.append(producer.produce_bytes(topic, None, key=b"tomb"))  # a tombstone is not a record either
    producer.wait(ds)
    got = []
    loop = ConsumerLoop(s, group_id=group_id, handlers={topic: lambda r, ctx: got.append(r)}, dlq_producer=producer,
                        serde=serde, expected_records={topic: ALERT})
    loop.run(max_messages=len(pills) + 2, idle_timeout_s=20)
    loop.close()
    assert got == [good]
    dead = read_all(s, topic + ".dlq", expect=len(pills) + 1)
    assert len(dead) == len(pills) + 1
    by_value = {m.value(): dict(m.headers()) for m in dead}
    for value, reason in pills.items():
        h = by_value[value]
        assert h[DLQ_HEADER_PREFIX + "original_topic"] == topic.encode()
        assert int(h[DLQ_HEADER_PREFIX + "original_offset"]) >= 0
        assert h[DLQ_HEADER_PREFIX + "original_partition"] == b"0"
        assert reason.encode() in h[DLQ_HEADER_PREFIX + "reason"]
        assert h["trace"] == b"t1"  # original headers are kept
    assert b"tombstone" in by_value[None][DLQ_HEADER_PREFIX + "reason"]


def test_retryable_errors_are_retried_then_dead_lettered_and_bugs_never_stop_the_loop(bus_settings, new_topic,
                                                                                        group_id):
    s = bus_settings()
    topic = new_topic()
    producer = BusProducer(s)
    producer.wait([producer.produce(alert(i), key="k", topic=topic) for i in range(4)])
    attempts: dict[str, int] = {}
    handled = []

    def handler(r, ctx):
        attempts[r.event_id] = attempts.get(r.event_id, 0) + 1
        if r.event_id == "ev-0" and attempts[r.event_id] < 3:
            raise RetryableError("database briefly unavailable")
        if r.event_id == "ev-1":
            raise RetryableError("never comes back")
        if r.event_id == "ev-2":
            raise PermanentError("record refers to an unknown incident")
        if r.event_id == "ev-3" and attempts[r.event_id] == 1:
            raise KeyError("a bug")
        handled.append(r.event_id)

    loop = ConsumerLoop(s, group_id=group_id, handlers={topic: handler}, dlq_producer=producer,
                        expected_records={topic: ALERT}, max_retries=3, backoff_initial_s=0.01)
    loop.run(max_messages=4, idle_timeout_s=20)
    loop.close()
    assert handled == ["ev-0"]
    assert attempts == {"ev-0": 3, "ev-1": 4, "ev-2": 1, "ev-3": 1}
    reasons = sorted(dict(m.headers())[DLQ_HEADER_PREFIX + "reason"].decode()[:20] for m in
                     read_all(s, topic + ".dlq", expect=3))
    assert reasons == ["handler crashed: Key", "record refers to an ", "retries exhausted af"]


def test_offsets_are_committed_only_after_the_handler_succeeded(bus_settings, new_topic, group_id):
    s = bus_settings()
    topic = new_topic()
    producer = BusProducer(s)
    producer.wait([producer.produce(alert(i), key="k", topic=topic) for i in range(6)])
    seen = []

    class Crash(BaseException):  # not an Exception: the process "dies" inside the handler
        pass

    def dying(r, ctx):
        if r.event_id == "ev-3":
            raise Crash()
        seen.append(r.event_id)

    loop = ConsumerLoop(s, group_id=group_id, handlers={topic: dying}, dlq_producer=producer,
                        expected_records={topic: ALERT})
    with pytest.raises(Crash):
        loop.run(max_messages=6, idle_timeout_s=20)
    loop.close()  # commits what was stored: ev-0..ev-2
    assert seen == ["ev-0", "ev-1", "ev-2"]
    again = []
    loop2 = ConsumerLoop(s, group_id=group_id, handlers={topic: lambda r, c: again.append(r.event_id)},
                         dlq_producer=producer, expected_records={topic: ALERT})
    loop2.run(max_messages=3, idle_timeout_s=20)
    loop2.close()
    assert again == ["ev-3", "ev-4", "ev-5"]


def test_transactions_make_consume_produce_exactly_once(bus_settings, new_topic, group_id):
    s = bus_settings()
    src, dst = new_topic(), new_topic()
    producer = BusProducer(s)
    producer.wait([producer.produce(alert(i), key="k", topic=src) for i in range(20)])
    failed_once = set()

    def enrich(r, ctx):
        if r.event_id == "ev-7" and "ev-7" not in failed_once:
            failed_once.add("ev-7")  # the first attempt's whole batch is aborted: no output may leak
            raise RetryableError("transient")
        return [Output(r.model_copy(update={"summary": "enriched " + r.event_id}), key=r.fingerprint, topic=dst)]

    tx = TransactionalProcessor(s, group_id=group_id, transactional_id=f"test.{uuid.uuid4().hex}",
                                handlers={src: enrich}, expected_records={src: ALERT}, batch_size=5,
                                backoff_initial_s=0.01)
    tx.run(idle_timeout_s=5)
    tx.close()
    out = read_all(s, dst, expect=20)
    summaries = sorted(Serde().decode(m.value()).record.summary for m in out)
    assert summaries == sorted(f"enriched ev-{i}" for i in range(20))
    assert failed_once == {"ev-7"}


def test_the_partition_probe_finds_the_resume_offset_and_tells_records_from_markers(bus_settings, new_topic,
                                                                                      group_id):
    """What the sensing correlator asks the broker when Faust delivers an alert record out of sequence: where its
    group resumes, and whether the offsets it jumped over hold records (skipped: a loss) or only transaction markers
    (legitimate)."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from pilothouse.bus.reader import PartitionProbe

    s = bus_settings()
    topic = new_topic()
    plain = BusProducer(s)
    for i in range(3):  # offsets 0, 1, 2
        plain.produce_bytes(topic, b"plain-%d" % i, key=None, partition=0)
    plain.flush(10)
    tx = Producer({**s.librdkafka(), "transactional.id": f"probe-test-{uuid.uuid4().hex[:8]}"})
    tx.init_transactions(30)
    for batch in range(2):  # 3, 4 and a commit marker; two more records and a marker
        tx.begin_transaction()
        for i in range(2):
            tx.produce(topic, value=b"tx-%d-%d" % (batch, i), partition=0)
        tx.commit_transaction(30)
    plain.produce_bytes(topic, b"after", key=None, partition=0)  # may land before the second marker
    plain.flush(10)

    probe = PartitionProbe(s, group_id)
    try:
        assert probe.start_offset(topic, 0) == 0  # nothing committed: the log start
        records = probe.data_offsets(topic, 0, 0, 100)  # to the end of the partition
        assert len(records) == 8 and records[:5] == [0, 1, 2, 3, 4]
        markers = sorted(set(range(10)) - set(records))  # 8 records and 2 commit markers take offsets 0-9
        assert len(markers) == 2 and markers[0] == 5
        for m in markers:
            assert probe.data_offsets(topic, 0, m, m + 1) == []  # only a marker: a legitimate jump
        assert probe.data_offsets(topic, 0, 4, 7) == [4, 6]  # records were jumped over: a loss

        committer = Consumer({**s.librdkafka(), "group.id": group_id, "enable.auto.commit": False})
        committer.commit(offsets=[TopicPartition(topic, 0, 6)], asynchronous=False)
        committer.close()
        assert probe.start_offset(topic, 0) == 6  # the group's committed offset
    finally:
        probe.close()
