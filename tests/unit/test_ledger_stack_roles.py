"""The stack's Postgres roles for the ledger: a non-superuser writer role with its own generated password (added to
an existing stack.json on the next `stack up`), and DSN accessors for it and for the superuser."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from pilothouse.stack import postgres
from pilothouse.stack.config import Settings
from pilothouse.stack.errors import StackError
from pilothouse.stack.info import StackInfo
from pilothouse.stack.lifecycle import load_or_create_info


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


def test_a_new_stack_has_a_ledger_writer_role_with_its_own_password(tmp_path) -> None:
    info, _ = load_or_create_info(_settings(tmp_path), ("ledger",))
    writer = info.postgres.roles[postgres.LEDGER_WRITER_ROLE].get_secret_value()
    assert len(writer) >= 32 and writer != info.postgres.password.get_secret_value()
    assert StackInfo.load(tmp_path / "data") == info  # saved with the role's password (file is 0600)
    dsn = psycopg.conninfo.conninfo_to_dict(info.postgres_dsn_for(postgres.LEDGER_WRITER_ROLE))
    assert dsn["user"] == postgres.LEDGER_WRITER_ROLE and dsn["password"] == writer
    assert dsn["dbname"] == info.postgres.database
    assert info.postgres_admin_dsn == info.postgres_dsn  # the bootstrap role is the superuser
    assert writer not in repr(info)
    with pytest.raises(StackError, match="unknown Postgres role 'nobody'"):
        info.postgres_dsn_for("nobody")


def test_an_older_stack_json_gets_the_role_on_the_next_run_and_keeps_everything_else(tmp_path) -> None:
    info, _ = load_or_create_info(_settings(tmp_path), ("ledger",))
    path = tmp_path / "data" / "stack.json"
    data = json.loads(path.read_text())
    del data["postgres"]["roles"]  # what a stack provisioned before this change has
    path.write_text(json.dumps(data))
    old = StackInfo.load(tmp_path / "data")
    assert old.postgres.roles == {}
    again, written = load_or_create_info(_settings(tmp_path), ("ledger",))
    assert written and postgres.LEDGER_WRITER_ROLE in again.postgres.roles
    assert again.postgres.password == info.postgres.password and again.password("ledger") == info.password("ledger")
    same, written = load_or_create_info(_settings(tmp_path), ("ledger",))
    assert not written and same == again
