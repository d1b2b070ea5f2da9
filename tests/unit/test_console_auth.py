"""Local accounts (argon2id, roles from a file), signed server-side sessions, CSRF comparison, hash-password."""

from __future__ import annotations

import io

import pytest
import yaml
from argon2 import PasswordHasher

from pilothouse.bus.errors import ConfigurationError
from pilothouse.console.__main__ import main as console_main
from pilothouse.console.auth import LocalAccounts, SessionStore, csrf_ok, hash_password

_fast = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def users_file(tmp_path, users, suffix=".yaml"):
    p = tmp_path / f"users{suffix}"
    if suffix == ".yaml":
        p.write_text(yaml.safe_dump({"users": users}))
    else:
        p.write_text(users)
    return p


def test_accounts_from_yaml_normalise_ids_and_roles(tmp_path):
    acc = LocalAccounts.from_file(users_file(tmp_path, [
        {"id": "OnCall-7", "display": "On-call 7", "roles": ["Approver", " responder"], "password_hash": _fast.hash("pw")}]))
    a = acc.authenticate("ONCALL-7", "pw")
    assert a is not None and a.id == "oncall-7" and a.roles == ("approver", "responder")
    assert acc.authenticate("oncall\u200b-7", "pw").id == "oncall-7"  # invisible characters do not split a person
    assert acc.authenticate("oncall-7", "PW") is None
    assert acc.authenticate("nobody", "pw") is None


def test_accounts_from_toml(tmp_path):
    h = _fast.hash("pw")
    acc = LocalAccounts.from_file(users_file(tmp_path, f'[[users]]\nid = "ada"\nroles = ["admin"]\npassword_hash = "{h}"\n',
                                             ".toml"))
    assert acc.authenticate("ada", "pw").is_admin


@pytest.mark.parametrize("entry, message", [
    ({"id": "console", "roles": ["admin"]}, "service/model principal"),
    ({"id": "svc:deployer", "roles": ["admin"]}, "service/model principal"),
    ({"id": "eve", "roles": ["root"]}, "unknown roles"),
    ({"id": "eve", "roles": []}, "roles"),
    ({"id": "eve", "roles": ["admin"], "password_hash": "$2b$12$bcryptbcryptbcryptbcryptbc"}, "argon2id"),
    ({"id": "eve", "roles": ["admin"], "extra": 1}, "extra"),
])
def test_bad_users_file_entries_are_refused_with_the_reason(tmp_path, entry, message):
    entry = {"password_hash": _fast.hash("pw"), **entry}
    with pytest.raises(ConfigurationError, match=message):
        LocalAccounts.from_file(users_file(tmp_path, [entry]))


def test_duplicate_account_under_two_spellings_is_refused(tmp_path):
    h = _fast.hash("pw")
    with pytest.raises(ConfigurationError, match="listed twice"):
        LocalAccounts.from_file(users_file(tmp_path, [{"id": "Bob", "roles": ["admin"], "password_hash": h},
                                                      {"id": "bob", "roles": ["approver"], "password_hash": h}]))


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigurationError, match="users file"):
        LocalAccounts.from_file(tmp_path / "absent.yaml")
    with pytest.raises(ConfigurationError, match="top-level 'users' list"):
        LocalAccounts.from_file(users_file(tmp_path, "users: 3\n", ".yml"))


def test_sessions_expire_server_side_and_reject_bad_signatures():
    now = [1000.0]
    store = SessionStore(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    s = store.create()
    cookie = store.cookie_value(s)
    assert store.get(cookie) is s
    sid, sig = cookie.rsplit(".", 1)
    assert store.get(f"{sid}.{'0' * len(sig)}") is None
    assert store.get(sid) is None and store.get("") is None and store.get(None) is None
    other = SessionStore(b"x" * 32, ttl_s=60, clock=lambda: now[0])
    assert other.get(cookie) is None  # signed with another key
    now[0] += 61
    assert store.get(cookie) is None  # the cookie may live on in a browser; the server no longer accepts it


def test_session_store_stays_bounded():
    store = SessionStore(b"k" * 32, ttl_s=60, max_sessions=3)
    cookies = [store.cookie_value(store.create()) for _ in range(5)]
    assert sum(store.get(c) is not None for c in cookies) == 3


def test_csrf_comparison():
    store = SessionStore(b"k" * 32, ttl_s=60)
    s = store.create()
    assert csrf_ok(s, s.csrf_token)
    assert not csrf_ok(s, s.csrf_token[:-1]) and not csrf_ok(s, None) and not csrf_ok(None, s.csrf_token)


def test_short_secret_is_refused():
    with pytest.raises(ConfigurationError):
        SessionStore(b"short", ttl_s=60)


def test_hash_password_command_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret phrase\n"))
    assert console_main(["hash-password"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("$argon2id$")
    assert PasswordHasher().verify(out, "s3cret phrase")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert console_main(["hash-password"]) == 2
    assert "password must be" in capsys.readouterr().err
    with pytest.raises(ValueError):
        hash_password("")
