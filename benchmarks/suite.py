"""``pilothouse bench all --out DIR``: every benchmark, one JSON each, plus a summary and two PNG charts.

Each benchmark measures against a baseline run in the same process (machines are noisy); the summary puts the
headline figure of each next to its baseline and its target, and says whether the target was met on this run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# name -> extra arguments (kept small enough that `bench all` finishes in minutes on 2 cores)
RUNS: dict[str, list[str]] = {
    "bus": [],
    "redaction": [],
    "policy": [],
    "ledger": [],
    "sensing": [],
    "actuator": [],
    "reasoning": [],
    "e2e": [],
}


def get(doc: dict, path: str) -> Any:
    """``a.b.c`` lookup; None when any part is missing."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


@dataclass(frozen=True)
class Headline:
    """One figure of a benchmark with what it is compared to."""

    benchmark: str
    metric: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: str = ""
    met: bool | None = None
    kind: str = "throughput"  # throughput | latency | quality


def _ge(v, t):
    return None if v is None else v >= t


def _le(v, t):
    return None if v is None else v <= t


def headlines(name: str, d: dict) -> list[Headline]:
    """The figures the issues set targets on, read from one benchmark's JSON."""
    H = Headline
    if name == "bus":
        v, b = d.get("records_per_s"), d.get("fastavro_roundtrip_per_s")
        return [H(name, "records_per_s", v, "records/s", b, "fastavro round trip in memory", ">= 0.5x baseline",
                  None if v is None or b is None else v >= 0.5 * b)]
    if name == "redaction":
        return [H(name, "lines_per_s", d.get("lines_per_s"), "lines/s", get(d, "baseline.lines_per_s"),
                  "two-regex baseline", ">= 20,000", _ge(d.get("lines_per_s"), 20000)),
                H(name, "secret_recall", d.get("secret_recall"), "", None, "", ">= 0.98",
                  _ge(d.get("secret_recall"), 0.98), "quality"),
                H(name, "pii_recall", d.get("pii_recall"), "", None, "", ">= 0.95", _ge(d.get("pii_recall"), 0.95),
                  "quality"),
                H(name, "benign_lines_altered", d.get("benign_lines_altered"), "", None, "", "<= 0.01",
                  _le(d.get("benign_lines_altered"), 0.01), "quality")]
    if name == "policy":
        return [H(name, "decisions_per_s", d.get("decisions_per_s"), "decisions/s", d.get("offered_per_s"),
                  "offered rate", "= offered (500/s)", _ge(d.get("decisions_per_s"), 0.98 * (d.get("offered_per_s") or 500))),
                H(name, "p99_ms", d.get("p99_ms"), "ms", get(d, "baseline_trivial_opa_query.p99_ms"),
                  "trivial OPA query", "<= 5 ms at 500/s", _le(d.get("p99_ms"), 5), "latency")]
    if name == "ledger":
        s = d.get("summary", {})
        return [H(name, "mirror_entries_per_s", s.get("mirror_entries_per_s"), "entries/s",
                  get(d, "mirror.baseline_plain_copy_rows_per_s"), "plain COPY, same rows", ">= 10,000",
                  _ge(s.get("mirror_entries_per_s"), 10000)),
                H(name, "verify_entries_per_s", s.get("verify_entries_per_s"), "entries/s",
                  s.get("baseline_sha256_chain_per_s"), "bare SHA-256 chain", ">= 500,000",
                  _ge(s.get("verify_entries_per_s"), 500000))]
    if name == "sensing":
        v, b = d.get("alerts_per_s"), d.get("cpu_limit_per_s")
        return [H(name, "alerts_per_s", v, "alerts/s", b, "same stages in memory", ">= 0.5x baseline",
                  None if v is None or b is None else v >= 0.5 * b),
                H(name, "p99_latency_ms", d.get("p99_latency_ms"), "ms", None, "", "<= 50 ms at half max rate",
                  _le(d.get("p99_latency_ms"), 50), "latency")]
    if name == "actuator":
        return [H(name, "actions_per_s", get(d, "service.actions_per_s"), "actions/s",
                  d.get("baseline_fleet_calls_per_s"), "raw fleet HTTP calls", "report only", None),
                H(name, "p99_authorization_to_execution_ms", get(d, "service.authorization_to_execution.p99_ms"),
                  "ms", None, "", "report only", None, "latency")]
    if name == "reasoning":
        return [H(name, "p99_overhead_ms", get(d, "ms_per_incident.deterministic.p99")
                  or get(d, "ms_per_incident.with_model.p99"), "ms", get(d, "ms_per_incident.engine_only.p99"),
                  "engine only", "<= 50 ms", d.get("meets_target"), "latency")]
    if name == "e2e":
        return [H(name, "p99_alert_to_pending_ms", d.get("p99_ms"), "ms", None, "", "<= 2,000 ms (excl. model/human)",
                  _le(d.get("p99_ms"), 2000), "latency")]
    return []


def draw_charts(rows: list[Headline], out_dir: Path, machine: str) -> list[Path]:
    """throughput.png (value vs in-run baseline) and latency.png (measured vs target), for the README."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    thr = [r for r in rows if r.kind == "throughput" and r.value and r.baseline]
    if thr:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(thr) + 1.5))
        labels = [f"{r.benchmark}: {r.metric}" for r in thr]
        ratios = [r.value / r.baseline for r in thr]
        colors = ["#2e7d32" if r.met else ("#c62828" if r.met is False else "#546e7a") for r in thr]
        ax.barh(labels, ratios, color=colors)
        for i, r in enumerate(thr):
            ax.text(ratios[i], i, f" {r.value:,.0f} {r.unit} vs {r.baseline:,.0f} ({r.baseline_label})",
                    va="center", fontsize=8)
        ax.axvline(0.5, ls="--", color="grey", lw=1, label="0.5x (bus and sensing targets)")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("ratio to the baseline measured in the same run")
        ax.set_title(f"Throughput against in-run baselines ({machine})", fontsize=10)
        ax.set_xlim(0, max(ratios) * 1.9)
        fig.tight_layout()
        p = out_dir / "throughput.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    lat = [r for r in rows if r.kind == "latency" and r.value is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(lat) + 1.5))
        labels = [f"{r.benchmark}: {r.metric}" for r in lat]
        vals = [max(r.value, 0.01) for r in lat]
        colors = ["#2e7d32" if r.met else ("#c62828" if r.met is False else "#546e7a") for r in lat]
        ax.barh(labels, vals, color=colors)
        for i, r in enumerate(lat):
            ax.text(vals[i], i, f" {r.value:,.1f} ms (target {r.target})", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds (log scale); green = target met, red = missed, grey = no target")
        ax.set_title(f"Latency percentiles ({machine})", fontsize=10)
        ax.set_xlim(min(vals) / 2, max(vals) * 30)
        fig.tight_layout()
        p = out_dir / "latency.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse bench all --out DIR [--only a,b] [--skip a,b]``."""
    ap = argparse.ArgumentParser(prog="pilothouse bench all")
    ap.add_argument("--out", required=True, type=Path, help="directory for NAME.json, summary.json and the charts")
    ap.add_argument("--only", default="", help="comma-separated subset")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    ap.add_argument("--summarize-only", action="store_true", help="re-read existing JSON files, redraw charts")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in RUNS if (not args.only or n in args.only.split(",")) and n not in args.skip.split(",")]
    status: dict[str, Any] = {}
    for name in names:
        path = out / f"{name}.json"
        if args.summarize_only:
            status[name] = "read" if path.exists() else "missing"
            continue
        started = time.monotonic()
        print(f"== bench {name}", flush=True)
        try:
            module = importlib.import_module(f"pilothouse.benchmarks.{name}")
            rc = module.main(["--out", str(path), *RUNS[name]])
            status[name] = {"exit": int(rc or 0), "seconds": round(time.monotonic() - started, 1)}
        except SystemExit as e:
            status[name] = {"exit": e.code, "seconds": round(time.monotonic() - started, 1)}
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            status[name] = {"error": f"{type(e).__name__}: {e}", "seconds": round(time.monotonic() - started, 1)}
    rows: list[Headline] = []
    for name in names:
        path = out / f"{name}.json"
        if path.exists():
            try:
                rows += headlines(name, json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                status[name] = {"error": f"unreadable JSON: {e}"}
    machine = f"{os.cpu_count()} vCPU {platform.machine()}, shared dev machine"
    charts = draw_charts(rows, out, machine)
    summary = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "runs": status,
        "headlines": [r.__dict__ for r in rows],
        "targets_missed": [f"{r.benchmark}.{r.metric}" for r in rows if r.met is False],
        "charts": [p.name for p in charts],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in rows:
        mark = {True: "met", False: "MISSED", None: "-"}[r.met]
        value = "n/a" if r.value is None else f"{r.value:,.3f}".rstrip("0").rstrip(".")
        print(f"{r.benchmark:<10} {r.metric:<36} {value:>14} {r.unit:<10} target {r.target:<28} {mark}")
    return 0
