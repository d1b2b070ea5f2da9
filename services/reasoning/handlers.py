"""One handler per consumed record: IncidentUpdated → HypothesesProposed + ActionProposed; HypothesisValidated →
remembered (gate 1 is enforced by policy; reasoning only notes the verdict).

Idempotent on (incident_id, version): a version at or below the last one handled is skipped (stale or replayed), and
every output id is derived from (incident_id, version), so a batch re-delivered after an aborted transaction
produces the same records. The model step never blocks the pipeline: when the model is off, refused, over budget,
down or talking nonsense, the incident still gets the engine's hypotheses, marked with the reason.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import orjson
from prometheus_client import Counter, Gauge, Histogram

from pilothouse.bus.actions import ActionCatalogue
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import ActionProposed, HypothesesProposed, HypothesisValidated, IncidentUpdated
from pilothouse.bus.transactions import Output
from pilothouse.reasoning.adapters.llm import CircuitOpen, LlmClient, LlmInvalidOutput, LlmResult, LlmUnavailable
from pilothouse.reasoning.config import LlmSettings, Settings
from pilothouse.reasoning.domain import Assessment, CostLimiter, ModelHypothesis, assess, parse_model_output, stable_uuid
from pilothouse.reasoning.engine import DEFAULT_CONFIG, EvidenceLike, Ranking, rank_root_causes
from pilothouse.reasoning.prompts import SCHEMA_NAME, TEMPLATE_VERSION, build_prompt

log = logging.getLogger("pilothouse.reasoning")
PRODUCER = "reasoning"

LLM_CALLS = Counter("pilothouse_reasoning_llm_calls_total", "Model steps, by outcome", ["outcome"])
HANDLED = Counter("pilothouse_reasoning_incidents_total", "Incident versions, by result", ["result"])
LLM_SECONDS = Histogram("pilothouse_reasoning_llm_seconds", "Model call wall time (all attempts)",
                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60))
CIRCUIT_OPEN = Gauge("pilothouse_reasoning_llm_circuit_open", "1 while the LLM circuit breaker is open or probing")
OVERHEAD_SECONDS = Histogram("pilothouse_reasoning_overhead_seconds", "Reasoning time per incident, model excluded",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class ModelOutcome:
    """What the model step produced: typed proposals (possibly none) and why."""

    status: str                           # ok | unavailable | invalid_output | refused_unredacted | disabled | circuit_open
    hypotheses: tuple[ModelHypothesis, ...] = ()
    model: str = ""
    prompt_template_version: str = ""
    sampling: dict[str, str] | None = None
    detail: str = ""
    result: LlmResult | None = None
    prompt_s: float = 0.0                 # building the prompt (counted as overhead)


class ModelStep:
    """Prompt → bounded, budgeted model call → typed proposals. Shared by the service and ``eval rca --with-llm``."""

    def __init__(self, settings: Settings, llm_settings: LlmSettings, client: LlmClient | None,
                 catalogue: ActionCatalogue, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.llm = llm_settings
        self.client = client
        self.catalogue = catalogue
        self.clock = clock
        self.limiter = CostLimiter(calls_per_incident=settings.max_llm_calls_per_incident,
                                   tokens_per_incident=settings.max_llm_tokens_per_incident,
                                   calls_per_minute=settings.max_llm_calls_per_minute,
                                   tokens_per_hour=settings.max_llm_tokens_per_hour)

    @property
    def sampling(self) -> dict[str, str]:
        return {"temperature": str(self.llm.temperature), "top_p": str(self.llm.top_p), "seed": str(self.llm.seed),
                "max_tokens": str(self.llm.max_tokens)}

    def run(self, incident_id: str, *, title: str, evidence: Sequence[EvidenceLike],
            edges: Sequence[tuple[str, str]], services: Sequence[str], ranking: Ranking,
            redaction_scanned: bool) -> ModelOutcome:
        if not self.settings.llm_enabled or self.client is None:
            return ModelOutcome("disabled", detail="model disabled by settings")
        if not redaction_scanned:
            # the prompt may only carry redacted content: no manifest, no model
            return ModelOutcome("refused_unredacted", detail="record has no complete redaction manifest "
                                                             "(redaction.scanned is false)")
        refusal = self.limiter.refusal(incident_id, self.clock())
        if refusal is not None:
            LLM_CALLS.labels("over_budget").inc()
            return ModelOutcome("unavailable", detail=f"over budget: {refusal}")
        try:
            return self._call(incident_id, title=title, evidence=evidence, edges=edges, services=services,
                              ranking=ranking)
        finally:
            CIRCUIT_OPEN.set(0 if self.client.breaker.state == "closed" else 1)

    def _call(self, incident_id: str, *, title: str, evidence: Sequence[EvidenceLike],
              edges: Sequence[tuple[str, str]], services: Sequence[str], ranking: Ranking) -> ModelOutcome:
        assert self.client is not None
        t0 = time.perf_counter()
        prompt = build_prompt(title=title, evidence=evidence, edges=edges, services=services, ranking=ranking,
                              catalogue=self.catalogue, max_evidence=self.settings.max_prompt_evidence,
                              max_chars=self.settings.max_prompt_chars,
                              max_hypotheses=self.settings.max_llm_hypotheses)
        prompt_s = time.perf_counter() - t0
        base = {"model": self.llm.model, "prompt_template_version": TEMPLATE_VERSION, "sampling": self.sampling,
                "prompt_s": prompt_s}
        try:
            result = self.client.complete_json(
                prompt.messages, prompt.schema, schema_name=SCHEMA_NAME, validate_with=prompt.validation_schema,
                max_tokens=self.llm.max_tokens,
                sampling={"temperature": self.llm.temperature, "top_p": self.llm.top_p, "seed": self.llm.seed})
        except CircuitOpen as e:
            LLM_CALLS.labels("circuit_open").inc()
            return ModelOutcome("circuit_open", detail=str(e), **base)
        except LlmUnavailable as e:
            self.limiter.record(incident_id, self.clock(), 0)
            LLM_CALLS.labels("unavailable").inc()
            return ModelOutcome("unavailable", detail=str(e), **base)
        except LlmInvalidOutput as e:
            self.limiter.record(incident_id, self.clock(), self.llm.max_tokens)  # assume the worst: it generated
            LLM_CALLS.labels("invalid_output").inc()
            return ModelOutcome("invalid_output", detail=str(e), **base)
        self.limiter.record(incident_id, self.clock(), result.tokens or self.llm.max_tokens)
        LLM_CALLS.labels("ok").inc()
        LLM_SECONDS.observe(result.latency_ms / 1000.0)
        hyps = tuple(parse_model_output(result.data, self.settings.max_llm_hypotheses))
        return ModelOutcome("ok", hyps, **{**base, "model": result.model or self.llm.model}, result=result,
                            detail=f"{len(hyps)} hypotheses, {result.tokens} tokens, {result.latency_ms:.0f} ms")


def episode_key(incident: IncidentUpdated) -> str:
    """What hypothesis ids (and so proposal ids) are derived from: the incident, and its episode once it re-opened.
    A re-opened incident (the same bad deploy again, an hour later) gets new hypotheses to validate and new actions
    to approve; reusing the first episode's ids would make policy and the actuator treat the new rollback as a
    replay of the one already executed."""
    return incident.incident_id if incident.episode <= 1 else f"{incident.incident_id}~{incident.episode}"


def build_records(incident: IncidentUpdated, assessment: Assessment, outcome: ModelOutcome, *,
                  catalogue_version: str, now: datetime) -> tuple[HypothesesProposed, list[ActionProposed]]:
    """The output records of one incident version (ids derived from incident id + version)."""
    key = (incident.incident_id, incident.version)
    hp = HypothesesProposed(
        event_id=stable_uuid("hypotheses", *key), incident_id=incident.incident_id,
        correlation_id=incident.correlation_id, causation_id=incident.event_id, occurred_at=now, producer=PRODUCER,
        incident_version=incident.version, outcome=assessment.outcome,  # type: ignore[arg-type]
        llm_status=outcome.status,  # type: ignore[arg-type]
        model=outcome.model, prompt_template_version=outcome.prompt_template_version,
        sampling=outcome.sampling or {}, hypotheses=list(assessment.hypotheses),
        deciding_data=list(assessment.deciding_data), evidence_sha256=incident.evidence_sha256,
        redaction_ruleset_version=incident.redaction.ruleset_version,
        dropped_proposals=list(assessment.dropped_proposals))
    actions = [ActionProposed(
        event_id=stable_uuid("proposal", *key, p.action_id), incident_id=incident.incident_id,
        correlation_id=incident.correlation_id, causation_id=hp.event_id, occurred_at=now, producer=PRODUCER,
        action_id=p.action_id, hypothesis_id=p.hypothesis_id, action_type=p.action_type, target_kind=p.target_kind,
        target=p.target, params_json=orjson.dumps(dict(p.params), option=orjson.OPT_SORT_KEYS).decode(),
        action_hash=p.action_hash, rationale=p.rationale, proposed_by=p.proposed_by,
        catalogue_version=catalogue_version, reversible=p.reversible, blast_radius=p.blast_radius,
        read_only=p.read_only) for p in assessment.proposals]
    return hp, actions


class ReasoningHandlers:
    """The service's handlers (for TransactionalProcessor: each returns the records to produce)."""

    def __init__(self, settings: Settings, model_step: ModelStep, catalogue: ActionCatalogue, *,
                 now: Callable[[], datetime] = utcnow, max_tracked: int = 100_000):
        self.settings = settings
        self.model_step = model_step
        self.catalogue = catalogue
        self.now = now
        self.max_tracked = max_tracked
        self._latest: OrderedDict[str, int] = OrderedDict()
        self.validations: OrderedDict[str, str] = OrderedDict()   # hypothesis_id -> validated | rejected
        self._published: OrderedDict[str, tuple[str, str]] = OrderedDict()  # hypothesis_id -> (incident, service)
        self.rejected: dict[str, set[str]] = {}                   # incident_id -> rejected root-cause services

    def _seen(self, incident_id: str, version: int) -> bool:
        last = self._latest.get(incident_id)
        if last is not None and version <= last:
            return True
        self._latest[incident_id] = version
        self._latest.move_to_end(incident_id)
        while len(self._latest) > self.max_tracked:
            self._latest.popitem(last=False)
        return False

    def on_incident(self, incident: IncidentUpdated, ctx: MessageContext | None = None) -> list[Output]:
        """Hypotheses (and proposals) for a new incident version; [] for stale/replayed versions and resolutions."""
        if self._seen(incident.incident_id, incident.version):
            HANDLED.labels("stale").inc()
            log.info("skipping stale incident version", extra={"incident_id": incident.incident_id,
                                                                 "version": incident.version})
            return []
        if incident.state == "resolved":
            HANDLED.labels("resolved").inc()
            return []
        hp, actions, _ = self.reason(incident)
        HANDLED.labels(hp.outcome).inc()
        log.info("hypotheses", extra={"incident_id": incident.incident_id, "version": incident.version,
                                      "outcome": hp.outcome, "llm_status": hp.llm_status,
                                      "hypotheses": len(hp.hypotheses), "proposals": len(actions)})
        return [Output(hp, key=incident.incident_id, topic=self.settings.topic_hypotheses)] + \
            [Output(a, key=incident.incident_id, topic=self.settings.topic_proposals) for a in actions]

    def reason(self, incident: IncidentUpdated) -> tuple[HypothesesProposed, list[ActionProposed], ModelOutcome]:
        """Engine ranking → model step → checks → records."""
        t0 = time.perf_counter()
        edges = [(e.caller, e.callee) for e in incident.dependency_edges]
        services = sorted(set(incident.services) | {incident.primary_service})
        ranking = rank_root_causes(incident.evidence, edges, services=services,
                                   config=replace(DEFAULT_CONFIG, max_candidates=64))
        t1 = time.perf_counter()
        outcome = self.model_step.run(incident.incident_id, title=incident.title, evidence=incident.evidence,
                                      edges=edges, services=services, ranking=ranking,
                                      redaction_scanned=incident.redaction.scanned)
        t2 = time.perf_counter()
        if outcome.status not in ("ok", "disabled"):
            log.warning("model step gave no hypotheses; engine only",
                        extra={"incident_id": incident.incident_id, "llm_status": outcome.status,
                               "detail": outcome.detail})
        assessment = assess(f"{episode_key(incident)}#{incident.version}", incident.evidence, edges, services,
                            self.catalogue, model=outcome.hypotheses, model_name=outcome.model,
                            engine_hypotheses=self.settings.engine_hypotheses,
                            support_bar=self.settings.support_bar, ranking=ranking,
                            rejected=frozenset(self.rejected.get(incident.incident_id, ())))
        hp, actions = build_records(incident, assessment, outcome, catalogue_version=self.catalogue.revision,
                                    now=self.now())
        for h in hp.hypotheses:
            self._published[h.hypothesis_id] = (incident.incident_id, h.root_cause_service)
        while len(self._published) > self.max_tracked:
            self._published.popitem(last=False)
        t3 = time.perf_counter()
        OVERHEAD_SECONDS.observe((t1 - t0) + outcome.prompt_s + (t3 - t2))
        return hp, actions, outcome

    def on_validation(self, record: HypothesisValidated, ctx: MessageContext | None = None) -> list[Output]:
        """Remember a human's gate-1 verdict (policy enforces it; reasoning produces nothing for it). A rejected
        root cause is refuted in the incident's later versions (re-ranked last, no proposals)."""
        self.validations[record.hypothesis_id] = record.verdict
        known = self._published.get(record.hypothesis_id)
        if known is not None and known[0] == record.incident_id:
            services = self.rejected.setdefault(record.incident_id, set())
            if record.verdict == "rejected":
                services.add(known[1])
            else:
                services.discard(known[1])
        while len(self.validations) > self.max_tracked:
            self.validations.popitem(last=False)
        log.info("hypothesis verdict", extra={"incident_id": record.incident_id,
                                              "hypothesis_id": record.hypothesis_id, "verdict": record.verdict})
        return []
