"""`pilothouse eval rca`: dataset readers (nezha slice of real data, synthetic rcaeval layout), scoring, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pilothouse.evaluation import LLM_ENV, DatasetError, iter_nezha_cases, iter_rcaeval_cases, main

NEZHA = Path(__file__).resolve().parents[1] / "fixtures" / "rca" / "nezha_slice"
KEYS = {"cases", "ac_at_1", "ac_at_3", "ac_at_5", "avg_at_5", "per_fault_type", "abstained", "time_per_case_ms"}

# synthetic system: frontend -> cart -> redis, frontend -> currency
SERVICES = ("frontend", "cart", "redis", "currency")


def _frame(rng: np.random.Generator, n: int, t0: int, fault: tuple[str, str] | None, fault_from: int) -> list[list]:
    """Rows of time + <service>_<metric>; ``fault`` = (service, kind) from row ``fault_from``.

    Latencies compose like calls do: a caller's response time contains its callees'.
    """
    rows = []
    for i in range(n):
        on = fault is not None and i >= fault_from
        cpu = {s: rng.normal(0.3, 0.02) for s in SERVICES}
        mem = {s: rng.normal(200, 3) for s in SERVICES}
        extra = {s: 0.0 for s in SERVICES}
        if on and fault is not None:
            svc, kind = fault
            if kind == "cpu":
                cpu[svc] += 0.6
                extra[svc] += 0.08
            elif kind == "mem":
                mem[svc] += 150
            elif kind == "delay":
                extra[svc] += 0.1
        lat = {"redis": rng.normal(0.01, 0.001) + extra["redis"]}
        lat["cart"] = 0.02 + lat["redis"] + rng.normal(0, 0.003) + extra["cart"]
        lat["currency"] = rng.normal(0.02, 0.003) + extra["currency"]
        lat["frontend"] = 0.03 + lat["cart"] + lat["currency"] + rng.normal(0, 0.004) + extra["frontend"]
        row: list = [t0 + i]
        for s in SERVICES:
            row += [round(cpu[s], 5), round(mem[s], 3), round(lat[s], 5), round(rng.normal(100, 5), 3)]
        rows.append(row)
    return rows


def _write(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["time"] + [f"{s}_{m}" for s in SERVICES for m in ("cpu", "mem", "latency-50", "workload")]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def rcaeval_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2024)
    root = tmp_path / "rcaeval"
    t0 = 1_700_000_000
    # layout 1: <service>_<fault>/<repetition>/data.csv + inject_time.txt
    for rep in ("1", "2"):
        d = root / "cart_cpu" / rep
        _write(d / "data.csv", _frame(rng, 900, t0, ("cart", "cpu"), 600))
        (d / "inject_time.txt").write_text(str(t0 + 600))
    d = root / "cart_delay"
    _write(d / "data.csv", _frame(rng, 900, t0, ("cart", "delay"), 600))
    (d / "inject_time.txt").write_text(str(t0 + 600))
    # layout 2: <service>-<fault>/normal.csv + anomalous.csv
    d = root / "currency-mem"
    _write(d / "normal.csv", _frame(rng, 600, t0, None, 0))
    _write(d / "anomalous.csv", _frame(rng, 300, t0 + 600, ("currency", "mem"), 0))
    return root


def test_rcaeval_reader_understands_both_layouts(rcaeval_dir: Path) -> None:
    cases = list(iter_rcaeval_cases(rcaeval_dir))
    assert sorted((c.case_id, c.root_cause, c.fault_type) for c in cases) == [
        ("cart_cpu/1", "cart", "cpu"), ("cart_cpu/2", "cart", "cpu"), ("cart_delay", "cart", "delay"),
        ("currency-mem", "currency", "mem")]
    single = next(c for c in cases if c.case_id == "cart_cpu/1")
    assert single.window.start_ms == (1_700_000_000 + 600) * 1000 and single.reference is None
    assert {s.service for s in single.series} == set(SERVICES)
    assert {s.signal for s in single.series if s.service == "cart"} == {"cpu", "mem", "latency-50", "workload"}
    # no call graph in this layout: the latency co-movement of the delay case gives caller -> callee
    delay = next(c for c in cases if c.case_id == "cart_delay")
    assert ("frontend", "cart") in delay.edges and ("cart", "frontend") not in delay.edges
    pair = next(c for c in cases if c.case_id == "currency-mem")
    assert pair.reference is not None and ("currency", "mem") in pair.reference


def test_eval_rca_on_rcaeval_layout_writes_the_report(rcaeval_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--dataset", str(rcaeval_dir), "--format", "rcaeval", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert KEYS <= set(report)
    assert report["cases"] == 4
    assert report["ac_at_1"] == 1.0 and report["avg_at_5"] == 1.0
    assert set(report["per_fault_type"]) == {"cpu", "delay", "mem"} and report["per_fault_type"]["cpu"]["cases"] == 2
    assert {d["root_cause"] for d in report["details"]} == {"cart", "currency"}
    assert all(d["top_evidence"][0]["evidence_id"].startswith("ev-") for d in report["details"])
    assert all(d["top_evidence"][0]["summary"] for d in report["details"])
    assert report["answered"] + report["abstained"] == 4
    # abstaining keeps the ranked list (ac_at_k counts it); the strict figures count an abstention as a miss
    assert report["ac_at_1_abstain_as_miss"] <= report["ac_at_1"]
    assert report["ac_at_3_abstain_as_miss"] <= report["ac_at_3"]
    assert report["ac_at_3_abstain_as_miss"] == sum(
        1 for d in report["details"] if not d["abstain"] and d["rank"] is not None and d["rank"] <= 3) / 4
    assert report["time_per_case_ms"]["p99"] >= report["time_per_case_ms"]["p50"] > 0
    assert "AC@1=1.000" in capsys.readouterr().out


def test_eval_rca_on_real_nezha_slice(tmp_path: Path) -> None:
    out = tmp_path / "nezha.json"
    assert main(["--dataset", str(NEZHA), "--format", "nezha", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cases"] == 2
    assert {d["fault_type"] for d in report["details"]} == {"cpu_contention", "network_delay"}
    assert report["ac_at_1"] == 1.0, report["details"]
    assert set(report["per_fault_type"]) == {"cpu_contention", "network_delay"}
    # the slice's pods all carry the same day: no timestamp repairs; its "normal" folder is the fault recording
    # itself, so the two listed faults' windows are left out of the reference
    assert report["data_notes"] == [
        "reference: the listed faults' windows (+60 s) were left out of the baselines (the normal recording spans "
        "the faults)"]


def test_nezha_entry_service_table_is_read_as_the_entry_services_own_metrics() -> None:
    case = next(iter_nezha_cases(NEZHA))
    entry = {s.signal: s for s in case.series if s.source_link.split("#")[0].endswith("front_service.csv.gz")}
    # ServiceName "Frontend" is matched to the pod-derived service "frontend"
    assert {s.service for s in entry.values()} == {"frontend"}
    assert {"SuccessRate(%)", "LatencyP50(s)", "LatencyP99(s)"} <= set(entry)
    assert case.reference is not None and ("frontend", "SuccessRate(%)") in case.reference
    sr = entry["SuccessRate(%)"].values
    assert sr.size == 82 and np.nanmax(sr) == 100.0


def test_nezha_reference_leaves_out_every_listed_fault_window() -> None:
    cases = list(iter_nezha_cases(NEZHA))
    assert len(cases) == 2
    ref = cases[0].reference
    assert ref is not None and cases[1].reference is ref  # one masked reference per day, shared by its cases
    cpu = ref[("emailservice", "CpuUsageRate(%)")]
    raw = next(s for s in cases[0].series if (s.service, s.signal) == ("emailservice", "CpuUsageRate(%)"))
    for c in cases:
        inside = (cpu.timestamps_ms >= c.window.start_ms - 60_000) & (cpu.timestamps_ms <= c.window.end_ms + 60_000)
        assert inside.any() and np.isnan(cpu.values[inside]).all()
    outside = np.ones(cpu.values.shape, dtype=bool)
    for c in cases:
        outside &= (cpu.timestamps_ms < c.window.start_ms - 60_000) | (cpu.timestamps_ms > c.window.end_ms + 60_000)
    # the rest is the normal recording unchanged (in this dataset the same numbers as the fault recording)
    assert np.array_equal(cpu.timestamps_ms, raw.timestamps_ms)
    assert np.array_equal(cpu.values[outside], raw.values[outside])
    # the pre-window baseline has no reference to mask
    assert all(c.reference is None for c in iter_nezha_cases(NEZHA, baseline="pre-window"))


def test_nezha_pre_window_baseline_also_works() -> None:
    cases = list(iter_nezha_cases(NEZHA, baseline="pre-window"))
    assert len(cases) == 2 and all(c.reference is None for c in cases)
    assert all(("frontend", "checkoutservice") in c.edges for c in cases)


def test_with_llm_without_a_configured_llm_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(LLM_ENV, raising=False)
    out = tmp_path / "r.json"
    rc = main(["--dataset", str(NEZHA), "--format", "nezha", "--out", str(out), "--with-llm"])
    assert rc == 2 and not out.exists()
    assert "no LLM configured" in capsys.readouterr().err


def test_unusable_datasets_get_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["--dataset", str(tmp_path / "missing"), "--format", "nezha", "--out", str(out)]) == 2
    assert "no rca_data/ directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--dataset", str(empty), "--format", "rcaeval", "--out", str(out)]) == 2
    assert "no case directory" in capsys.readouterr().err
    bad = tmp_path / "bad" / "x_cpu"
    bad.mkdir(parents=True)
    (bad / "data.csv").write_text("when,a_cpu\n1,2\n")
    (bad / "inject_time.txt").write_text("1")
    with pytest.raises(DatasetError, match="first column must be 'time'"):
        list(iter_rcaeval_cases(tmp_path / "bad"))
    assert not out.exists()
