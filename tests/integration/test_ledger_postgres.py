"""The ledger's Postgres mirror against a real Postgres: append-only guards, tampering as a superuser (each caught by
verify), crash/replay at random points, integrity errors while mirroring.

DSN: env PILOTHOUSE_POSTGRES_DSN, else ``pilothouse.stack.StackInfo.load().postgres_dsn``. Tampering needs a
superuser: env PILOTHOUSE_POSTGRES_ADMIN_DSN, else the DSN above when its role is a superuser (the stack's is).
Every test works in its own uuid-named schema.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from hashlib import sha256

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from pilothouse.ledger.adapters.postgres import (
    LedgerStoreError,
    MirrorRecord,
    PostgresLedgerMirror,
)
from pilothouse.ledger.domain import (
    CheckpointSigner,
    KafkaTombstone,
    LedgerChain,
    LedgerEntry,
    LedgerIntegrityError,
    ProblemKind,
    StreamingVerifier,
    VerifyResult,
    compute_entry_hash,
)
from pilothouse.ledger.domain import verify as reference_verify
from pilothouse.ledger.native import scanner as compiled_scanner

pytestmark = pytest.mark.integration
# The pure-Python reference and the compiled scanner (one and two threads) where it can be built: each must reach the
# same verdict on every tampered table, and the compiled streaming pass (what `ledger verify` runs first) must refuse.
COMPILED = [s for s in (compiled_scanner(1), compiled_scanner(2)) if s is not None]


def verify(kafka, rows, cps, keys, **kw) -> VerifyResult:
    result = reference_verify(kafka, rows, cps, keys, **kw)
    for scan in COMPILED:
        assert reference_verify(kafka, rows, cps, keys, scanner=scan, **kw) == result
        chain = "main"
        primary = list(kafka if kafka is not None else rows)
        secondary = list(rows) if kafka is not None and rows is not None else None
        sv = StreamingVerifier(chain, cps, keys, scanner=scan, **kw)
        step = 64
        for i in range(0, len(primary), step):
            if not sv.feed(primary[i:i + step], None if secondary is None else secondary[i:i + step]):
                break
        streamed = sv.finish(secondary_has_more=secondary is not None and len(secondary) > len(primary))
        if result.ok:
            assert streamed == result, sv.failed
        else:
            assert streamed is None and sv.failed, "the compiled streaming pass passed a tampered ledger"
    return result

TOPIC = "pilothouse.ledger.entries.v1"
SIGNER = CheckpointSigner.from_seed("pilothouse-ledger-test", bytes(range(32)))
KEYS = {SIGNER.key_id: SIGNER.public_key}
N = 300


def _dsn() -> str | None:
    dsn = os.environ.get("PILOTHOUSE_POSTGRES_DSN")
    if dsn:
        return dsn
    try:
        from pilothouse.stack import StackInfo  # noqa: PLC0415 - optional: the stack may not be provisioned
    except ImportError:
        try:
            from pilothouse.stack.info import StackInfo  # noqa: PLC0415
        except ImportError:
            return None
    try:
        return StackInfo.load().postgres_dsn
    except Exception:  # noqa: BLE001 - not provisioned / unreadable: the test is skipped with the reason below
        return None


DSN = _dsn()
if DSN is None:
    pytest.skip("no Postgres: set PILOTHOUSE_POSTGRES_DSN or run `pilothouse stack up`", allow_module_level=True)


def _is_superuser(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=10) as c:
        return bool(c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0])


@pytest.fixture(scope="module")
def admin_dsn() -> str:
    dsn = os.environ.get("PILOTHOUSE_POSTGRES_ADMIN_DSN")
    if dsn:
        return dsn
    if _is_superuser(DSN):
        return DSN
    pytest.skip("tampering needs a superuser: set PILOTHOUSE_POSTGRES_ADMIN_DSN")


def _build(n: int = N, every: int = 100) -> tuple[list[LedgerEntry], list]:
    chain = LedgerChain("main")
    entries, cps = [], []
    for i in range(n):
        event = {"event_id": f"ev-{i}", "incident_id": f"inc-{i % 4}", "correlation_id": f"inc-{i % 4}",
                 "decision": "allow" if i % 3 else "deny", "reasons": [f"rule-{i % 7}"], "note": "ünïcode ✓"}
        entries.append(chain.record(event, event_id=str(uuid.UUID(int=i + 1)), occurred_at=1_764_000_000_000 + i,
                                    producer="ledger", recorded_topic="pilothouse.policy.decisions.v1",
                                    recorded_type="pilothouse.policy.PolicyDecided", recorded_offset=i))
        if (i + 1) % every == 0:
            cps.append(chain.checkpoint(SIGNER, 1_764_000_500_000 + i))
    return entries, cps


ENTRIES, CPS = _build()


def _records(entries: list, start: int = 0) -> list[MirrorRecord]:
    return [MirrorRecord(0, start + i, e) for i, e in enumerate(entries)]


@pytest.fixture
def schema() -> Iterator[str]:
    name = "ledger_test_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(DSN, autocommit=True) as c:
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def mirror(schema: str) -> Iterator[PostgresLedgerMirror]:
    m = PostgresLedgerMirror(DSN, schema=schema)
    m.migrate()
    m.migrate()  # idempotent
    yield m
    m.close()


def _fill(m: PostgresLedgerMirror, batch: int = 64) -> None:
    recs = _records(ENTRIES)
    for i in range(0, len(recs), batch):
        m.write_batch(TOPIC, recs[i : i + batch])
    m.append_checkpoints(CPS)


def test_mirror_round_trip_verifies(mirror: PostgresLedgerMirror) -> None:
    _fill(mirror)
    rows = mirror.read_entries()
    assert len(rows) == N and rows == [tuple(e) for e in ENTRIES]
    stored_cps = mirror.read_checkpoints()
    assert stored_cps == CPS
    result = verify(ENTRIES, rows, stored_cps, KEYS)
    assert result.ok and result.checkpoints_verified == len(CPS)
    assert mirror.next_offsets(TOPIC) == {0: N}
    assert mirror.append_checkpoints(CPS) == len(CPS)  # idempotent
    other = SIGNER.sign("main", CPS[0].tree_size, "ab" * 32, 1, CPS[0].head_hash)  # same slot, different root
    with pytest.raises(LedgerStoreError, match="split view"):
        mirror.append_checkpoints([other])


def _exec(dsn: str, query: sql.Composable | str, params: tuple = (), *, replica: bool = False) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        if replica:
            c.execute("SET session_replication_role = replica")
        c.execute(query, params)


def test_append_only_for_writer_owner_and_replica_mode(schema: str, admin_dsn: str) -> None:
    role = "ledger_writer_" + uuid.uuid4().hex[:8]
    password = uuid.uuid4().hex
    _exec(admin_dsn, sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    try:
        owner = PostgresLedgerMirror(DSN, schema=schema)
        owner.migrate(writer_role=role)
        writer_dsn = psycopg.conninfo.make_conninfo(DSN, user=role, password=password)
        with PostgresLedgerMirror(writer_dsn, schema=schema) as writer:
            writer.write_batch(TOPIC, _records(ENTRIES[:50]))
            writer.append_checkpoints([])
            assert len(writer.read_entries()) == 50
        t = sql.SQL("{}.ledger_entries").format(sql.Identifier(schema))
        attempts = [sql.SQL("UPDATE {} SET producer = 'x' WHERE sequence = 3").format(t),
                    sql.SQL("DELETE FROM {} WHERE sequence = 3").format(t),
                    sql.SQL("TRUNCATE {}").format(t)]
        for q in attempts:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # writer: no privilege at all
                _exec(writer_dsn, q)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):  # owner: the trigger
                _exec(DSN, q)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):  # superuser, replica mode
                _exec(admin_dsn, q, replica=True)
        owner.close()
        assert len(PostgresLedgerMirror(DSN, schema=schema).read_entries()) == 50
    finally:
        _exec(admin_dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        _exec(admin_dsn, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# ----------------------------------------------------------------------------------------- tampering as superuser ---
def _tamper(admin_dsn: str, schema: str, *statements: tuple[str, tuple]) -> None:
    """Run statements as a superuser who switches the append-only triggers off first (and on again after)."""
    t = sql.SQL("{}.ledger_entries").format(sql.Identifier(schema))
    with psycopg.connect(admin_dsn) as c, c.transaction():
        c.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(t))
        for q, params in statements:
            c.execute(sql.SQL(q).format(t=t), params)
        for trigger in ("ledger_entries_no_update_delete", "ledger_entries_no_truncate"):
            c.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(t, sql.Identifier(trigger)))


def _rehashed(entries: list[LedgerEntry], start: int) -> list[LedgerEntry]:
    out, prev = list(entries[:start]), entries[start - 1].entry_hash
    for e in entries[start:]:
        if e.sequence == start:
            payload = e.payload_json.replace("rule-", "rule-x")
            e = e._replace(payload_json=payload, payload_sha256=sha256(payload.encode()).hexdigest())
        e = e._replace(prev_hash=prev)
        e = e._replace(entry_hash=compute_entry_hash(e))
        out.append(e)
        prev = e.entry_hash
    return out


TAMPERS = {
    "update_payload": ([("UPDATE {t} SET payload_json = replace(payload_json, 'inc-', 'INC-') WHERE sequence = 123",
                         ())], ProblemKind.HASH_MISMATCH, 123),
    "update_incident": ([("UPDATE {t} SET incident_id = 'inc-other' WHERE sequence = 42", ())],
                        ProblemKind.HASH_MISMATCH, 42),
    "delete_row": ([("DELETE FROM {t} WHERE sequence = 150", ())], ProblemKind.GAP, 150),
    "truncate": ([("TRUNCATE {t}", ())], ProblemKind.TRUNCATED, 0),
    "tail_truncation": ([("DELETE FROM {t} WHERE sequence >= 250", ())], ProblemKind.TRUNCATED, 250),
    "reorder_rows": ([("UPDATE {t} SET sequence = 1000000 WHERE sequence = 77", ()),
                      ("UPDATE {t} SET sequence = 77 WHERE sequence = 78", ()),
                      ("UPDATE {t} SET sequence = 78 WHERE sequence = 1000000", ())], ProblemKind.REORDER, 77),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_superuser_tampering_is_detected(name: str, mirror: PostgresLedgerMirror, schema: str,
                                         admin_dsn: str) -> None:
    statements, kind, seq = TAMPERS[name]
    _fill(mirror)
    assert verify(ENTRIES, mirror.read_entries(), CPS, KEYS).ok
    _tamper(admin_dsn, schema, *statements)
    rows = mirror.read_entries()
    for kafka in (None, ENTRIES):  # Postgres alone with the signed checkpoints, and against Kafka
        result = verify(kafka, rows, mirror.read_checkpoints(), KEYS)
        assert not result.ok, f"{name} not detected (kafka={'yes' if kafka else 'no'})"
        assert (result.first.kind, result.first.sequence) == (kind, seq), result.first


def test_rehashed_suffix_is_caught_by_checkpoints_and_kafka(mirror: PostgresLedgerMirror, schema: str,
                                                             admin_dsn: str) -> None:
    _fill(mirror)
    forged = _rehashed(ENTRIES, 230)
    cols = [c for c in LedgerEntry._fields if c not in ("chain", "sequence")]
    sets = ", ".join(f"{c} = %s" for c in cols)
    _tamper(admin_dsn, schema, *[(f"UPDATE {{t}} SET {sets} WHERE chain = %s AND sequence = %s",
                                  (*[getattr(e, c) for c in cols], e.chain, e.sequence)) for e in forged[230:]])
    rows = mirror.read_entries()
    assert rows[230] != tuple(ENTRIES[230]) and verify(None, rows, [], KEYS).ok  # a hash chain alone is fooled
    first = verify(None, rows, mirror.read_checkpoints(), KEYS).first
    assert (first.kind, first.sequence) == (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 200)
    first = verify(ENTRIES, rows, mirror.read_checkpoints(), KEYS).first
    assert (first.kind, first.sequence, first.source) == (ProblemKind.REHASHED_SUFFIX, 230, "postgres")


def test_forged_checkpoint_is_detected(mirror: PostgresLedgerMirror) -> None:
    _fill(mirror)
    forger = CheckpointSigner("pilothouse-ledger-test", Ed25519PrivateKey.generate())
    chain = LedgerChain("main", ENTRIES[:250])
    mirror.append_checkpoints([chain.checkpoint(forger, 2)])  # INSERT is allowed: append-only, not sign-only
    result = verify(ENTRIES, mirror.read_entries(), mirror.read_checkpoints(), KEYS)
    assert result.first.kind is ProblemKind.BAD_SIGNATURE and "not a trusted key" in result.first.detail


# --------------------------------------------------------------------------------------------- crash and replay ---
def test_crash_and_replay_at_random_points_never_duplicates_or_skips(schema: str) -> None:
    rng = random.Random(20261125)
    recs = _records(ENTRIES)
    kafka_committed = 0  # what the Kafka consumer group committed (lags: committed after Postgres)
    mirror = PostgresLedgerMirror(DSN, schema=schema)
    mirror.migrate()
    crashes = {"before_commit": 0, "after_commit": 0, "restart_from_kafka_offset": 0}
    steps = 0
    while True:
        start = mirror.next_offsets(TOPIC).get(0, 0)
        if start >= N:
            break
        steps += 1
        assert steps < 500
        end = min(N, start + rng.randint(1, 40))
        mode = rng.choice(["ok", "ok", "before_commit", "after_commit", "restart_from_kafka_offset"])
        if mode == "before_commit":
            # the batch's work is done inside a transaction that never commits: the process dies
            conn = mirror._connection()
            conn.execute("BEGIN")
            mirror.write_batch(TOPIC, recs[start:end])  # runs as a savepoint inside the open transaction
            conn.pgconn.finish()  # connection gone without COMMIT: Postgres rolls everything back
            mirror = PostgresLedgerMirror(DSN, schema=schema)
            assert mirror.next_offsets(TOPIC).get(0, 0) == start and len(mirror.read_entries()) == start
        elif mode == "after_commit":
            mirror.write_batch(TOPIC, recs[start:end])  # committed, but the Kafka offset commit never happens
            mirror.close()
            mirror = PostgresLedgerMirror(DSN, schema=schema)
            assert mirror.next_offsets(TOPIC) == {0: end} and len(mirror.read_entries()) == end
        elif mode == "restart_from_kafka_offset":
            # a restarted consumer that resumed from Kafka's (older) committed offset re-reads records
            result = mirror.write_batch(TOPIC, recs[kafka_committed:end])
            assert result.already_mirrored == start - kafka_committed
            kafka_committed = end
        else:
            mirror.write_batch(TOPIC, recs[start:end])
            kafka_committed = end
        crashes[mode] = crashes.get(mode, 0) + 1
    rows = mirror.read_entries()
    assert rows == [tuple(e) for e in ENTRIES]  # every entry exactly once, in order
    assert verify(ENTRIES, rows, CPS, KEYS).ok
    assert all(crashes[k] > 0 for k in ("before_commit", "after_commit", "restart_from_kafka_offset")), crashes
    mirror.close()


def test_replay_with_a_lost_tracking_row_is_idempotent(mirror: PostgresLedgerMirror, schema: str) -> None:
    mirror.write_batch(TOPIC, _records(ENTRIES[:100]))
    other = PostgresLedgerMirror(DSN, schema=schema, consumer_group="pilothouse.ledger.mirror-2")  # no offsets yet
    result = other.write_batch(TOPIC, _records(ENTRIES[:120]))
    assert (result.written, result.replayed) == (20, 100)
    assert len(mirror.read_entries()) == 120
    forked = ENTRIES[10]._replace(producer="evil")
    forked = forked._replace(entry_hash=compute_entry_hash(forked))
    third = PostgresLedgerMirror(DSN, schema=schema, consumer_group="pilothouse.ledger.mirror-3")
    with pytest.raises(LedgerIntegrityError, match="fork"):
        third.write_batch(TOPIC, _records(ENTRIES[:10] + [forked]))
    assert len(mirror.read_entries()) == 120
    other.close()
    third.close()


@pytest.mark.parametrize("bad", ["gap", "tombstone", "bad_hash"])
def test_tamper_evidence_stops_the_mirror_without_losing_anything(bad: str, mirror: PostgresLedgerMirror) -> None:
    recs = _records(ENTRIES[:60])
    if bad == "gap":
        recs = recs[:40] + recs[41:]
    elif bad == "tombstone":
        recs[40] = MirrorRecord(0, 40, KafkaTombstone(ENTRIES[40].entry_key, 40))
    else:
        recs[40] = MirrorRecord(0, 40, ENTRIES[40]._replace(payload_json=ENTRIES[40].payload_json + " "))
    with pytest.raises(LedgerIntegrityError) as err:
        mirror.write_batch(TOPIC, recs[:30])  # fine
        mirror.write_batch(TOPIC, recs[30:])
    assert err.value.problem.sequence == 40 and err.value.accepted == 10
    assert "offset 4" in str(err.value)  # names where the bad record is (offset 40 or 41)
    assert len(mirror.read_entries()) == 40 and mirror.next_offsets(TOPIC) == {0: 40}
    with pytest.raises(LedgerIntegrityError):  # a restart meets the same record again: nothing skipped
        mirror.write_batch(TOPIC, recs[40:])
    assert len(mirror.read_entries()) == 40


def test_audit_command(mirror: PostgresLedgerMirror, schema: str, admin_dsn: str, tmp_path, capsys) -> None:
    import base64  # noqa: PLC0415
    import json  # noqa: PLC0415

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: PLC0415

    from pilothouse.ledger.adapters.audit import main  # noqa: PLC0415
    from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile  # noqa: PLC0415

    _fill(mirror)
    CheckpointFile(tmp_path).append(CPS)
    raw = base64.b64encode(SIGNER.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    argv = ["--dsn", DSN, "--schema", schema, "--checkpoint-dir", str(tmp_path),
            "--public-key", f"pilothouse-ledger-test={raw}"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["entries"] == {"main": N} and report["checkpoints_verified"] == len(CPS)
    _tamper(admin_dsn, schema, ("DELETE FROM {t} WHERE sequence >= 280", ()))
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first"]["kind"] == "truncated" and report["first"]["sequence"] == 280
    assert main(["--dsn", DSN, "--schema", schema, "--public-key", "nokey"]) == 2


def test_the_stacks_writer_role_mirrors_but_cannot_change_rows_or_triggers(schema: str, admin_dsn: str) -> None:
    """`pilothouse stack up` creates the writer role with `ensure_roles`; here with a uuid name, on the real server."""
    from pilothouse.stack import postgres as stack_postgres  # noqa: PLC0415 - the stack is optional for this module
    from pilothouse.stack.info import StackInfo  # noqa: PLC0415

    info = StackInfo.load()
    role = "ledger_writer_" + uuid.uuid4().hex[:8]
    data = info.to_plain()
    data["postgres"]["roles"] = {role: uuid.uuid4().hex}
    test_info = StackInfo.model_validate(data)
    try:
        with psycopg.connect(info.postgres_admin_dsn, autocommit=True) as c:
            stack_postgres.ensure_roles(c, test_info)
            stack_postgres.ensure_roles(c, test_info)  # idempotent (re-passwords)
            assert c.execute("SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = %s",
                             (role,)).fetchone() == (False, False, False)
        PostgresLedgerMirror(info.postgres_admin_dsn, schema=schema).migrate(writer_role=role)
        writer_dsn = test_info.postgres_dsn_for(role)
        with PostgresLedgerMirror(writer_dsn, schema=schema) as writer:
            writer.write_batch(TOPIC, _records(ENTRIES[:20]))
            assert len(writer.read_entries()) == 20
        t = sql.SQL("{}.ledger_entries").format(sql.Identifier(schema))
        for q in (sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(t),
                  sql.SQL("UPDATE {} SET producer = 'x' WHERE sequence = 3").format(t)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                _exec(writer_dsn, q)
    finally:
        _exec(admin_dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        _exec(admin_dsn, sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
            sql.Identifier(info.postgres.database), sql.Identifier(role)))
        _exec(admin_dsn, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
