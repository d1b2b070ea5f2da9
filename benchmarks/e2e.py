"""``pilothouse bench e2e``: alert → pending-action latency through the whole running system, without the model.

Runs the demo's scenarios unattended with reasoning in deterministic mode (no model time), and reads the producer
timestamps of each stage from the records themselves. The machine path from alert to pending action is
(first alert received → first supported hypotheses) + (human validation recorded → approval requested): the human's
own time between the two is excluded, as the issue asks. Target: p99 <= 2 s. Every scenario is one sample, so p99 over
a handful of runs is close to the maximum; the per-stage figures are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from pilothouse.demo import SCENARIOS, DemoFailed, run


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    ap = argparse.ArgumentParser(prog="pilothouse bench e2e")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--baseline-s", type=float, default=150.0, help="healthy seconds before each fault")
    args = ap.parse_args(argv)
    samples, failures = [], []
    # Every scenario starts fresh (the correlator forgets its incidents; ledger, budgets and keys stay): back to back,
    # a fault's alerts would otherwise join the still-open incident of the scenario before (services share callers),
    # and that incident's window, not the new fault, would decide what evidence there is.
    for _ in range(args.repeat):
        for name in args.scenarios.split(","):
            # a third approver in reserve: policy asks for one more when earlier runs spent the service's risk
            # budget for the day, and the demo stops approving as soon as the action is authorized
            ns = argparse.Namespace(scenario=name, validate_as="responder-1",
                                    approve_as=["approver-1", "approver-2", "admin-1"],
                                    out=None, stage_timeout=240.0, human_timeout=600.0, stop=False,
                                    baseline_s=args.baseline_s, restart=False, fresh=True, no_llm=True, quiet=True)
            try:
                rep = run(ns)
            except DemoFailed as e:
                failures.append({"scenario": name, "error": str(e)})
                continue
            t = rep["stage_times_ms"]
            machine = None
            if t.get("first_alert_received") and t.get("hypothesis_validated"):
                machine = (t["hypotheses_proposed"] - t["first_alert_received"]) + \
                          (t["approval_requested"] - t["hypothesis_validated"])
            samples.append({"scenario": name, "alert_to_pending_machine_ms": machine,
                            "alert_to_incident_ms": t["incident_opened"] - (t["first_alert_received"] or 0)
                            if t.get("first_alert_received") else None,
                            "incident_to_hypotheses_ms": t["hypotheses_proposed"] - t["incident_opened"],
                            "validation_to_pending_ms": (t["approval_requested"] - t["hypothesis_validated"])
                            if t.get("hypothesis_validated") else None,
                            # the alert the action needed (often a caller's, a few seconds after the first) ->
                            # pending, human time excluded: what the pipeline itself adds
                            "trigger_alert_to_pending_machine_ms": (
                                (t["action_first_proposed"] - t["action_trigger_alert"])
                                + (t["approval_requested"] - max(t["action_first_proposed"],
                                                                 t.get("hypothesis_validated") or 0)))
                            if t.get("action_trigger_alert") and t.get("action_first_proposed") else None,
                            "authorized_to_executed_ms": (t["executed"] - t["authorized"]) if t.get("executed") else None,
                            "recovered": rep["recovered"], "top_hypothesis_correct": rep["top_hypothesis_correct"],
                            "timeline": rep.get("timeline", [])})
    lat = [s["alert_to_pending_machine_ms"] for s in samples if s["alert_to_pending_machine_ms"] is not None]
    pipe = [s["trigger_alert_to_pending_machine_ms"] for s in samples
            if s.get("trigger_alert_to_pending_machine_ms") is not None]
    result = {
        "benchmark": "e2e",
        "what": "first alert received -> approval requested, machine time only (deterministic reasoning, human wait "
                "excluded; includes waiting for the later alerts the action needed); trigger_alert_*: from the alert "
                "the pending action was computed from",
        "samples": samples,
        "failures": failures,
        "n": len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat) if lat else None,
        "trigger_alert_p50_ms": percentile(pipe, 50),
        "trigger_alert_p99_ms": percentile(pipe, 99),
        "target_p99_ms": 2000,
        "meets_target": bool(lat) and percentile(lat, 99) <= 2000,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if lat else 1
