"""The policy bundle's own gates, run with the real OPA binary: fmt, strict check, Rego tests with coverage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pilothouse.policy.adapters.opa import find_opa_binary

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MIN_COVERAGE = 90.0

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def opa() -> str:
    binary = find_opa_binary()
    if binary is None:
        pytest.fail("no opa binary (~/.cache/pilothouse/bin/opa, /tmp/gobin/opa or PATH): run `pilothouse stack up`")
    return str(binary)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_opa_version(opa: str) -> None:
    assert "Version: 1.22.3" in run(opa, "version").stdout


def test_fmt_clean(opa: str) -> None:
    result = run(opa, "fmt", "--diff", str(POLICIES))
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_check_strict(opa: str) -> None:
    result = run(opa, "check", "--strict", str(POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rego_tests_pass_with_coverage(opa: str) -> None:
    result = run(opa, "test", str(POLICIES), "--coverage", "--format=json")
    assert result.returncode == 0, run(opa, "test", str(POLICIES)).stdout[-4000:]
    report = json.loads(result.stdout)
    assert report["coverage"] >= MIN_COVERAGE, report["coverage"]


def test_rego_tests_pass_as_a_bundle(opa: str) -> None:
    result = run(opa, "test", "--bundle", str(POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
