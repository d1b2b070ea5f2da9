"""Benchmark: OPA decision round trip through the policy adapter at a fixed offered rate (open loop).

Starts its own ``opa run --server`` on policies/, then, on one reused connection:

* **decision**: ``OpaPolicyEngine.decide()`` for a rotating mix of proposal/approvals inputs — input serialisation,
  HTTP round trip, Rego evaluation, decision validation and the replay record (input hash, decision id);
* **full_rules** (the "before" of the Rego, same run, same rate): the same work, but OPA evaluates each entrypoint's
  ``full_decision`` — the rule-per-concept policy without the one-body fast path for the usual input. Both give
  byte-identical decisions (tests/integration/test_opa_fast_path.py), so the difference is evaluation cost only;
* **baseline** (same run, same rate, same input documents): a POST of the same input to a trivial OPA path
  (``pilothouse/config/bundle_revision``), i.e. transport + JSON parsing without policy evaluation;
* **no_reuse** (short, informative): the decision with a new client (new TCP connection) per request;
* **sdk_client** (the "before" of the adapter's hot path, same run): the same decisions through opa-python-client
  (requests) with the input serialised twice (JSON body + canonical hash), as the adapter did before it kept its
  own HTTP/1.1 connection.

Open loop: request *i* is due at ``t0 + i / rate``; latency is measured from the due time, so a stall shows up as
latency of the requests that queued behind it (no coordinated omission). Besides CPU per call, each phase records
how long the client and OPA waited for a CPU while runnable (``/proc/<pid>/task/*/schedstat``): on a shared machine
that run-queue wait, not the code under test, is what the latency tail is made of. Writes JSON (and a PNG of the
latency CDFs).

Usage: ``python -m benchmarks.policy [--rate 500] [--seconds 5] [--out bench-out/policy.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from opa_client import OpaClient

from pilothouse.policy.adapters.opa import OpaPolicyEngine, find_opa_binary, local_opa_server
from pilothouse.policy.domain import (
    Decision,
    PolicyInput,
    action_hash,
    canonical_json,
    input_digest,
    parse_policy_input,
    record_decision,
    sha256_hex,
)

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"


def sample_inputs() -> list[tuple[str, PolicyInput]]:
    """A small mix: medium proposal, high-risk approvals (two approvers), read-only diagnostics, a refused duplicate."""
    fixtures = json.loads((POLICIES / "pilothouse/fixtures/data.json").read_text(encoding="utf-8"))
    base = fixtures["base_input"]
    del base["action"]["action_hash"]

    def variant(patch: Callable[[dict], None]) -> dict:
        doc = copy.deepcopy(base)
        patch(doc)
        return doc

    def approvals(doc: dict, *ids: str) -> None:
        a = doc["action"]
        digest = action_hash(a["action_type"], a["target"]["kind"], a["target"]["name"], a["params"])
        doc["approvals"] = [
            {"approval_id": f"ap-{n}", "approver": {"id": i, "kind": "human", "roles": ["approver"]},
             "action_hash": digest, "granted_at": "2026-11-25T11:58:00Z", "expires_at": "2026-11-25T12:10:00Z"}
            for n, i in enumerate(ids)
        ]

    def high(doc: dict) -> None:
        doc["action"].update(action_type="shift_traffic", params={"to": "canary", "percent": 50})
        doc["action"]["facts"]["blast_radius"] = "high"
        approvals(doc, "alice", "bob")

    def duplicate(doc: dict) -> None:
        high(doc)
        approvals(doc, "alice", "ALICE")

    def read_only(doc: dict) -> None:
        doc["action"].update(action_type="collect_diagnostics", params={"kind": "thread_dump"})
        doc["action"]["facts"] = {"reversible": True, "blast_radius": "low", "read_only": True}

    return [
        ("proposal", parse_policy_input(variant(lambda d: None))),
        ("approvals", parse_policy_input(variant(high))),
        ("proposal", parse_policy_input(variant(read_only))),
        ("approvals", parse_policy_input(variant(duplicate))),
    ]


def open_loop(operation: Callable[[int], Any], rate: float, count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Call ``operation(offset + i)`` at ``rate`` per second, ``count`` times, from this thread.

    Returns (latencies from each call's due time, service times, elapsed), in seconds.
    """
    latencies = np.empty(count)
    service = np.empty(count)
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(count):
        due = start + i * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        began = time.perf_counter()
        operation(offset + i)
        done = time.perf_counter()
        latencies[i] = done - due
        service[i] = done - began
    return latencies, service, time.perf_counter() - start


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc), or 0.0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_s(pid: int | None) -> float:
    """Seconds the threads of a process spent runnable but waiting for a CPU (Linux schedstat), or 0.0 when unknown.

    Threads that exited during a phase drop out of the sum; OPA's and this process's threads are long-lived."""
    if pid is None:
        return 0.0
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class PhaseCost:
    """CPU and run-queue wait of the client (this process) and the OPA server, accumulated over a phase's rounds."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.totals = [0.0, 0.0, 0.0, 0.0]  # client cpu, opa cpu, client wait, opa wait

    def _sample(self) -> list[float]:
        return [time.process_time(), process_cpu_s(self.server_pid), runqueue_wait_s(os.getpid()),
                runqueue_wait_s(self.server_pid)]

    def measure(self, operation: Callable[[], Any]) -> Any:
        before = self._sample()
        result = operation()
        self.totals = [t + a - b for t, a, b in zip(self.totals, self._sample(), before)]
        return result

    def per_call(self, count: int) -> dict[str, float]:
        names = ("client_cpu_us_per_call", "opa_cpu_us_per_call", "client_runqueue_wait_us_per_call",
                 "opa_runqueue_wait_us_per_call")
        return {name: total / count * 1e6 for name, total in zip(names, self.totals)}


def summarise(chunks: list[tuple[np.ndarray, np.ndarray, float]]) -> dict[str, Any]:
    latencies = np.concatenate([c[0] for c in chunks]) * 1e3
    service = np.concatenate([c[1] for c in chunks]) * 1e3
    elapsed = sum(c[2] for c in chunks)
    return {
        "count": int(latencies.size),
        "achieved_per_s": latencies.size / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
        "service_p50_ms": float(np.percentile(service, 50)),
        "service_p99_ms": float(np.percentile(service, 99)),
        # how late the sender itself started requests (its own wake-up and any backlog): latency minus service time
        "send_lateness_p99_ms": float(np.percentile(latencies - service, 99)),
        "_latencies_ms": latencies,
    }


def run(rate: float, seconds: float, warmup: int, no_reuse_count: int) -> dict[str, Any]:
    inputs = sample_inputs()
    documents = [policy_input.to_opa() for _, policy_input in inputs]
    per_round = max(1, int(rate))  # one second per round
    rounds = max(1, round(seconds))
    outcomes: dict[str, int] = {}
    with local_opa_server(POLICIES) as engine:

        def decide(i: int) -> None:
            entrypoint, policy_input = inputs[i % len(inputs)]
            record = engine.decide(entrypoint, policy_input)  # type: ignore[arg-type]
            outcomes[record.decision.outcome] = outcomes.get(record.decision.outcome, 0) + 1

        def trivial(i: int) -> None:
            engine.evaluate("pilothouse/config/bundle_revision", documents[i % len(documents)])

        def decide_full_rules(i: int) -> None:
            # decide()'s work, step for step, on the entrypoint's full_decision rule
            entrypoint, policy_input = inputs[i % len(inputs)]
            canonical = canonical_json(policy_input.to_opa())
            result = engine.evaluate_json(f"pilothouse/{entrypoint}/full_decision", canonical)
            record_decision(policy_input, Decision.model_validate(result), digest=sha256_hex(canonical))

        for i in range(warmup):  # warms OPA's caches, the kept-alive connection and the allocator
            decide(i)
            trivial(i)
            decide_full_rules(i)
        outcomes.clear()
        # Alternate one-second rounds of baseline, decision and full rules so that a noisy neighbour on the shared
        # machine weighs on all series alike; the ratios are the figures to compare across runs.
        # CPU seconds per call, for the client (this process) and the OPA server: unlike latency, CPU time is
        # barely affected by neighbours waiting for the same cores, so it is the steadier capacity figure.
        phases = (("baseline", trivial), ("decision", decide), ("full_rules", decide_full_rules))
        costs = {name: PhaseCost(engine.server_pid) for name, _ in phases}
        chunks: dict[str, list] = {name: [] for name, _ in phases}
        for r in range(rounds):
            for name, operation in phases:
                chunks[name].append(costs[name].measure(lambda: open_loop(operation, rate, per_round, r * per_round)))
        summaries = {name: summarise(chunks[name]) for name, _ in phases}
        for name, summary in summaries.items():
            summary.update(costs[name].per_call(summary["count"]))
        baseline, decision, full_rules = summaries["baseline"], summaries["decision"], summaries["full_rules"]

        port = int(engine.endpoint.rsplit(":", 1)[1])

        def decide_new_connection(i: int) -> None:
            entrypoint, policy_input = inputs[i % len(inputs)]
            with OpaPolicyEngine("127.0.0.1", port) as fresh:
                fresh.decide(entrypoint, policy_input)  # type: ignore[arg-type]

        # OPA's own view of the same requests (closed loop, a few hundred samples): evaluation vs. whole handler.
        eval_ns, handler_ns = [], []
        for i in range(min(400, per_round)):
            entrypoint, policy_input = inputs[i % len(inputs)]
            _, metrics = engine.evaluate_with_metrics(f"pilothouse/{entrypoint}/decision", documents[i % len(documents)])
            eval_ns.append(metrics.get("timer_rego_query_eval_ns", 0))
            handler_ns.append(metrics.get("timer_server_handler_ns", 0))
        opa_side = {
            "samples": len(eval_ns),
            "query_eval_p50_us": float(np.percentile(eval_ns, 50) / 1e3),
            "query_eval_p99_us": float(np.percentile(eval_ns, 99) / 1e3),
            "server_handler_p50_us": float(np.percentile(handler_ns, 50) / 1e3),
        }

        no_reuse = summarise([open_loop(decide_new_connection, min(rate, 100.0), no_reuse_count)])

        sdk = OpaClient(host="127.0.0.1", port=port, timeout=5, retries=0)
        sdk._session.trust_env = False

        def decide_sdk(i: int) -> None:
            entrypoint, policy_input = inputs[i % len(inputs)]
            document = policy_input.to_opa()
            package, _, rule = f"pilothouse/{entrypoint}/decision".rpartition("/")
            body = sdk.query_rule(document, package_path=package, rule_name=rule)
            record_decision(policy_input, Decision.model_validate(body["result"]), digest=input_digest(document))

        sdk_cost = PhaseCost(engine.server_pid)
        sdk_client = summarise([sdk_cost.measure(lambda: open_loop(decide_sdk, rate, per_round))])
        sdk_client.update(sdk_cost.per_call(sdk_client["count"]))
        sdk.close_connection()
        revision = engine.bundle_revision()

    return {
        "benchmark": "policy",
        "offered_per_s": rate,
        "decisions_per_s": decision["achieved_per_s"],
        "p50_ms": decision["p50_ms"],
        "p99_ms": decision["p99_ms"],
        "target": {"p99_ms_max": 5.0, "met": decision["p99_ms"] <= 5.0},
        "decision": decision,
        "full_rules_before": full_rules,
        "baseline_trivial_opa_query": baseline,
        "no_connection_reuse": no_reuse,
        "sdk_client_before": sdk_client,
        "ratio_client_cpu_sdk_to_adapter": sdk_client["client_cpu_us_per_call"] / decision["client_cpu_us_per_call"],
        "ratio_opa_cpu_full_rules_to_decision": full_rules["opa_cpu_us_per_call"] / decision["opa_cpu_us_per_call"],
        "ratio_p50_full_rules_to_decision": full_rules["p50_ms"] / decision["p50_ms"],
        "ratio_p99_full_rules_to_decision": full_rules["p99_ms"] / decision["p99_ms"],
        "opa_reported": opa_side,
        "ratio_p50_decision_to_baseline": decision["p50_ms"] / baseline["p50_ms"],
        "ratio_p99_decision_to_baseline": decision["p99_ms"] / baseline["p99_ms"],
        "ratio_service_p50_decision_to_baseline": decision["service_p50_ms"] / baseline["service_p50_ms"],
        "ratio_service_p50_no_reuse_to_reuse": no_reuse["service_p50_ms"] / decision["service_p50_ms"],
        "outcomes": outcomes,
        "bundle_revision": revision,
        "opa_binary": str(find_opa_binary()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "seconds": rounds,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("decision", "decide() via adapter"),
        ("full_rules_before", "before: full rules, no fast path (same run)"),
        ("baseline_trivial_opa_query", "trivial OPA query (baseline)"),
        ("no_connection_reuse", f"decide(), new connection each, at {min(result['offered_per_s'], 100.0):.0f}/s"),
        ("sdk_client_before", "before: opa-python-client (requests)"),
    ):
        values = np.sort(result[key]["_latencies_ms"])
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
    ax.axvline(5.0, color="grey", linestyle=":", label="p99 target 5 ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency from due time (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"OPA decision latency at {result['offered_per_s']:.0f}/s offered (open loop)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pilothouse bench policy", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="offered decisions per second (default 500)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measured phase (default 5)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-reuse-count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "policy.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.seconds > 120:
        parser.error("--rate must be > 0 and --seconds in (0, 120]")

    result = run(args.rate, args.seconds, args.warmup, args.no_reuse_count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(result, png)
        result["plot"] = str(png)
    for key in ("decision", "full_rules_before", "baseline_trivial_opa_query", "no_connection_reuse",
                "sdk_client_before"):
        result[key].pop("_latencies_ms", None)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("offered_per_s", "decisions_per_s", "p50_ms", "p99_ms",
                                              "ratio_p50_decision_to_baseline", "ratio_service_p50_decision_to_baseline",
                                              "ratio_client_cpu_sdk_to_adapter", "ratio_opa_cpu_full_rules_to_decision",
                                              "ratio_p99_full_rules_to_decision")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
