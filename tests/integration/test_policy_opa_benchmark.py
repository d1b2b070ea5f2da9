"""Smoke test of benchmarks/policy.py: it runs against a real OPA and writes the documented JSON keys.

Nothing here asserts on wall time (the machines are shared); only on the shape and sanity of the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_benchmark_writes_report(tmp_path: Path) -> None:
    from benchmarks.policy import main

    out = tmp_path / "policy.json"
    assert main(["--rate", "100", "--seconds", "1", "--warmup", "10", "--no-reuse-count", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    for key in ("decisions_per_s", "p50_ms", "p99_ms", "offered_per_s", "ratio_p50_decision_to_baseline"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert report["offered_per_s"] == 100
    assert report["decision"]["count"] == 100
    assert report["p50_ms"] <= report["p99_ms"]
    assert sum(report["outcomes"].values()) == 100
    assert set(report["outcomes"]) == {"allow", "pending_approval"}
    # the same-run "before" of the Rego (full rules, no fast path) and the run-queue waits are reported per phase
    assert report["full_rules_before"]["count"] == 100
    for phase in ("decision", "full_rules_before", "baseline_trivial_opa_query", "sdk_client_before"):
        for key in ("opa_cpu_us_per_call", "client_cpu_us_per_call", "client_runqueue_wait_us_per_call"):
            assert report[phase][key] >= 0, (phase, key)
    assert report["ratio_opa_cpu_full_rules_to_decision"] > 0
    assert (tmp_path / "policy.png").stat().st_size > 0
