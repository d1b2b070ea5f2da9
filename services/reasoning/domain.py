"""Pure reasoning logic (no I/O): hypotheses from the engine and the model, claim verification, counterfactual
checks, confidence, and mitigations from the typed catalogue.

Trust model: the model only *proposes*. It chooses from typed options (services of the incident, evidence ids that
exist, claim kinds, prediction kinds, fault kinds, catalogue actions with params that validate); this module checks
every choice against the incident's evidence and drops what does not hold, with a reason. Confidence is computed
here from the checks and the evidence strength, never taken from the model. Free text from the model is kept only
as a hypothesis summary (invisible characters stripped, length bounded, marked as the model's wording).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pilothouse.bus.actions import ActionCatalogue, ActionRejected, action_hash
from pilothouse.bus.records import Claim, DroppedClaim, Hypothesis, Prediction
from pilothouse.reasoning.engine import (
    DEFAULT_CONFIG,
    EdgeLike,
    EngineConfig,
    EvidenceLike,
    Ranking,
    feature_of,
    rank_root_causes,
    strength,
    transitive_callees,
)

# ---- the typed vocabulary the model chooses from --------------------------------------------------------------
CLAIM_KINDS = ("metric_up", "metric_down", "log_burst", "trace_hotspot", "change", "alert")
SIGNAL_CLASSES = ("latency", "errors", "cpu", "memory", "io", "network_io", "traffic", "call_pattern", "logs",
                  "change", "any")
FAULT_KINDS = ("cpu_saturation", "memory_leak", "network_delay", "latency", "error_burst", "bad_deploy",
               "dependency_failure", "unknown")
PREDICTION_KINDS = ("cause_onset_first", "own_signal_anomalous", "callees_do_not_explain",
                    "unrelated_services_healthy", "fault_signal_present", "recent_change")
# generated in code for every hypothesis, whoever proposed it
STANDARD_PREDICTIONS = ("cause_onset_first", "own_signal_anomalous", "callees_do_not_explain",
                        "unrelated_services_healthy", "fault_signal_present")
# a violated prediction of these kinds refutes the hypothesis; the others lower its confidence
REFUTING = frozenset({"cause_onset_first", "own_signal_anomalous", "callees_do_not_explain", "fault_signal_present"})
# signal classes that show each fault kind on the root-cause service
FAULT_SIGNALS: dict[str, frozenset[str]] = {
    "cpu_saturation": frozenset({"cpu"}),
    "memory_leak": frozenset({"memory"}),
    "network_delay": frozenset({"network_io", "network", "call_latency"}),
    "latency": frozenset({"latency", "network", "call_latency"}),
    "error_burst": frozenset({"errors", "logs"}),
    "bad_deploy": frozenset({"change"}),
    "dependency_failure": frozenset({"errors", "call_pattern"}),
}
_INTRINSIC = frozenset({"resource", "server_latency", "errors", "call_pattern", "logs", "change"})
# features a callee's fault cannot produce in its caller (the engine does not discount them either): a service that
# shows one of these itself is not "explained away" by a callee
_CAUSE_LIKE = frozenset({"resource", "call_pattern", "change", "network", "call_latency"})
_KIND_OF_CLAIM = {"log_burst": "log_burst", "trace_hotspot": "trace_hotspot", "change": "change_event",
                  "alert": "alert"}

# invisible characters that can hide instructions or secrets: zero-width, bidi controls, variation selectors, tags
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufe00-\ufe0f\U000e0000-\U000e007f"
                        "\U000e0100-\U000e01ef]")
_NAMESPACE = uuid.UUID("6f1f4f0e-6a2b-4f53-9b59-3c1b1f0c2a71")


def clean_text(text: str, limit: int) -> str:
    """NFKC, no invisible or control characters, at most ``limit`` characters (model output and prompt data)."""
    t = _INVISIBLE.sub("", unicodedata.normalize("NFKC", str(text)))
    t = "".join(ch if ch.isprintable() else " " for ch in t)
    return t[:limit]


def stable_id(prefix: str, *parts: object) -> str:
    """Deterministic id: a replayed incident version gets the same ids (idempotent downstream)."""
    return f"{prefix}-" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def stable_uuid(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(map(str, parts))))


# ---- the incident as the checks see it --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IncidentView:
    """Indexes over one incident's evidence and dependency graph (built once, read by every check)."""

    by_id: Mapping[str, EvidenceLike]
    services: frozenset[str]
    edges: tuple[tuple[str, str], ...]
    callees: Mapping[str, frozenset[str]]     # transitive
    callers: Mapping[str, frozenset[str]]     # transitive
    onset: Mapping[str, int]                  # earliest onset of above-bar evidence about the service
    power: Mapping[str, float]                # strongest above-bar evidence about the service (raw strength)
    intrinsic: Mapping[str, tuple[float, str]]  # strongest own (not edge/client/alert/host) item: (strength, id)
    cause_power: Mapping[str, float]          # strongest cause-like item (resource, call pattern, change, edge delay)
    classes: Mapping[str, frozenset[str]]     # signal classes / features anomalous on the service
    measured: frozenset[str]                  # classes anomalous anywhere in the incident
    z_bar: float


def _about(e: EvidenceLike) -> set[str]:
    out = {e.service}
    a = e.attributes
    if "caller" in a and "callee" in a:
        out |= {a["caller"], a["callee"]}
    return out


def _classes_of(e: EvidenceLike) -> set[str]:
    feat = feature_of(e)
    out = {feat, e.attributes.get("signal_class", "other")}
    if e.kind == "change_event":
        out.add("change")
    if e.kind == "log_burst":
        out.add("logs")
    return out


def build_view(evidence: Iterable[EvidenceLike], edges: Iterable[tuple[str, str] | EdgeLike],
               services: Iterable[str] = (), *, z_bar: float = DEFAULT_CONFIG.z_bar) -> IncidentView:
    items = list(evidence)
    pairs = tuple((e.caller, e.callee) if hasattr(e, "caller") else (e[0], e[1]) for e in edges)
    below = transitive_callees(pairs)
    above: dict[str, set[str]] = defaultdict(set)
    for caller, callees in below.items():
        for c in callees:
            above[c].add(caller)
    onset: dict[str, int] = {}
    power: dict[str, float] = defaultdict(float)
    intrinsic: dict[str, tuple[float, str]] = {}
    cause_power: dict[str, float] = defaultdict(float)
    classes: dict[str, set[str]] = defaultdict(set)
    measured: set[str] = set()
    for e in items:
        s = strength(float(e.score), z_bar) if e.kind != "change_event" else max(0.01, strength(float(e.score), 1.0))
        if s <= 0.0:
            continue
        feat = feature_of(e)
        cls = _classes_of(e)
        measured |= cls
        for svc in _about(e):
            if feat in ("host", "traffic"):
                continue
            power[svc] = max(power[svc], s)
            classes[svc] |= cls
            if e.onset_ms is not None and (svc not in onset or e.onset_ms < onset[svc]):
                onset[svc] = int(e.onset_ms)
        if feat in _CAUSE_LIKE and e.kind != "alert":
            for svc in (_about(e) if feat in ("network", "call_latency") else {e.service}):
                cause_power[svc] = max(cause_power[svc], s)
        if feat in _INTRINSIC and e.kind != "alert" and (e.service not in intrinsic or s > intrinsic[e.service][0]):
            intrinsic[e.service] = (s, e.evidence_id)
    all_services = set(services) | {s for e in items for s in _about(e)} | {x for p in pairs for x in p}
    return IncidentView(
        by_id={e.evidence_id: e for e in items}, services=frozenset(all_services), edges=pairs,
        callees={k: frozenset(v) for k, v in below.items()}, callers={k: frozenset(v) for k, v in above.items()},
        onset=onset, power=dict(power), intrinsic=intrinsic, cause_power=dict(cause_power), classes={k: frozenset(v) for k, v in classes.items()},
        measured=frozenset(measured), z_bar=z_bar)


# ---- claims --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClaimInput:
    """A claim as proposed (by the model, or generated from the engine's contributions)."""

    service: str
    kind: str
    signal_class: str
    evidence_ids: tuple[str, ...]
    text: str = ""


def claim_for_evidence(e: EvidenceLike) -> ClaimInput:
    """The claim that an evidence item itself makes (what the engine's citations say)."""
    if e.kind in ("metric_anomaly",):
        kind = "metric_down" if e.direction == "down" else "metric_up"
    elif e.kind == "trace_hotspot":
        kind = "trace_hotspot"
    else:
        kind = {"log_burst": "log_burst", "change_event": "change", "alert": "alert"}[e.kind]
    return ClaimInput(e.service, kind, e.attributes.get("signal_class", "any"), (e.evidence_id,))


def verify_claim(c: ClaimInput, view: IncidentView) -> str | None:
    """None if every cited item exists and says what the claim says; else the reason to drop the claim."""
    if not c.evidence_ids:
        return "uncited: a claim must cite evidence ids of this incident"
    if c.kind not in CLAIM_KINDS:
        return f"unknown claim kind {c.kind!r}"
    missing = [i for i in c.evidence_ids if i not in view.by_id]
    if missing:
        return f"cites evidence ids that are not in this incident: {', '.join(missing[:5])}"
    if c.service not in view.services:
        return f"service {c.service!r} is not part of this incident"
    for eid in c.evidence_ids:
        e = view.by_id[eid]
        if c.service not in _about(e):
            return f"{eid} is evidence about {e.service}, not {c.service}"
        want_kind = _KIND_OF_CLAIM.get(c.kind)
        if want_kind is not None and e.kind != want_kind:
            return f"{eid} is a {e.kind}, not a {c.kind}"
        if c.kind in ("metric_up", "metric_down"):
            if e.kind not in ("metric_anomaly", "trace_hotspot"):
                return f"{eid} is a {e.kind}, not a metric"
            want_dir = "up" if c.kind == "metric_up" else "down"
            if e.direction != want_dir:
                return f"{eid} went {e.direction}, not {want_dir}"
        if c.kind in ("metric_up", "metric_down", "log_burst", "trace_hotspot") and \
                strength(float(e.score), view.z_bar) <= 0.0:
            return f"{eid} is flat: robust z {float(e.score):.1f} is below the anomaly bar {view.z_bar:.1f}"
        if c.signal_class != "any":
            have = _classes_of(e)
            if "caller" in e.attributes:
                have |= {"latency", "network_io"}
            if c.signal_class not in have:
                return f"{eid} is a {e.attributes.get('signal_class', 'other')} signal, not {c.signal_class}"
    return None


def render_claim(c: ClaimInput, view: IncidentView) -> str:
    """The claim text shown to people: written by code from the verified fields and the cited summaries."""
    verb = {"metric_up": "rose", "metric_down": "fell", "log_burst": "log burst", "trace_hotspot": "trace hotspot",
            "change": "recent change", "alert": "alert"}[c.kind]
    cls = "" if c.signal_class == "any" else f"{c.signal_class} "
    cited = "; ".join(clean_text(view.by_id[i].summary, 160) for i in c.evidence_ids[:2])
    return f"{c.service}: {cls}{verb} — {cited}"[:400]


# ---- counterfactual checks -------------------------------------------------------------------------------------
PREDICTION_TEXT = {
    "cause_onset_first": "if {s} is the cause, its anomaly starts no later than those of the services that call it",
    "own_signal_anomalous": "{s}'s own resource, latency, error or behaviour signal is anomalous (not only its "
                            "callers' view of it)",
    "callees_do_not_explain": "no service {s} depends on shows a comparable anomaly that started no later, while {s} "
                              "itself shows only symptoms (latency, errors) such a callee could cause",
    "unrelated_services_healthy": "services that neither call {s} nor are called by it stay healthy",
    "fault_signal_present": "the signal of a {f} ({sig}) is anomalous on {s}",
    "recent_change": "{s} had a deploy or config change before the anomaly started",
}


def evaluate_prediction(kind: str, svc: str, fault: str, view: IncidentView, *,
                        tolerance_ms: int = DEFAULT_CONFIG.onset_tolerance_ms,
                        explain_ratio: float = DEFAULT_CONFIG.explain_ratio) -> tuple[str, str]:
    """(verdict, detail) of one prediction: holds | violated | unknown, decided on onsets, graph and scores."""
    own_onset = view.onset.get(svc)
    own_power = view.power.get(svc, 0.0)
    if kind == "cause_onset_first":
        ups = {u: view.onset[u] for u in view.callers.get(svc, ()) if u in view.onset}
        if own_onset is None:
            return "unknown", f"no onset time for {svc}'s anomaly"
        if not ups:
            return "unknown", f"no caller of {svc} shows an anomaly with an onset time"
        first, t = min(ups.items(), key=lambda kv: (kv[1], kv[0]))
        if own_onset <= t + tolerance_ms:
            return "holds", f"{svc} starts at {own_onset}, its earliest anomalous caller {first} at {t}"
        return "violated", f"caller {first} started {(own_onset - t) / 1000:.0f}s before {svc}"
    if kind == "own_signal_anomalous":
        if svc in view.intrinsic:
            s, eid = view.intrinsic[svc]
            return "holds", f"{eid} (strength {s:.2f})"
        if own_power > 0:
            return "unknown", f"only call-edge, client-side or alert evidence about {svc}"
        return "violated", f"no evidence about {svc} above the anomaly bar"
    if kind == "callees_do_not_explain":
        if not view.edges:
            return "unknown", "no dependency graph in the incident"
        rivals = []
        own_cause = view.cause_power.get(svc, 0.0)
        for d in sorted(view.callees.get(svc, ())):
            p, t = view.power.get(d, 0.0), view.onset.get(d)
            if p > 0 and p >= explain_ratio * own_power and own_cause < explain_ratio * p and (
                    t is None or own_onset is None or t <= own_onset + tolerance_ms):
                rivals.append((p, d))
        if rivals:
            p, d = max(rivals)
            return "violated", f"callee {d} shows an anomaly of strength {p:.2f} (vs {own_power:.2f}) no later"
        return "holds", f"none of {len(view.callees.get(svc, ()))} downstream services explains {svc}"
    if kind == "unrelated_services_healthy":
        if not view.edges:
            return "unknown", "no dependency graph in the incident"
        related = {svc} | set(view.callers.get(svc, ())) | set(view.callees.get(svc, ()))
        loud = sorted((p, o) for o, p in view.power.items() if o not in related and p >= own_power and p > 0)
        if loud:
            p, o = loud[-1]
            return "violated", f"{o} is not on {svc}'s call paths but shows an anomaly as strong ({p:.2f})"
        return "holds", "no unrelated service is as anomalous"
    if kind == "fault_signal_present":
        need = FAULT_SIGNALS.get(fault)
        if not need:
            return "unknown", f"fault kind {fault!r} names no signal"
        if need & view.classes.get(svc, frozenset()):
            return "holds", f"{'/'.join(sorted(need & view.classes[svc]))} anomalous on {svc}"
        if need & view.measured:
            return "violated", f"{'/'.join(sorted(need))} anomalies exist in this incident, but not on {svc}"
        return "unknown", f"no {'/'.join(sorted(need))} signal anomalous anywhere (maybe not collected)"
    if kind == "recent_change":
        changes = [e for e in view.by_id.values() if e.kind == "change_event" and e.service == svc]
        if changes:
            return "holds", ", ".join(sorted(e.evidence_id for e in changes)[:3])
        if "change" in view.measured:
            return "violated", f"change events exist for other services, none for {svc}"
        return "unknown", "no change events in the incident (change feed may be absent)"
    return "unknown", f"unknown prediction kind {kind!r}"


def predictions_for(svc: str, fault: str, extra: Iterable[str], view: IncidentView, hyp_id: str
                    ) -> list[Prediction]:
    kinds = [k for k in STANDARD_PREDICTIONS if k != "fault_signal_present" or fault in FAULT_SIGNALS]
    kinds += [k for k in extra if k in PREDICTION_KINDS and k not in kinds]
    out = []
    for k in kinds:
        verdict, detail = evaluate_prediction(k, svc, fault, view)
        sig = "/".join(sorted(FAULT_SIGNALS.get(fault, ())))
        out.append(Prediction(prediction_id=f"{hyp_id}.{k}", kind=k, target=svc, verdict=verdict,  # type: ignore[arg-type]
                              description=PREDICTION_TEXT[k].format(s=svc, f=fault, sig=sig), detail=detail[:300]))
    return out


CONFIDENCE_CAP = 0.95

# ---- confidence ------------------------------------------------------------------------------------------------
def confidence(score: float, top_scores: Sequence[float], predictions: Sequence[Prediction], *,
               verified_claims: int, origin: str) -> float:
    """From evidence strength, dominance over rivals and the checks — never from the model.

    evidence = 1 - e^(-score/2) (the engine's score of the service); dominance = its share of the top-3 scores;
    each holding prediction closes 10% of the remaining gap; a violated refuting prediction halves it, another
    violated one takes 20%; a model hypothesis with no verified claim is halved (it is not grounded). Capped at
    CONFIDENCE_CAP: evidence of a correlation never proves a cause.
    """
    total = sum(sorted(top_scores, reverse=True)[:3]) or 1.0
    c = (1.0 - math.exp(-max(0.0, score) / 2.0)) * (0.4 + 0.6 * min(1.0, max(0.0, score) / total))
    for p in predictions:
        if p.verdict == "holds":
            c += (1.0 - c) * 0.1
        elif p.verdict == "violated":
            c *= 0.5 if p.kind in REFUTING else 0.8
    if origin == "llm" and verified_claims == 0:
        c *= 0.5
    return round(min(CONFIDENCE_CAP, max(0.0, c)), 4)


# ---- hypotheses --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ActionPick:
    """A mitigation as proposed: catalogue action name and params (validated later)."""

    action_type: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ModelHypothesis:
    """One hypothesis as the model proposed it (already schema-valid JSON, not yet checked against evidence)."""

    root_cause_service: str
    fault_kind: str
    summary: str
    claims: tuple[ClaimInput, ...]
    predictions: tuple[str, ...]
    actions: tuple[ActionPick, ...]


def parse_model_output(data: Mapping[str, Any], limit: int) -> list[ModelHypothesis]:
    """Schema-valid model JSON → typed proposals (at most ``limit``); field shapes are trusted, content is not."""
    out = []
    for h in list(data.get("hypotheses", ()))[:limit]:
        claims = tuple(ClaimInput(str(c.get("service", "")), str(c.get("kind", "")),
                                  str(c.get("signal_class", "any")),
                                  tuple(str(i) for i in c.get("evidence_ids", ())),
                                  clean_text(c.get("text", ""), 200)) for c in h.get("claims", ()))
        acts = tuple(ActionPick(str(a.get("action_type", "")), dict(a.get("params") or {}))
                     for a in h.get("actions", ()))
        out.append(ModelHypothesis(str(h.get("root_cause_service", "")), str(h.get("fault_kind", "unknown")),
                                   clean_text(h.get("summary", ""), 300), claims,
                                   tuple(str(p) for p in h.get("predictions", ())), acts))
    return out


_FAULT_OF_CLASS = {"change": "bad_deploy", "memory": "memory_leak", "cpu": "cpu_saturation",
                   "errors": "error_burst", "logs": "error_burst", "call_pattern": "dependency_failure",
                   "network": "network_delay", "network_io": "network_delay", "latency": "latency",
                   "server_latency": "latency", "call_latency": "latency"}


def infer_fault_kind(svc: str, view: IncidentView) -> str:
    """The fault kind the evidence on ``svc`` points to (for engine hypotheses): a recent deploy if there is one,
    else the class of its strongest own anomaly."""
    items = [e for e in view.by_id.values() if svc in _about(e) and feature_of(e) not in ("host", "traffic")]
    if any(e.kind == "change_event" and e.service == svc for e in items):
        return "bad_deploy"
    for e in sorted(items, key=lambda e: (-float(e.score), e.evidence_id)):
        if strength(float(e.score), view.z_bar) <= 0:
            break
        for cls in (feature_of(e), e.attributes.get("signal_class", "other")):
            if e.service == svc or cls in ("network", "call_latency"):
                if cls in _FAULT_OF_CLASS and not (cls == "resource"):
                    return _FAULT_OF_CLASS[cls]
    return "unknown"


@dataclass(slots=True)
class _Draft:
    hyp: Hypothesis
    actions: tuple[ActionPick, ...] = ()


@dataclass(frozen=True, slots=True)
class Proposal:
    """A mitigation that passed the catalogue: what ActionProposed carries (event metadata added by handlers)."""

    action_id: str
    hypothesis_id: str
    action_type: str
    target_kind: str
    target: str
    params: Mapping[str, Any]
    action_hash: str
    rationale: str
    proposed_by: str
    reversible: bool
    blast_radius: str
    read_only: bool


@dataclass(frozen=True, slots=True)
class Assessment:
    """Everything reasoning concluded for one incident version."""

    outcome: str                         # supported | inconclusive
    hypotheses: tuple[Hypothesis, ...]
    proposals: tuple[Proposal, ...]
    deciding_data: tuple[str, ...]
    dropped_proposals: tuple[str, ...]
    ranking: Ranking
    dropped_claims: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def _hypothesis(view: IncidentView, ranking_scores: Mapping[str, float], top: Sequence[float], *, key: str,
                origin: str, svc: str, fault: str, summary: str, claims: Iterable[ClaimInput],
                extra_predictions: Iterable[str], abstain: bool, bar: float, rejected: bool = False) -> Hypothesis:
    # Stable across versions of one incident: a responder's gate-1 validation of "svc is the root cause" keeps holding
    # when the incident is updated (new alerts, refreshed evidence), and so do the proposals derived from it.
    hyp_id = stable_id("hyp", key.split("#", 1)[0], origin, svc, fault)
    kept: list[Claim] = []
    dropped: list[DroppedClaim] = []
    for i, c in enumerate(claims):
        reason = verify_claim(c, view)
        if reason is None:
            kept.append(Claim(claim_id=f"{hyp_id}.c{i}", text=render_claim(c, view), kind=c.kind, service=c.service,
                              signal=view.by_id[c.evidence_ids[0]].signal[:200], evidence_ids=list(c.evidence_ids),
                              verified=True))
        else:
            text = c.text or f"{c.kind} on {c.service} ({c.signal_class})"
            dropped.append(DroppedClaim(text=clean_text(text, 200), evidence_ids=list(c.evidence_ids[:10]),
                                        reason=reason))
    preds = predictions_for(svc, fault, extra_predictions, view, hyp_id)
    conf = confidence(ranking_scores.get(svc, 0.0), top, preds, verified_claims=len(kept), origin=origin)
    refuted = any(p.verdict == "violated" and p.kind in REFUTING for p in preds)
    if rejected:  # a responder rejected this root cause at gate 1: keep it visible, never propose for it
        status = "refuted"
        summary = f"{summary} [rejected by a responder at gate 1]"
    elif refuted:
        status = "refuted"
    elif conf >= bar and kept and not abstain:
        status = "supported"
    else:
        status = "inconclusive"
    return Hypothesis(hypothesis_id=hyp_id, rank=0, origin=origin, root_cause_service=svc,  # type: ignore[arg-type]
                      fault_kind=fault, summary=summary, status=status, confidence=conf,  # type: ignore[arg-type]
                      claims=kept, predictions=preds, dropped_claims=dropped)


def assess(incident_key: str, evidence: Sequence[EvidenceLike], edges: Iterable[tuple[str, str] | EdgeLike],
           services: Iterable[str], catalogue: ActionCatalogue, *, model: Sequence[ModelHypothesis] = (),
           model_name: str = "", engine_hypotheses: int = 3, support_bar: float = 0.5,
           engine_config: EngineConfig = DEFAULT_CONFIG, ranking: Ranking | None = None,
           rejected: frozenset[str] = frozenset()) -> Assessment:
    """Assemble, check and rank hypotheses; propose catalogue mitigations for the supported ones.

    ``rejected``: root-cause services a responder rejected for this incident (gate 1): such hypotheses are kept but
    refuted, so they sink to the end and get no proposals.

    ``incident_key`` (incident id + version) seeds every id, so the same input always yields the same output.
    """
    edges = list(edges)
    services = list(services)
    if ranking is None:
        ranking = rank_root_causes(evidence, edges, services=services,
                                   config=_wide(engine_config))
    view = build_view(evidence, edges, services, z_bar=engine_config.z_bar)
    scores = {c.service: c.score for c in ranking.candidates}
    top = [c.score for c in ranking.candidates[:3]]
    drafts: list[_Draft] = []
    dropped_props: list[str] = []

    for cand in ranking.candidates[:engine_hypotheses]:
        if cand.score <= 0:
            continue
        fault = infer_fault_kind(cand.service, view)
        cited = [view.by_id[x.evidence_id] for x in cand.contributions[:4] if x.evidence_id in view.by_id]
        claims = [claim_for_evidence(e) for e in cited]
        claims = [ClaimInput(cand.service, c.kind, c.signal_class, c.evidence_ids) for c in claims]
        feats = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cand.features.items(), key=lambda kv: -kv[1])
                          if not k.endswith(("_by_callee", "_by_caller")))[:200]
        summary = f"engine rank {cand.rank}: {cand.service} ({fault}), score {cand.score:.2f} from {feats}"
        drafts.append(_Draft(_hypothesis(view, scores, top, key=incident_key, origin="deterministic",
                                         svc=cand.service, fault=fault, summary=summary, claims=claims,
                                         extra_predictions=(), abstain=ranking.abstain, bar=support_bar,
                                         rejected=cand.service in rejected)))

    for i, mh in enumerate(model):
        if mh.root_cause_service not in view.services:
            dropped_props.append(f"model hypothesis {i + 1} dropped: root cause "
                                 f"{clean_text(mh.root_cause_service, 64)!r} is not a service of this incident")
            continue
        fault = mh.fault_kind if mh.fault_kind in FAULT_KINDS else "unknown"
        summary = f"model ({model_name}): {mh.summary}" if mh.summary else f"model ({model_name})"
        drafts.append(_Draft(_hypothesis(view, scores, top, key=incident_key, origin="llm",
                                         svc=mh.root_cause_service, fault=fault, summary=summary[:400],
                                         claims=mh.claims, extra_predictions=mh.predictions,
                                         abstain=ranking.abstain, bar=support_bar,
                                         rejected=mh.root_cause_service in rejected), mh.actions))

    # one hypothesis per id (the model may repeat itself); best first
    seen: set[str] = set()
    unique = []
    for d in drafts:
        if d.hyp.hypothesis_id not in seen:
            seen.add(d.hyp.hypothesis_id)
            unique.append(d)
    order = {"supported": 0, "inconclusive": 1, "refuted": 2}
    unique.sort(key=lambda d: (d.hyp.root_cause_service in rejected, order[d.hyp.status], -d.hyp.confidence, d.hyp.origin != "deterministic",
                               d.hyp.root_cause_service))
    hyps = tuple(d.hyp.model_copy(update={"rank": i + 1}) for i, d in enumerate(unique))
    outcome = "supported" if any(h.status == "supported" for h in hyps) else "inconclusive"

    proposals: list[Proposal] = []
    hashes: set[str] = set()

    def add(h: Hypothesis, pick: ActionPick, by: str, rationale: str) -> None:
        p = _check_action(h, pick, by, rationale, view, catalogue, hashes)
        if isinstance(p, str):
            dropped_props.append(p)
        elif p is not None:
            proposals.append(p)

    for d, h in zip(unique, hyps, strict=True):
        if h.status == "supported":
            for pick, why in engine_actions(h.root_cause_service, h.fault_kind, view):
                add(h, pick, "engine", why)
        for pick in d.actions:
            if h.status != "supported":
                dropped_props.append(f"{clean_text(pick.action_type, 64)} for {h.hypothesis_id} dropped: the "
                                     f"hypothesis is {h.status}, not supported")
                continue
            add(h, pick, f"model:{model_name}", f"model pick for {h.root_cause_service} ({h.fault_kind})")
    if outcome == "inconclusive" and hyps:
        # read-only: gathers the data that could decide it
        add(hyps[0], ActionPick("collect_diagnostics", {"service": hyps[0].root_cause_service}), "engine",
            "inconclusive: a read-only snapshot gathers data that could decide between the hypotheses")

    deciding: list[str] = []
    if outcome == "inconclusive":
        deciding = list(ranking.needed_data)
        for h in hyps[:3]:
            for p in h.predictions:
                if p.verdict == "unknown" and p.kind in REFUTING:
                    deciding.append(f"{h.root_cause_service}: {p.description} — {p.detail}")
        if not deciding:
            deciding.append("more evidence on the leading services (no hypothesis cleared the bar of "
                            f"{support_bar:.2f})")
    return Assessment(outcome, hyps, tuple(proposals), tuple(dict.fromkeys(deciding))[:12],
                      tuple(dropped_props)[:50], ranking, sum(len(h.dropped_claims) for h in hyps))


def _wide(cfg: EngineConfig) -> EngineConfig:
    from dataclasses import replace

    return replace(cfg, max_candidates=max(cfg.max_candidates, 64))


def engine_actions(svc: str, fault: str, view: IncidentView) -> list[tuple[ActionPick, str]]:
    """Deterministic mitigation picks for a supported hypothesis, from the evidence on ``svc`` and its fault kind
    (a recent deploy → rollback; memory growth → restart; CPU saturation → scale out; a failing dependency → the
    caller's fallback flag), always ending in the read-only collect_diagnostics. Memory growth and CPU saturation
    are offered whatever the fault kind (a saturated service fails requests: the errors may outscore the CPU
    signal, and scaling out is still the fix); the fault kind's own remedy comes first."""
    out: list[tuple[ActionPick, str]] = []
    items = [e for e in view.by_id.values() if e.service == svc]
    deploys = [e for e in items if e.kind == "change_event"
               and (e.attributes.get("change_type", "") == "deploy" or e.signal.startswith("deploy"))]
    if deploys:
        out.append((ActionPick("rollback_deploy", {"service": svc}),
                    f"recent deploy of {svc} ({deploys[0].evidence_id}) precedes the anomaly"))
    mem = [e for e in items if e.direction == "up" and e.attributes.get("signal_class") == "memory"]
    cpu = [e for e in items if e.direction == "up" and e.attributes.get("signal_class") == "cpu"]
    remedies: list[tuple[str, ActionPick, str]] = []  # (the fault kind it answers, pick, why)
    if mem:
        remedies.append(("memory_leak", ActionPick("restart_service", {"service": svc}),
                         f"memory growth on {svc} ({mem[0].evidence_id})"))
    if cpu:
        replicas = next((int(e.attributes["replicas"]) for e in cpu
                         if e.attributes.get("replicas", "").isdigit()), 0)
        target = min(12, max(2, replicas * 2)) if replicas else 2
        note = f"from {replicas}" if replicas else "current replica count not in the evidence"
        remedies.append(("cpu_saturation", ActionPick("scale_replicas", {"service": svc, "replicas": target}),
                         f"CPU saturation on {svc} ({cpu[0].evidence_id}); scale to {target} ({note})"))
    if fault in ("dependency_failure", "error_burst"):
        direct = sorted(c for c, d in view.edges if d == svc)
        if direct:
            caller = max(direct, key=lambda c: (view.power.get(c, 0.0), c))
            flag = re.sub(r"[^a-z0-9_]", "_", f"{svc}_fallback".lower())[:64]
            remedies.append((fault, ActionPick("toggle_feature_flag", {"service": caller, "flag": flag,
                                                                       "enabled": True}),
                             f"{svc} is failing: switch its caller {caller} to a fallback"))
    remedies.sort(key=lambda r: r[0] != fault)  # the fault kind's own remedy first (stable otherwise)
    out += [(pick, why) for _, pick, why in remedies]
    out.append((ActionPick("collect_diagnostics", {"service": svc}), f"read-only snapshot of {svc}"))
    return out


def _check_action(h: Hypothesis, pick: ActionPick, by: str, rationale: str, view: IncidentView,
                  catalogue: ActionCatalogue, hashes: set[str]) -> Proposal | str | None:
    name = clean_text(pick.action_type, 64)
    try:
        action = catalogue.get(pick.action_type)
        target_kind = "instance" if action.target_kinds == ("instance",) else "service"
        params = dict(pick.params)
        catalogue.check(pick.action_type, target_kind, params)
        svc = params.get("service")
        related = {h.root_cause_service} | set(view.callers.get(h.root_cause_service, ())) \
            | set(view.callees.get(h.root_cause_service, ()))
        if svc not in related:
            return (f"{name} for {h.hypothesis_id} dropped: targets {clean_text(str(svc), 64)!r}, which is neither "
                    f"{h.root_cause_service} nor on its call paths")
        target = str(params["instance"]) if target_kind == "instance" else str(svc)
        digest = action_hash(pick.action_type, target_kind, target, params)
    except ActionRejected as e:
        return f"{name} for {h.hypothesis_id} dropped ({by}): {e}"
    if digest in hashes:
        return None  # the same exact action is already proposed
    hashes.add(digest)
    return Proposal(action_id=stable_uuid("action", h.hypothesis_id, digest), hypothesis_id=h.hypothesis_id,
                    action_type=pick.action_type, target_kind=target_kind, target=target, params=params,
                    action_hash=digest, rationale=rationale[:300], proposed_by=by, reversible=action.reversible,
                    blast_radius=action.blast_radius, read_only=action.read_only)


# ---- cost bounds -------------------------------------------------------------------------------------------------
class CostLimiter:
    """Per-incident and process-wide bounds on model calls and tokens (an alert storm must not become an
    unbounded LLM bill). Time comes from the caller, so this stays pure and replayable."""

    def __init__(self, *, calls_per_incident: int, tokens_per_incident: int, calls_per_minute: int,
                 tokens_per_hour: int, max_incidents: int = 100_000):
        self.calls_per_incident = calls_per_incident
        self.tokens_per_incident = tokens_per_incident
        self.calls_per_minute = calls_per_minute
        self.tokens_per_hour = tokens_per_hour
        self.max_incidents = max_incidents
        self._per_incident: dict[str, list[int]] = {}   # incident -> [calls, tokens]
        self._calls: list[float] = []                   # call times in the last minute
        self._tokens: list[tuple[float, int]] = []      # (time, tokens) in the last hour

    def refusal(self, incident_id: str, now: float) -> str | None:
        """None if a call may go out now, else why not."""
        self._calls = [t for t in self._calls if now - t < 60.0]
        self._tokens = [(t, n) for t, n in self._tokens if now - t < 3600.0]
        calls, tokens = self._per_incident.get(incident_id, [0, 0])
        if calls >= self.calls_per_incident:
            return f"incident already used {calls} model calls (limit {self.calls_per_incident})"
        if tokens >= self.tokens_per_incident:
            return f"incident already used {tokens} tokens (limit {self.tokens_per_incident})"
        if len(self._calls) >= self.calls_per_minute:
            return f"process-wide limit of {self.calls_per_minute} model calls per minute reached"
        used = sum(n for _, n in self._tokens)
        if used >= self.tokens_per_hour:
            return f"process-wide limit of {self.tokens_per_hour} tokens per hour reached"
        return None

    def record(self, incident_id: str, now: float, tokens: int) -> None:
        """Count one call (made, whatever its outcome) and the tokens it used."""
        if incident_id not in self._per_incident and len(self._per_incident) >= self.max_incidents:
            self._per_incident.pop(next(iter(self._per_incident)))  # oldest incident first
        entry = self._per_incident.setdefault(incident_id, [0, 0])
        entry[0] += 1
        entry[1] += tokens
        self._calls.append(now)
        self._tokens.append((now, tokens))
