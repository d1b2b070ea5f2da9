"""Parts of the OPA adapter that need no OPA server: URL parsing and the `pilothouse policy` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pilothouse.policy.adapters.opa import OpaPolicyEngine, main
from pilothouse.policy.domain import PolicyInputInvalid

README = Path(__file__).resolve().parents[2] / "policies" / "README.md"


def test_from_url() -> None:
    with OpaPolicyEngine.from_url("http://opa.internal:9191") as engine:
        assert engine.endpoint == "http://opa.internal:9191"
    with OpaPolicyEngine.from_url("https://opa.internal") as engine:
        assert engine.endpoint == "https://opa.internal:443"


@pytest.mark.parametrize("url", ["opa:8181", "ftp://opa:21", "http://:8181"])
def test_from_url_refuses_bad_urls(url: str) -> None:
    with pytest.raises(PolicyInputInvalid):
        OpaPolicyEngine.from_url(url)


def test_schema_command_prints_both_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert set(schemas) == {"input-schema", "decision-schema"}
    assert "approvals" in schemas["input-schema"]["properties"]


def test_schema_check_detects_a_stale_readme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(README.read_text(encoding="utf-8").replace('"$defs"', '"$defz"', 1), encoding="utf-8")
    assert main(["schema", "--readme", str(stale), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["schema", "--readme", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == README.read_text(encoding="utf-8")
    assert main(["schema", "--readme", str(stale), "--check"]) == 0


def test_decide_refuses_unreadable_or_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decide", "proposal", "--input", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    assert main(["decide", "approvals", "--input", str(bad)]) == 2
    assert "input refused" in capsys.readouterr().err
