"""``pilothouse approve|reject|validate`` against the console's HTTP API (in process, recording sink)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from pilothouse.decide_cli import approve, main, reject, validate
from pilothouse.bus.attestation import write_human_key
from tests.unit.test_console_web import KEYS, env, world  # noqa: F401 - the same console fixtures


@pytest.fixture
def client(env):  # noqa: F811
    console, _, _ = env
    return TestClient(console.app, base_url="http://testserver")


def as_user(monkeypatch, user: str) -> None:
    import tempfile
    from pathlib import Path

    monkeypatch.setenv("PILOTHOUSE_CONSOLE_PASSWORD", f"pw-{user}")
    key_file = Path(tempfile.mkdtemp()) / f"{user}.key"
    write_human_key(key_file, KEYS[user])
    monkeypatch.setenv("PILOTHOUSE_HUMAN_KEY", str(key_file))


def test_approve_binds_the_current_hash_and_prints_what_it_approved(env, world, client, monkeypatch, capsys):  # noqa: F811
    _, _, sink = env
    as_user(monkeypatch, "alice")
    assert approve([world.action_id, "--user", "alice", "--comment", "from the CLI", "--yes"], client) == 0
    out = capsys.readouterr()
    assert world.hash in out.err and "Recorded: you approved" in out.out
    rec = sink.sent[-1]
    assert (rec.approver_id, rec.action_hash, rec.comment) == ("alice", world.hash, "from the CLI")


def test_second_approval_is_refused_with_the_reason(env, world, client, monkeypatch, capsys):  # noqa: F811
    as_user(monkeypatch, "alice")
    assert approve([world.action_id, "--user", "alice", "--hash", world.hash], client) == 0
    assert approve([world.action_id, "--user", "alice", "--hash", world.hash], client) == 1
    assert "duplicate_approver" in capsys.readouterr().err


def test_stale_hash_is_refused(env, world, client, monkeypatch, capsys):  # noqa: F811
    as_user(monkeypatch, "bob")
    assert reject([world.action_id, "--user", "bob", "--hash", "0" * 64, "--comment", "no"], client) == 1
    assert "hash_mismatch" in capsys.readouterr().err
    assert env[2].sent == []


def test_validate_and_wrong_password(env, world, client, monkeypatch, capsys):  # noqa: F811
    as_user(monkeypatch, "rita")
    assert validate([world.h2, "--user", "rita", "--reject", "--comment", "no payments data"], client) == 0
    assert env[2].sent[-1].verdict == "rejected"
    monkeypatch.setenv("PILOTHOUSE_CONSOLE_PASSWORD", "wrong")
    assert validate([world.h1, "--user", "rita"], client) == 1
    assert "login_failed" in capsys.readouterr().err


def test_usage_errors(client, monkeypatch, capsys):
    monkeypatch.delenv("PILOTHOUSE_CONSOLE_USER", raising=False)
    assert main(["approve", "x"], client) == 2
    assert "--user" in capsys.readouterr().err
    assert main([], client) == 2


def test_unreachable_console_exits_3(monkeypatch, capsys):
    monkeypatch.setenv("PILOTHOUSE_CONSOLE_PASSWORD", "x")
    assert approve(["a1", "--user", "alice", "--url", "http://127.0.0.1:9"]) == 3
    assert "cannot reach the console" in capsys.readouterr().err


def test_without_a_key_nothing_is_recorded(env, world, client, monkeypatch, capsys):  # noqa: F811
    _, _, sink = env
    as_user(monkeypatch, "alice")
    monkeypatch.delenv("PILOTHOUSE_HUMAN_KEY")
    assert approve([world.action_id, "--user", "alice", "--hash", world.hash], client) == 2
    assert "--key" in capsys.readouterr().err and sink.sent == []
    # Someone else's key: the console refuses it with the reason.
    as_user(monkeypatch, "bob")
    monkeypatch.setenv("PILOTHOUSE_CONSOLE_PASSWORD", "pw-alice")
    assert approve([world.action_id, "--user", "alice", "--hash", world.hash], client) == 1
    assert "not enrolled for alice" in capsys.readouterr().err and sink.sent == []
