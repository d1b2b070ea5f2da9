"""Deterministic root-cause ranking: propagation over the graph, edge blame, abstention, citations."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from pilothouse.reasoning.engine import EngineConfig, Ranking, rank_root_causes, strength
from pilothouse.sensing.evidence import EvidenceItem, Window, evidence_id

W = Window(0, 300_000)
MIN = 60_000


def ev(service: str, signal: str, z: float, *, cls: str, side: str = "pod", kind: str = "metric_anomaly",
       onset: int | None = 60_000, direction: str = "up", **attrs: str) -> EvidenceItem:
    return EvidenceItem(
        evidence_id=evidence_id(kind, service, signal, W), kind=kind,  # type: ignore[arg-type]
        service=service, signal=signal, summary=f"{signal} of {service}",
        direction=direction, score=z, onset_ms=onset, baseline=1.0,  # type: ignore[arg-type]
        observed=2.0, source_link="test://", attributes={"signal_class": cls, "side": side, **attrs},
    )


def edge(caller: str, callee: str, z: float, metric: str = "network_time") -> EvidenceItem:
    return ev(callee, f"{metric}[{caller}->{callee}]", z, cls="latency", caller=caller, callee=callee,
              edge_metric=metric)


GRAPH = [("frontend", "checkout"), ("frontend", "cart"), ("checkout", "payment"), ("checkout", "cart"),
         ("checkout", "email")]


def test_strength_is_zero_at_the_bar_and_grows_slowly() -> None:
    assert strength(4.0, 4.0) == 0.0
    assert 0 < strength(8.0, 4.0) < strength(80.0, 4.0) < strength(8000.0, 4.0) < 8


def test_callee_saturation_explains_caller_latency() -> None:
    items = [
        ev("payment", "cpu", 40, cls="cpu"),
        ev("checkout", "server_p90", 200, cls="latency", side="server"),   # louder, but downstream explains it
        ev("frontend", "server_p90", 150, cls="latency", side="server"),
    ]
    r = rank_root_causes(items, GRAPH)
    assert r.top(1) == ["payment"] and not r.abstain
    checkout = next(c for c in r.candidates if c.service == "checkout")
    assert checkout.features.get("server_latency_explained_by_callee") == 1.0
    # without the graph nothing explains the caller, and the loudest latency wins: the graph is what decides
    assert rank_root_causes(items, []).top(1) == ["checkout"]


def test_a_callee_that_starts_later_does_not_explain() -> None:
    items = [
        ev("checkout", "server_p90", 60, cls="latency", side="server", onset=0),
        ev("payment", "server_p90", 60, cls="latency", side="server", onset=5 * MIN),
    ]
    r = rank_root_causes(items, GRAPH)
    assert r.top(1) == ["checkout"]
    assert "server_latency_explained_by_callee" not in r.candidates[0].features


def test_network_blame_goes_to_the_endpoint_whose_edges_all_degrade() -> None:
    # cart is delayed: both of its edges degrade; each caller has other, healthy edges
    r = rank_root_causes([edge("frontend", "cart", 200), edge("checkout", "cart", 150)], GRAPH)
    assert r.top(1) == ["cart"]
    # a single degraded edge to a leaf (payment has no other edge) blames the leaf, not the busy caller
    r = rank_root_causes([edge("checkout", "payment", 300)], GRAPH)
    assert r.top(2) == ["payment", "checkout"]
    assert r.candidates[0].score > 2 * r.candidates[1].score


def test_client_span_latency_blames_the_callee_over_the_wrapping_caller_span() -> None:
    items = [
        edge("checkout", "payment", 600, metric="call_latency"),
        ev("checkout", "latency:ChargeCard", 590, cls="latency", side="trace", kind="trace_hotspot"),
    ]
    r = rank_root_causes(items, GRAPH)
    assert r.top(1) == ["payment"]


def test_changed_call_pattern_upstream_explains_a_downstream_pattern_change() -> None:
    items = [
        ev("frontend", "fanout:GET /product", 30, cls="call_pattern", side="trace", kind="trace_hotspot",
           direction="down"),
        ev("cart", "fanout:GetCart", 40, cls="call_pattern", side="trace", kind="trace_hotspot", direction="down"),
    ]
    r = rank_root_causes(items, GRAPH)
    assert r.top(1) == ["frontend"]
    assert r.candidates[1].features.get("call_pattern_explained_by_caller") == 1.0


def test_contributions_cite_evidence_ids_and_sum_to_the_score() -> None:
    items = [ev("payment", "cpu", 40, cls="cpu"), ev("payment", "cpu_rate", 45, cls="cpu"),
             ev("payment", "mem", 9, cls="memory"), edge("checkout", "payment", 100)]
    r = rank_root_causes(items, GRAPH)
    top = r.candidates[0]
    ids = {c.evidence_id for c in top.contributions}
    # the strongest item of a feature group stands for the group (cpu and cpu_rate are one symptom)
    assert evidence_id("metric_anomaly", "payment", "cpu_rate", W) in ids
    assert evidence_id("metric_anomaly", "payment", "cpu", W) not in ids
    assert sum(c.points for c in top.contributions) == pytest.approx(top.score, abs=1e-3)
    assert r.evidence_used == 4 and r.evidence_ignored == 0
    # every item about the service stays citable, strongest first; the edge is cited for both endpoints
    assert top.supporting[:2] == (items[3].evidence_id, evidence_id("metric_anomaly", "payment", "cpu_rate", W))
    assert set(top.supporting) == {i.evidence_id for i in items}
    checkout = next(c for c in r.candidates if c.service == "checkout")
    assert checkout.supporting == (items[3].evidence_id,)
    d = r.to_dict()
    assert d["candidates"][0]["service"] == "payment" and d["candidates"][0]["contributions"][0]["evidence_id"]


def test_abstains_when_nothing_clears_the_bar_and_says_what_would_decide() -> None:
    r = rank_root_causes([ev("cart", "mem", 4.5, cls="memory"), ev("cart", "noise", 2.0, cls="other")], GRAPH,
                         services=["frontend", "cart"])
    assert r.abstain and r.evidence_ignored == 1
    assert "no candidate clears" in r.reason
    assert any("traces" in n for n in r.needed_data) and any("change" in n for n in r.needed_data)
    empty = rank_root_causes([], GRAPH)
    assert empty.abstain and empty.candidates == ()


def test_ranking_does_not_depend_on_evidence_order() -> None:
    items = [ev("payment", "cpu", 40, cls="cpu"), ev("checkout", "server_p90", 60, cls="latency", side="server"),
             ev("cart", "mem", 12, cls="memory"), edge("frontend", "cart", 30), edge("checkout", "cart", 25),
             ev("email", "errors", 14, cls="errors")]
    want = rank_root_causes(items, GRAPH)
    for seed in range(5):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        got = rank_root_causes(shuffled, list(reversed(GRAPH)))
        assert [(c.service, c.score) for c in got.candidates] == [(c.service, c.score) for c in want.candidates]


def test_accepts_the_avro_twin_of_evidence() -> None:
    records = pytest.importorskip("pilothouse.bus.records")
    items = [ev("payment", "cpu", 40, cls="cpu"), ev("checkout", "server_p90", 60, cls="latency", side="server")]
    twins = [records.Evidence.model_validate(i.to_dict()) for i in items]
    twin_edges = [records.DependencyEdge(caller=a, callee=b) for a, b in GRAPH]
    a, b = rank_root_causes(items, GRAPH), rank_root_causes(twins, twin_edges)
    assert a.top(1) == ["payment"]
    assert [(c.service, c.score) for c in a.candidates] == [(c.service, c.score) for c in b.candidates]


def test_weights_are_configurable() -> None:
    items = [ev("payment", "cpu", 40, cls="cpu"), ev("cart", "server_p90", 40, cls="latency", side="server")]
    assert rank_root_causes(items, []).top(1) == ["cart"]  # a tie in score and onset: the name decides
    heavy_cpu = replace(EngineConfig(), w_resource=2.0)
    assert rank_root_causes(items, [], config=heavy_cpu).top(1) == ["payment"]


def test_real_nezha_slice_ranks_the_faulty_service_first() -> None:
    from pilothouse.evaluation import case_evidence, iter_nezha_cases

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "rca" / "nezha_slice"
    for case in iter_nezha_cases(fixtures):
        r: Ranking = rank_root_causes(case_evidence(case), case.edges, services=case.services)
        assert r.top(1) == [case.root_cause], (case.case_id, case.fault_type, r.candidates[:3])


def test_a_change_corroborated_by_the_same_services_own_errors_clears_the_bar():
    """Thin but decisive evidence (real monitoring of a small fleet): a deploy on X, then X's error ratio jumps."""
    from types import SimpleNamespace

    from pilothouse.reasoning.engine import rank_root_causes

    def ev(i, kind, svc, signal, score, direction, attrs):
        return SimpleNamespace(evidence_id=f"ev-{i}", kind=kind, service=svc, signal=signal, score=score,
                               direction=direction, onset_ms=1000 + i, attributes=attrs)

    evidence = [ev(1, "change_event", "checkout", "deploy:v2", 10.0, "none",
                   {"signal_class": "change", "change_type": "deploy"}),
                ev(2, "metric_anomaly", "checkout", "error_ratio", 5.0, "up", {"signal_class": "errors"})]
    ranking = rank_root_causes(evidence, [("frontend", "checkout")], services=["frontend", "checkout"])
    assert not ranking.abstain and ranking.candidates[0].service == "checkout"
    assert "change_corroborated" in ranking.candidates[0].features
    # the change alone, without the service's own symptom, stays below the bar
    alone = rank_root_causes(evidence[:1], [("frontend", "checkout")], services=["frontend", "checkout"])
    assert alone.abstain
