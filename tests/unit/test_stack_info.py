"""stack.json (StackInfo), credential generation, settings and the CLI's error contract — no running stack needed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psycopg.conninfo
import pytest
from pydantic import SecretStr

from pilothouse.stack import cli
from pilothouse.stack.config import Settings
from pilothouse.stack.errors import NotProvisioned, StackError
from pilothouse.stack.info import StackInfo
from pilothouse.stack.lifecycle import load_or_create_info


@pytest.fixture(autouse=True)
def _no_ambient_stack_settings(monkeypatch):
    """These tests define their own settings: ports or URLs exported in the shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("PILOTHOUSE_"):
            monkeypatch.delenv(name)


def settings_for(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", **kw)


def test_first_run_generates_distinct_credentials_in_a_private_file(tmp_path):
    info, written = load_or_create_info(settings_for(tmp_path), ("ledger", "policy"))
    assert written
    path = tmp_path / "data" / "stack.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    passwords = [info.password(p) for p in ("admin", "ledger", "policy")] + [info.postgres.password.get_secret_value()]
    assert len(set(passwords)) == 4 and all(len(p) >= 32 for p in passwords)
    assert StackInfo.load(tmp_path / "data") == info


def test_second_run_keeps_passwords_and_adds_new_principals(tmp_path):
    first, _ = load_or_create_info(settings_for(tmp_path), ("ledger",))
    same, written = load_or_create_info(settings_for(tmp_path), ("ledger",))
    assert not written and same == first
    more, written = load_or_create_info(settings_for(tmp_path), ("ledger", "console"))
    assert written
    assert more.password("ledger") == first.password("ledger")
    assert more.password("console") not in (first.password("ledger"), first.password("admin"))


def test_state_without_credentials_is_refused_rather_than_overwritten(tmp_path):
    meta = tmp_path / "data" / "kafka" / "data" / "meta.properties"
    meta.parent.mkdir(parents=True)
    meta.write_text("cluster.id=x\n")
    with pytest.raises(StackError, match="no stack.json"):
        load_or_create_info(settings_for(tmp_path), ("ledger",))
    assert not (tmp_path / "data" / "stack.json").exists()


def test_client_settings_carry_the_principal_credentials(tmp_path):
    info, _ = load_or_create_info(settings_for(tmp_path), ("ledger",))
    cfg = info.kafka_config("ledger")
    assert cfg == {
        "bootstrap.servers": "127.0.0.1:19092",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "ledger",
        "sasl.password": info.password("ledger"),
    }
    assert "sasl.username" not in info.kafka_base_config()
    assert info.aiokafka_config("ledger")["sasl_plain_password"] == info.password("ledger")
    with pytest.raises(StackError, match="unknown Kafka principal 'nobody'.*admin, ledger"):
        info.kafka_config("nobody")


def test_postgres_dsn_round_trips_through_libpq_parsing_even_with_odd_characters(tmp_path):
    info, _ = load_or_create_info(settings_for(tmp_path), ())
    odd = info.model_copy(
        update={"postgres": info.postgres.model_copy(update={"password": SecretStr("p@ss:/w?rd#%&'\" x")})}
    )
    parsed = psycopg.conninfo.conninfo_to_dict(odd.postgres_dsn)
    assert parsed["password"] == "p@ss:/w?rd#%&'\" x"
    assert (parsed["host"], parsed["port"], parsed["dbname"], parsed["user"]) == (
        "127.0.0.1",
        "15432",
        "pilothouse",
        "pilothouse",
    )


def test_export_lines_are_shell_safe(tmp_path):
    info, _ = load_or_create_info(settings_for(tmp_path), ("ledger",))
    odd = info.model_copy(update={"postgres": info.postgres.model_copy(update={"password": SecretStr("a'b $(touch x) c")})})
    script = "\n".join(odd.export_lines("ledger")) + '\nprintf "%s\\n" "$PILOTHOUSE_KAFKA_PASSWORD" "$PILOTHOUSE_POSTGRES_DSN"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    password, dsn = out.stdout.splitlines()
    assert password == info.password("ledger")
    assert dsn == odd.postgres_dsn
    assert not (tmp_path / "x").exists()
    # Without a principal no Kafka credentials are exported.
    assert not any("KAFKA_PASSWORD" in line for line in info.export_lines())


def test_missing_and_malformed_stack_json(tmp_path):
    with pytest.raises(NotProvisioned, match="pilothouse stack up"):
        StackInfo.load(tmp_path)
    (tmp_path / "stack.json").write_text('{"version": 1}')
    with pytest.raises(StackError, match="malformed"):
        StackInfo.load(tmp_path)


@pytest.mark.parametrize(
    ("url", "external"),
    [(None, False), ("http://127.0.0.1:18080/v1", False), ("http://127.0.0.1:18080/v1/", False),
     ("http://gpu-box:8000/v1", True)],
)  # fmt: skip
def test_only_a_foreign_llm_url_switches_the_local_server_off(tmp_path, url, external):
    assert settings_for(tmp_path, llm_base_url=url).external_llm is external


def run_cli(args: list[str], tmp_path: Path, path_env: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": path_env,
        "HOME": os.environ.get("HOME", "/root"),
        "PILOTHOUSE_DATA_DIR": str(tmp_path / "data"),
        "PILOTHOUSE_CACHE_DIR": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pilothouse.stack.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_up_without_java_is_one_line_with_the_fix_and_exit_code_2(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    out = run_cli(["up"], tmp_path, str(empty))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "java 17+" in out.stderr and "apt-get install -y openjdk-17-jre-headless" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "stack.json").exists()  # nothing half-provisioned


def test_env_before_up_says_to_run_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PILOTHOUSE_DATA_DIR", str(tmp_path / "nothing-here"))
    assert cli.main(["env"]) == 1
    err = capsys.readouterr().err
    assert "run `pilothouse stack up`" in err and "Traceback" not in err
