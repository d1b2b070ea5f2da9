"""Tamper evidence on the Kafka side of the ledger, against the real broker: a tombstone, a gap (a skipped sequence,
a missing head; DeleteRecords is refused on the compacted topic), and forged checkpoints on the checkpoints topic —
each caught by ``pilothouse ledger verify`` (exit 1, first bad sequence) and, for the entries topic, by the mirror,
which stops there without mirroring or skipping the bad record.

Each test writes its own chain as the admin principal to uuid-named ``test.*`` topics (the ledger principal cannot
write there; the real ledger topic is never touched).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid

import pytest
from confluent_kafka import TopicPartition

from pilothouse.bus.producer import BusProducer
from pilothouse.ledger import cli
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.adapters.kafka import CheckpointPublisher, TopicReader
from pilothouse.ledger.adapters.postgres import PostgresLedgerMirror
from pilothouse.ledger.domain import CheckpointSigner, LedgerChain, LedgerIntegrityError, ProblemKind, entry_key
from pilothouse.ledger.handlers import to_checkpoint_record, to_entry_record
from pilothouse.ledger.workers import MirrorWorker

pytestmark = pytest.mark.integration

SEED = bytes(range(32))
SIGNER = CheckpointSigner.from_seed("ledger-kafka-test", SEED)
ROGUE = CheckpointSigner.from_seed("ledger-kafka-test", b"\x99" * 32)  # same name, another key


def _chain(n: int) -> tuple[LedgerChain, list]:
    chain = LedgerChain("main")
    entries = [chain.record({"event_id": f"ev-{i}", "incident_id": "inc-1", "n": i}, event_id=f"entry-{i}",
                            occurred_at=1_764_000_000_000 + i, producer="ledger",
                            recorded_topic="pilothouse.console.kill-switch.v1",
                            recorded_type="pilothouse.console.KillSwitchChanged", recorded_offset=i)
               for i in range(n)]
    return chain, entries


@pytest.fixture
def ledger(new_topic, bus_settings, stack_info, tmp_path, monkeypatch):
    """uuid topics + CLI environment (admin principal), and a writer for raw records."""
    entries_topic = new_topic(1, **{"cleanup.policy": "compact"})
    cps_topic = new_topic(1)
    bus = bus_settings("admin")
    producer = BusProducer(bus)
    for k, v in {"PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": bus.bootstrap_servers, "PILOTHOUSE_KAFKA_USERNAME": "admin",
                 "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password("admin"),
                 "PILOTHOUSE_KAFKA_SECURITY_PROTOCOL": bus.security_protocol,
                 "PILOTHOUSE_KAFKA_SASL_MECHANISM": bus.sasl_mechanism,
                 "PILOTHOUSE_LEDGER_TOPIC_ENTRIES": entries_topic, "PILOTHOUSE_LEDGER_TOPIC_CHECKPOINTS": cps_topic,
                 "PILOTHOUSE_LEDGER_GROUP_PREFIX": f"test.{uuid.uuid4().hex[:10]}",
                 "PILOTHOUSE_LEDGER_CHECKPOINT_DIR": str(tmp_path / "cp"),
                 "PILOTHOUSE_LEDGER_TRUSTED_KEYS": json.dumps(
                     {"ledger-kafka-test": base64.b64encode(SIGNER.public_key.public_bytes_raw()).decode()})}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PILOTHOUSE_LEDGER_SIGNING_KEY", raising=False)

    class L:
        topic = entries_topic
        checkpoints = cps_topic
        settings = bus

        @staticmethod
        def write(entries) -> None:
            ds = [producer.produce(to_entry_record(e), key=e.entry_key, topic=entries_topic) for e in entries]
            producer.wait(ds)

        @staticmethod
        def tombstone(key: str) -> None:
            producer.wait([producer.produce_bytes(entries_topic, None, key=key)])

        @staticmethod
        def checkpoint(cp, file: bool = True) -> None:
            CheckpointPublisher(producer, cps_topic).publish(cp)
            if file:
                CheckpointFile(tmp_path / "cp").append([cp])

        producer_ = producer

    return L


def _verify(capsys, *extra: str) -> tuple[int, dict]:
    rc = cli.main(["verify", "--no-postgres", "--timeout", "30", *extra])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_clean_chain_on_kafka_verifies(ledger, capsys) -> None:
    chain, entries = _chain(12)
    ledger.write(entries)
    ledger.checkpoint(chain.checkpoint(SIGNER, 1_764_000_100_000))
    rc, report = _verify(capsys)
    assert rc == 0, report
    assert report["mode"] == "streaming"  # the bounded-memory pass verified it; nothing loaded whole
    assert report["entries"] == {"main": 12} and report["checkpoints_verified"] >= 1
    assert report["read"]["kafka"]["checkpoints"] == 1 and report["read"]["kafka"]["records"] == 12
    rc, full = _verify(capsys, "--full")
    assert rc == 0 and full["mode"] == "full" and full["entries"] == report["entries"]
    assert full["checkpoints_verified"] == report["checkpoints_verified"]


def test_tombstone_is_tamper_evidence_for_verify_and_the_mirror(ledger, capsys, stack_info) -> None:
    chain, entries = _chain(10)
    ledger.write(entries)
    ledger.tombstone(entry_key("main", 4))
    rc, report = _verify(capsys)
    assert rc == 1
    assert report["first"]["kind"] == ProblemKind.TOMBSTONE.value and report["first"]["sequence"] == 4
    assert report["first"]["source"] == "kafka" and report["mode"].startswith("full (the streaming pass stopped")

    # The mirror copies the 10 entries, then stops at the tombstone: nothing skipped, nothing accepted silently.
    schema = "ledger_k_" + uuid.uuid4().hex[:10]
    with PostgresLedgerMirror(stack_info.postgres_dsn, schema=schema) as m:
        m.migrate()
        try:
            producer = ledger.producer_
            worker = MirrorWorker(
                lambda offsets: TopicReader(ledger.settings, ledger.topic, group_id=f"test.{uuid.uuid4().hex}",
                                            producer=producer, start=lambda p, lo, hi: offsets.get(p, 0)),
                PostgresLedgerMirror(stack_info.postgres_dsn, schema=schema), topic=ledger.topic)
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    worker.run()
                except BaseException as e:  # noqa: BLE001 - collected for the assertion
                    errors.append(e)

            t = threading.Thread(target=run)
            t.start()
            t.join(60)
            worker.stop()
            t.join(5)
            worker.close()
            assert len(errors) == 1 and isinstance(errors[0], LedgerIntegrityError)
            assert errors[0].problem.kind is ProblemKind.TOMBSTONE and errors[0].problem.sequence == 4
            assert len(m.read_entries()) == 10
            assert m.next_offsets(ledger.topic) == {0: 10}  # the tombstone (offset 10) is neither mirrored nor passed
        finally:
            with m._connection() as c:  # noqa: SLF001 - test cleanup of its own schema
                c.execute(f"DROP SCHEMA {schema} CASCADE")


def test_skipped_sequence_is_a_gap(ledger, capsys) -> None:
    chain, entries = _chain(10)
    ledger.write(entries[:5] + entries[6:])
    rc, report = _verify(capsys)
    assert rc == 1
    assert report["first"]["kind"] == ProblemKind.GAP.value and report["first"]["sequence"] == 5


def test_a_missing_head_is_a_gap_and_delete_records_is_refused_on_the_compacted_topic(ledger, capsys,
                                                                                        stack_info) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient  # the test plays the attacker with admin rights

    chain, entries = _chain(8)
    ledger.write(entries[3:])  # what a topic re-created without its first entries looks like
    rc, report = _verify(capsys)
    assert rc == 1
    assert report["first"]["kind"] == ProblemKind.GAP.value and report["first"]["sequence"] == 0

    # Cutting the head off the real (compacted) topic is not even possible: the broker refuses DeleteRecords there.
    admin = AdminClient(stack_info.kafka_config("admin"))
    with pytest.raises(KafkaException, match="POLICY_VIOLATION"):
        for f in admin.delete_records([TopicPartition(ledger.topic, 0, 2)]).values():
            f.result(30)


def test_forged_checkpoints_on_the_topic(ledger, capsys) -> None:
    chain, entries = _chain(16)
    ledger.write(entries)
    good = chain.checkpoint(SIGNER, 1_764_000_100_000)
    ledger.checkpoint(good)
    rc, _ = _verify(capsys)
    assert rc == 0

    # 1. signed by a key that is not trusted (same name, other key: its key id differs)
    ledger.checkpoint(chain.checkpoint(ROGUE, 1_764_000_200_000), file=False)
    rc, report = _verify(capsys)
    assert rc == 1 and report["first"]["kind"] == ProblemKind.BAD_SIGNATURE.value
    assert "not a trusted key" in report["first"]["detail"]


def test_checkpoint_with_an_altered_root_fails_its_signature(ledger, capsys) -> None:
    chain, entries = _chain(16)
    ledger.write(entries)
    good = chain.checkpoint(SIGNER, 1_764_000_100_000)
    forged = type(good)(good.chain, good.tree_size, "ab" * 32, good.signed_at, good.key_id, good.signature,
                        good.head_hash)
    ledger.producer_.send(to_checkpoint_record(forged), key=str(forged.tree_size), topic=ledger.checkpoints)
    rc, report = _verify(capsys)
    assert rc == 1 and report["first"]["kind"] == ProblemKind.BAD_SIGNATURE.value
    assert "does not verify" in report["first"]["detail"]


def test_a_validly_signed_checkpoint_over_other_entries_is_caught(ledger, capsys) -> None:
    # What a signer-key thief who rewrote the topic's history would leave behind: the honest checkpoint in the file
    # outside Kafka no longer matches the (internally consistent) rewritten chain.
    chain, entries = _chain(10)
    honest = chain.checkpoint(SIGNER, 1_764_000_100_000)
    CheckpointFile(os.environ["PILOTHOUSE_LEDGER_CHECKPOINT_DIR"]).append([honest])
    other = LedgerChain("main")
    rewritten = [other.record({"event_id": f"ev-{i}", "incident_id": "inc-1", "n": i if i < 6 else -i},
                              event_id=f"entry-{i}", occurred_at=1_764_000_000_000 + i, producer="ledger",
                              recorded_topic="pilothouse.console.kill-switch.v1",
                              recorded_type="pilothouse.console.KillSwitchChanged", recorded_offset=i)
                 for i in range(10)]
    ledger.write(rewritten)
    rc, report = _verify(capsys)
    assert rc == 1
    assert report["first"]["kind"] == ProblemKind.CHECKPOINT_ROOT_MISMATCH.value
    assert report["first"]["sequence"] == 0  # nothing before the checkpoint can be vouched for


def test_the_ledger_principal_may_do_what_the_service_does_and_nothing_else(bus_settings, monkeypatch, capsys,
                                                                               stack_info, tmp_path) -> None:
    """Against the real catalogue topics, read-only: the ledger principal reads the ledger and checkpoints topics
    with `pilothouse.ledger.*` groups and may own `pilothouse.ledger.*` transactional ids; a foreign id is refused."""
    from pilothouse.bus.errors import NotAuthorized
    from pilothouse.bus.transactions import TransactionalProcessor
    from pilothouse.ledger.config import TOPIC_ENTRIES

    ledger_bus = bus_settings("ledger")
    ok = TransactionalProcessor(ledger_bus, group_id=f"pilothouse.ledger.acl-test.{uuid.uuid4().hex[:8]}",
                                transactional_id=f"pilothouse.ledger.acl-test.{uuid.uuid4().hex[:8]}",
                                handlers={TOPIC_ENTRIES: lambda r, c: []})
    ok.close()
    with pytest.raises(NotAuthorized, match="TRANSACTIONAL_ID_AUTHORIZATION_FAILED"):
        TransactionalProcessor(ledger_bus, group_id=f"pilothouse.ledger.acl-test.{uuid.uuid4().hex[:8]}",
                               transactional_id=f"pilothouse.policy.acl-test.{uuid.uuid4().hex[:8]}",
                               handlers={TOPIC_ENTRIES: lambda r, c: []})
    for k, v in {"PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": ledger_bus.bootstrap_servers,
                 "PILOTHOUSE_KAFKA_USERNAME": "ledger", "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password("ledger"),
                 "PILOTHOUSE_LEDGER_CHECKPOINT_DIR": str(tmp_path / "none"),
                 "PILOTHOUSE_LEDGER_TRUSTED_KEYS": json.dumps(
                     {"ledger-kafka-test": base64.b64encode(SIGNER.public_key.public_bytes_raw()).decode()})}.items():
        monkeypatch.setenv(k, v)
    for k in ("PILOTHOUSE_LEDGER_TOPIC_ENTRIES", "PILOTHOUSE_LEDGER_TOPIC_CHECKPOINTS",
              "PILOTHOUSE_LEDGER_GROUP_PREFIX", "PILOTHOUSE_LEDGER_SIGNING_KEY"):
        monkeypatch.delenv(k, raising=False)
    rc = cli.main(["verify", "--no-postgres", "--timeout", "30"])
    report = json.loads(capsys.readouterr().out)
    # Whatever other tests left on the shared ledger topic, the principal could read both topics to their end.
    assert rc in (0, 1) and report["read"]["kafka"]["entries_topic"] == TOPIC_ENTRIES
