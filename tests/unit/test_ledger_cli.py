"""``pilothouse ledger`` without a broker or a database: keygen, the offline audit of a ledger-topic dump against the
checkpoint file (verify and prove), and the refusals that exit 2."""

from __future__ import annotations

import base64
import json

import orjson
import pytest

from pilothouse.ledger import cli
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.domain import CheckpointSigner, LedgerChain

SIGNER = CheckpointSigner.from_seed("cli-test", bytes(range(1, 33)))
PUB = base64.b64encode(SIGNER.public_key.public_bytes_raw()).decode()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k in ("PILOTHOUSE_LEDGER_SIGNING_KEY", "PILOTHOUSE_LEDGER_TRUSTED_KEYS", "PILOTHOUSE_LEDGER_POSTGRES_DSN"):
        monkeypatch.delenv(k, raising=False)
    chain = LedgerChain("main")
    entries = [chain.record({"event_id": f"ev-{i}", "incident_id": "inc-1", "n": i}, event_id=f"le-{i}",
                            occurred_at=1_764_000_000_000 + i, producer="ledger", recorded_topic="t",
                            recorded_type="pilothouse.console.KillSwitchChanged") for i in range(20)]
    CheckpointFile(tmp_path / "cp").append([chain.checkpoint(SIGNER, 1_764_000_100_000)])
    dump = tmp_path / "ledger.jsonl"

    def write(items) -> None:
        dump.write_bytes(b"".join(orjson.dumps(e if e is None else e.to_record()) + b"\n" for e in items))

    write(entries)
    args = ["--kafka-jsonl", str(dump), "--no-postgres", "--checkpoint-dir", str(tmp_path / "cp"),
            "--public-key", f"cli-test={PUB}"]
    return entries, write, args


LAST_ERR: list[str] = [""]


def _run(capsys, *argv: str) -> tuple[int, dict]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    LAST_ERR[0] = out.err
    return rc, json.loads(out.out or out.err)


def test_offline_dump_verifies_and_proves(offline, capsys) -> None:
    entries, _, args = offline
    rc, report = _run(capsys, "verify", *args)
    assert rc == 0 and report["ok"] and report["entries"] == {"main": 20} and report["checkpoints_verified"] == 1
    rc, proof = _run(capsys, "prove", "ev-7", *args)  # by the recorded event's id
    assert rc == 0 and proof["ok"] and proof["sequence"] == 7 and proof["tree_size"] == 20
    assert proof["leaf_hash"] == entries[7].entry_hash
    rc, again = _run(capsys, "prove", entries[7].entry_key, *args)
    assert rc == 0 and again["proof"] == proof["proof"]
    assert cli.main(["prove", "no-such-entry", *args]) == 1


def test_offline_dump_with_a_changed_entry_or_a_tombstone_fails_with_the_sequence(offline, capsys) -> None:
    entries, write, args = offline
    changed = list(entries)
    changed[11] = changed[11]._replace(recorded_offset=5)
    write(changed)
    rc, report = _run(capsys, "verify", *args)
    assert rc == 1 and report["first"]["sequence"] == 11 and report["first"]["kind"] == "hash_mismatch"
    assert LAST_ERR[0].startswith("ledger verify: FAILED at sequence 11: hash_mismatch (kafka)")
    write(entries[:9] + [None] + entries[9:])
    rc, report = _run(capsys, "verify", *args)
    assert rc == 1 and report["first"]["kind"] == "tombstone"
    assert cli.main(["prove", "ev-3", *args]) == 1  # refuses to prove on a ledger that does not verify


def test_processes_option_gives_the_same_verdict_and_refuses_nonsense(offline, capsys) -> None:
    entries, write, args = offline
    rc, one = _run(capsys, "verify", *args)
    rc2, two = _run(capsys, "verify", "--processes", "2", *args)
    assert two["read"].pop("verifier") == {"engine": "python", "processes": 2}
    one["read"].pop("verifier")
    assert rc == rc2 == 0 and one == two
    changed = list(entries)
    changed[4] = changed[4]._replace(producer="mallory")
    write(changed)
    rc, report = _run(capsys, "verify", "--processes", "2", *args)
    assert rc == 1 and (report["first"]["sequence"], report["first"]["kind"]) == (4, "hash_mismatch")
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--processes", "0", *args])
    assert e.value.code == 2


def test_untrusted_key_and_nothing_to_read_are_refused(offline, capsys, tmp_path) -> None:
    _, _, args = offline
    other = base64.b64encode(CheckpointSigner.from_seed("cli-test", b"\x05" * 32).public_key.public_bytes_raw())
    rc, report = _run(capsys, "verify", *args[:-1], f"cli-test={other.decode()}")
    assert rc == 1 and report["first"]["kind"] == "bad_signature"
    rc, err = _run(capsys, "verify", "--no-kafka", "--no-postgres", "--public-key", f"cli-test={PUB}")
    assert rc == 2 and "nothing to verify" in err["error"]
    rc, err = _run(capsys, "verify", "--no-postgres", "--kafka-jsonl", str(tmp_path / "ledger.jsonl"))
    assert rc == 2 and "no trusted public key" in err["error"]


def test_keygen_prints_a_seed_the_settings_accept(capsys, monkeypatch) -> None:
    assert cli.main(["keygen", "--name", "ops"]) == 0
    out = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("PILOTHOUSE_LEDGER_SIGNING_KEY", out["PILOTHOUSE_LEDGER_SIGNING_KEY"])
    monkeypatch.setenv("PILOTHOUSE_LEDGER_SIGNING_KEY_NAME", "ops")
    from pilothouse.ledger.__main__ import signer_from
    from pilothouse.ledger.config import Settings

    signer = signer_from(Settings())
    assert signer is not None and signer.key_id == out["key_id"]
    assert base64.b64decode(out["public_key"]) == signer.public_key.public_bytes_raw()


def test_the_service_refuses_to_start_without_what_its_workers_need(monkeypatch, capsys) -> None:
    from pilothouse.ledger.__main__ import main as run_main

    for k in ("PILOTHOUSE_LEDGER_POSTGRES_DSN", "PILOTHOUSE_LEDGER_SIGNING_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PILOTHOUSE_LEDGER_OBSERVABILITY_PORT", "0")
    assert run_main(["--workers", "mirror"]) == 2
    assert "the mirror needs PILOTHOUSE_LEDGER_POSTGRES_DSN" in capsys.readouterr().err
    assert run_main(["--workers", "checkpointer"]) == 2
    assert "needs PILOTHOUSE_LEDGER_SIGNING_KEY" in capsys.readouterr().err
    assert run_main(["--workers", "appender,bogus"]) == 2
    assert "unknown workers ['bogus']" in capsys.readouterr().err
    for k in ("PILOTHOUSE_KAFKA_USERNAME", "PILOTHOUSE_KAFKA_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    assert run_main(["--workers", "appender"]) == 2  # the Kafka client refuses SASL without credentials
    assert "cannot start" in capsys.readouterr().err
    monkeypatch.setenv("PILOTHOUSE_LEDGER_SIGNING_KEY", "c2hvcnQ=")
    assert run_main([]) == 2
    assert "32-byte Ed25519 seed" in capsys.readouterr().err
    monkeypatch.delenv("PILOTHOUSE_LEDGER_SIGNING_KEY")
    rc = cli.main(["verify", "--no-postgres", "--public-key", f"cli-test={PUB}"])  # no Kafka credentials either
    assert rc == 2 and "cannot audit" in capsys.readouterr().err


def test_verifier_option_compiled_and_python_give_the_same_verdict(offline, capsys) -> None:
    from pilothouse.ledger.native import load

    entries, write, args = offline
    reports = {}
    for choice in ("python", "auto", "compiled"):
        if choice == "compiled" and not load().available:
            rc, err = _run(capsys, "verify", "--verifier", "compiled", *args)
            assert rc == 2 and "--verifier compiled" in err["error"]  # refuses rather than run something else
            continue
        rc, reports[choice] = _run(capsys, "verify", "--verifier", choice, "--threads", "2", *args)
        assert rc == 0, reports[choice]
    engines = {c: r["read"].pop("verifier")["engine"] for c, r in reports.items()}
    assert engines["python"] == "python"
    assert engines["auto"] == ("compiled" if load().available else "python")
    assert all(r == reports["python"] for r in reports.values())
    changed = list(entries)
    changed[13] = changed[13]._replace(recorded_topic="elsewhere")
    write(changed)
    for choice in reports:
        rc, report = _run(capsys, "verify", "--verifier", choice, *args)
        assert rc == 1 and (report["first"]["sequence"], report["first"]["kind"]) == (13, "hash_mismatch")
