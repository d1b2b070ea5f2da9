"""Deterministic root-cause ranking: evidence items + service dependency graph in, ranked candidates out.

Pure and fast (no I/O, no model). It is the fallback when the LLM is down and the cross-check of the LLM's
hypotheses: every candidate carries the evidence ids and features that produced its score.

How a service earns its score (each feature is the strongest item of its group, so the P90/P95/P99 variants or
CpuUsage/CpuUsageRate of one signal count once):
- intrinsic symptoms: resource saturation (cpu, memory, io, network bytes), its own server-side latency, errors,
  a changed call pattern in traces (a service that stops or starts calling others changed its own behaviour),
  log bursts, and recent changes (deploy/config);
- network blame from call-edge evidence: an edge whose network time grew blames both endpoints, weighted by the
  share of the endpoint's edges that are anomalous (a delayed pod delays *all* its edges; its busy caller has many
  healthy ones);
- propagation: a caller's latency and errors are discounted when a callee (direct or transitive) shows a symptom at
  least as strong that started no later — callee anomalies that start earlier explain caller anomalies; a caller's
  changed call pattern is discounted when its requests stop right after calling a callee (evidence attribute
  ``stopped_caller``: the callee's answer, not the caller's code, cut the requests short);
- effects-only signals (client-side latency, traffic, host-level metrics) weigh little.

Abstains when the best score does not clear ``abstain_below``; the result then says which data would decide it.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


class EvidenceLike(Protocol):
    """What the engine reads from an evidence item (the sensing dataclass and the Avro twin both fit)."""

    evidence_id: str
    kind: str
    service: str
    signal: str
    direction: str
    score: float
    onset_ms: int | None
    attributes: Mapping[str, str]


class EdgeLike(Protocol):
    caller: str
    callee: str


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Weights of the features. Generic defaults: not fitted to any dataset's cases."""

    z_bar: float = 4.0                       # evidence below this robust z is ignored
    abstain_below: float = 1.0               # best score under this -> abstain
    w_resource: float = 1.0
    w_server_latency: float = 1.0
    w_errors: float = 1.0
    w_call_pattern: float = 1.0
    w_network: float = 1.0
    w_call_latency: float = 0.8
    w_logs: float = 0.6
    # A change (deploy/config) on a service that also shows its own, unexplained symptom is the classic root cause:
    # the two corroborate each other beyond their separate weights.
    w_change_corroborated: float = 0.6
    w_change: float = 0.6
    w_client_latency: float = 0.25
    w_traffic: float = 0.15
    w_host: float = 0.05
    w_other: float = 0.2
    explained_factor: float = 0.25           # what is left of a caller symptom that a callee explains
    explain_ratio: float = 0.5               # a callee symptom this strong (relative) counts as an explanation
    onset_tolerance_ms: int = 60_000         # "no later than" within one scrape interval
    max_candidates: int = 10


@dataclass(frozen=True, slots=True)
class Contribution:
    evidence_id: str
    feature: str
    points: float


@dataclass(frozen=True, slots=True)
class Candidate:
    service: str
    rank: int
    score: float
    onset_ms: int | None
    features: Mapping[str, float]
    contributions: tuple[Contribution, ...]
    supporting: tuple[str, ...] = ()   # every evidence id about this service above the bar, strongest first


@dataclass(frozen=True, slots=True)
class Ranking:
    candidates: tuple[Candidate, ...]
    abstain: bool
    reason: str
    needed_data: tuple[str, ...] = ()
    evidence_used: int = 0
    evidence_ignored: int = 0

    def top(self, k: int) -> list[str]:
        return [c.service for c in self.candidates[:k]]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (for prompts, the console and the ledger)."""
        return {
            "abstain": self.abstain, "reason": self.reason, "needed_data": list(self.needed_data),
            "evidence_used": self.evidence_used, "evidence_ignored": self.evidence_ignored,
            "candidates": [
                {"service": c.service, "rank": c.rank, "score": c.score, "onset_ms": c.onset_ms,
                 "features": dict(c.features), "supporting": list(c.supporting),
                 "contributions": [{"evidence_id": x.evidence_id, "feature": x.feature, "points": x.points}
                                   for x in c.contributions]}
                for c in self.candidates
            ],
        }


# feature name -> (weight attribute, explainable by a callee?)
_FEATURES: dict[str, tuple[str, bool]] = {
    "resource": ("w_resource", False),
    "server_latency": ("w_server_latency", True),
    "errors": ("w_errors", True),
    "call_pattern": ("w_call_pattern", False),
    "network": ("w_network", False),
    "call_latency": ("w_call_latency", False),
    "logs": ("w_logs", True),
    "change": ("w_change", False),
    "client_latency": ("w_client_latency", True),
    "traffic": ("w_traffic", True),
    "host": ("w_host", False),
    "other": ("w_other", True),
}
# Symptoms that can explain a caller's latency/errors.
_EXPLAINING = ("resource", "server_latency", "errors", "call_pattern", "network", "call_latency", "change")
_EDGE_FEATURES = ("network", "call_latency")


def _feature_of(e: EvidenceLike) -> str:
    a = e.attributes
    cls, side = a.get("signal_class", "other"), a.get("side", "pod")
    if e.kind == "change_event":
        return "change"
    if "caller" in a and "callee" in a:
        return "call_latency" if a.get("edge_metric") == "call_latency" else "network"
    if side == "host":
        return "host"
    if cls == "call_pattern":
        return "call_pattern"
    if e.kind == "log_burst":
        return "errors" if cls == "errors" else "logs"
    if cls in ("cpu", "memory", "io", "network_io"):
        return "resource"
    if cls == "latency":
        return "client_latency" if side == "client" else "server_latency"
    if cls == "errors":
        return "errors"
    if cls == "traffic":
        return "traffic"
    return "other"


def strength(z: float, z_bar: float) -> float:
    """Diminishing returns on the robust z: 0 at the bar, ~ln(z/z_bar) far above it."""
    return math.log1p(max(0.0, z - z_bar) / z_bar)


def _downstream(edges: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """Transitive callees of every service."""
    direct: dict[str, set[str]] = defaultdict(set)
    for caller, callee in edges:
        if caller != callee:
            direct[caller].add(callee)
    closure: dict[str, set[str]] = {}
    for s in list(direct):
        seen: set[str] = set()
        todo = deque(direct[s])
        while todo:
            d = todo.popleft()
            if d in seen or d == s:
                continue
            seen.add(d)
            todo.extend(direct.get(d, ()))
        closure[s] = seen
    return closure


DEFAULT_CONFIG = EngineConfig()

# Public names for the hypothesis checks in domain.py (same classification and graph closure as the ranking).
feature_of = _feature_of
transitive_callees = _downstream


def rank_root_causes(
    evidence: Iterable[EvidenceLike], edges: Iterable[tuple[str, str] | EdgeLike] = (), *,
    config: EngineConfig = DEFAULT_CONFIG, services: Iterable[str] = (),
) -> Ranking:
    """Rank candidate root-cause services. ``edges`` are (caller, callee) pairs or objects with ``caller`` and
    ``callee`` attributes (the ``DependencyEdge`` records of an incident); ``services`` adds known services with
    no evidence (they rank last with score 0 and make the 'what was checked' list complete)."""
    cfg = config
    edges = [(e.caller, e.callee) if hasattr(e, "caller") else (e[0], e[1]) for e in edges]
    # best item per (service, feature, signal-group)
    best: dict[tuple[str, str], tuple[float, EvidenceLike]] = {}
    net_items: list[tuple[float, EvidenceLike]] = []
    used = ignored = 0
    support: dict[str, list[tuple[float, str]]] = defaultdict(list)
    # caller -> strongest "its requests stop right after calling this service" item (see _feature_of's errors)
    stopped_by: dict[str, float] = {}
    for e in evidence:
        s = strength(float(e.score), cfg.z_bar)
        if s <= 0.0:
            ignored += 1
            continue
        used += 1
        support[e.service].append((-s, e.evidence_id))
        if "caller" in e.attributes and e.attributes["caller"] != e.service:
            support[e.attributes["caller"]].append((-s, e.evidence_id))
        stopped = e.attributes.get("stopped_caller")
        if stopped and stopped != e.service and s > stopped_by.get(stopped, 0.0):
            stopped_by[stopped] = s
        feat = _feature_of(e)
        if feat in _EDGE_FEATURES:
            net_items.append((s, e))
            continue
        key = (e.service, feat)
        if key not in best or s > best[key][0]:
            best[key] = (s, e)

    # edge blame (network time, call latency): both endpoints, weighted by the share of each endpoint's edges
    # that are anomalous
    degree: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for caller, callee in edges:
        degree[caller].add((caller, callee))
        degree[callee].add((caller, callee))
    per_edge: dict[tuple[str, str, str], tuple[float, EvidenceLike]] = {}
    for s, e in net_items:
        k = (e.attributes["caller"], e.attributes["callee"], _feature_of(e))
        if k not in per_edge or s > per_edge[k][0]:
            per_edge[k] = (s, e)
    edge_score: dict[tuple[str, str], float] = defaultdict(float)
    edge_contrib: dict[tuple[str, str], list[Contribution]] = defaultdict(list)
    for feat in _EDGE_FEATURES:
        touched: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for (a, b, f) in per_edge:
            if f == feat:
                touched[a].add((a, b))
                touched[b].add((a, b))
        for svc, ks in touched.items():
            share = len(ks) / max(len(degree.get(svc, ())), len(ks))
            for a, b in sorted(ks):
                s, e = per_edge[(a, b, feat)]
                edge_score[(svc, feat)] += s * share
                edge_contrib[(svc, feat)].append(Contribution(e.evidence_id, feat, round(s * share, 4)))

    all_services = set(services) | {k[0] for k in best} | {k[0] for k in edge_score}
    feats: dict[str, dict[str, float]] = {svc: {} for svc in all_services}
    onset: dict[str, int | None] = {svc: None for svc in all_services}
    for (svc, feat), (s, e) in best.items():
        feats[svc][feat] = s
        if e.onset_ms is not None and feat not in ("host", "traffic") and (
                onset[svc] is None or e.onset_ms < onset[svc]):
            onset[svc] = e.onset_ms
    for (svc, feat), v in edge_score.items():
        feats[svc][feat] = v

    # propagation: a callee symptom at least as strong that started no later explains a caller symptom
    below = _downstream(edges)

    above: dict[str, set[str]] = defaultdict(set)
    for caller, callees in below.items():
        for d in callees:
            above[d].add(caller)

    def upstream_pattern(svc: str) -> float:
        """Strongest call-pattern change among the callers of ``svc`` (changed requests change what it does)."""
        return max((feats.get(u, {}).get("call_pattern", 0.0) for u in above.get(svc, ())), default=0.0)

    def explaining(svc: str) -> tuple[float, int | None]:
        strongest, when = 0.0, None
        for d in below.get(svc, ()):
            v = max((feats.get(d, {}).get(f, 0.0) for f in _EXPLAINING), default=0.0)
            if v > strongest:
                strongest, when = v, onset.get(d)
        return strongest, when

    candidates = []
    for svc in sorted(all_services):
        f = feats[svc]
        cause, cause_onset = explaining(svc)
        own_onset = onset[svc]
        cause_in_time = (cause_onset is None or own_onset is None
                         or cause_onset <= own_onset + cfg.onset_tolerance_ms)
        total = 0.0
        parts: dict[str, float] = {}
        contribs: list[Contribution] = []
        for feat, v in f.items():
            w_attr, explainable = _FEATURES[feat]
            pts = v * getattr(cfg, w_attr)
            if explainable and cause_in_time and cause >= cfg.explain_ratio * v:
                pts *= cfg.explained_factor
                parts[f"{feat}_explained_by_callee"] = 1.0
            elif feat == "call_pattern" and stopped_by.get(svc, 0.0) >= cfg.explain_ratio * v:
                # its requests stop right after a call to a callee: the callee's answer changed its calls
                pts *= cfg.explained_factor
                parts[f"{feat}_explained_by_callee"] = 1.0
            elif feat == "call_pattern" and upstream_pattern(svc) >= cfg.explain_ratio * v:
                pts *= cfg.explained_factor
                parts[f"{feat}_explained_by_caller"] = 1.0
            parts[feat] = round(pts, 4)
            total += pts
            if feat in _EDGE_FEATURES:
                scale = (pts / v) if v else 0.0
                contribs.extend(Contribution(c.evidence_id, c.feature, round(c.points * scale, 4))
                                for c in edge_contrib[(svc, feat)])
            else:
                contribs.append(Contribution(best[(svc, feat)][1].evidence_id, feat, round(pts, 4)))
        own_symptom = max((f.get(k, 0.0) for k in ("errors", "server_latency", "resource")
                           if f"{k}_explained_by_callee" not in parts), default=0.0)
        if "change" in f and own_symptom > 0.0:
            bonus = cfg.w_change_corroborated * min(1.0, f["change"])
            parts["change_corroborated"] = round(bonus, 4)
            total += bonus
            contribs.append(Contribution(best[(svc, "change")][1].evidence_id, "change_corroborated", round(bonus, 4)))
        contribs.sort(key=lambda c: -c.points)
        candidates.append((total, svc, own_onset, parts, tuple(contribs)))

    # higher score first; earlier onset breaks ties; then name for determinism
    candidates.sort(key=lambda c: (-c[0], c[2] if c[2] is not None else 2**62, c[1]))
    ranked = tuple(
        Candidate(service=svc, rank=i + 1, score=round(total, 4), onset_ms=on, features=parts, contributions=cs,
                  supporting=tuple(eid for _, eid in sorted(support.get(svc, ()))))
        for i, (total, svc, on, parts, cs) in enumerate(candidates[: cfg.max_candidates])
    )
    if not ranked or ranked[0].score < cfg.abstain_below:
        have = {feat for f in feats.values() for feat in f}
        needed = []
        if "network" not in have:
            needed.append("per-call-edge latency measured at both client and server (network time)")
        if not any(f in have for f in ("call_pattern",)):
            needed.append("traces of the incident window and of a normal period (call pattern, span latency)")
        if not any(f in have for f in ("logs", "errors")):
            needed.append("error logs or error/success-rate metrics of the incident window")
        if "change" not in have:
            needed.append("deploy/config change events of the last hour")
        best_txt = f"best {ranked[0].service} at {ranked[0].score:.2f}" if ranked else "no evidence above the bar"
        return Ranking(ranked, True, f"no candidate clears {cfg.abstain_below:.2f} ({best_txt})",
                       tuple(needed), used, ignored)
    margin = ranked[0].score - (ranked[1].score if len(ranked) > 1 else 0.0)
    return Ranking(ranked, False, f"{ranked[0].service} leads by {margin:.2f}", (), used, ignored)
