"""Records the console's upstream services would produce for one incident, with uuid ids (tests never collide).

Used by the console's unit, integration and browser tests: the tests play sensing, reasoning, policy and the actuator
by producing these records. The content mirrors the demo: checkout's error rate rises after a deploy, the top
hypothesis blames the deploy, the proposed mitigation is a rollback that needs two approvers.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pilothouse.bus.actions import action_hash
from pilothouse.bus.records import (
    ActionAuthorized,
    ActionExecuted,
    ActionProposed,
    ActionVerified,
    AlertReceived,
    AlertsReceived,
    ApprovalRequested,
    Claim,
    DroppedClaim,
    Evidence,
    HypothesesProposed,
    Hypothesis,
    IncidentUpdated,
    Prediction,
    RedactionFinding,
    RedactionManifest,
    ShadowRunCompleted,
    VerificationCheck,
)


def _id() -> str:
    return str(uuid.uuid4())


@dataclass
class World:
    """One incident's story; ``now`` anchors every timestamp."""

    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))
    incident_id: str = field(default_factory=_id)
    action_id: str = field(default_factory=_id)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    proposed_by: str = "reasoning"
    approvers_needed: int = 2
    expires_in: timedelta = timedelta(minutes=15)

    def __post_init__(self) -> None:
        self.correlation_id = self.incident_id
        self.h1 = f"hyp-{self.tag}-1"
        self.h2 = f"hyp-{self.tag}-2"
        self.ev_err = f"ev-{self.tag}-err"
        self.ev_deploy = f"ev-{self.tag}-deploy"
        self.ev_log = f"ev-{self.tag}-log"
        self.params = {"service": "checkout", "to_version": "v41"}
        self.action_type, self.target_kind, self.target = "rollback_deploy", "service", "checkout"
        self.hash = action_hash(self.action_type, self.target_kind, self.target, self.params)
        self.events: dict[str, str] = {}

    def _env(self, name: str, minutes: float = 0) -> dict:
        eid = _id()
        self.events[name] = eid
        return {"event_id": eid, "incident_id": self.incident_id, "correlation_id": self.correlation_id,
                "occurred_at": self.now + timedelta(minutes=minutes)}

    def alert(self) -> AlertsReceived:
        """A request's alerts as the gateway writes them: one AlertsReceived holding the alert."""
        env = self._env("alerts", -6)
        return AlertsReceived(**env, alerts=[self._alert()])

    def _alert(self) -> AlertReceived:
        return AlertReceived(
            **self._env("alert", -6), source="alertmanager", fingerprint=f"fp-{self.tag}", status="firing",
            severity="critical", service="checkout", summary="checkout 5xx ratio 12% (SLO 1%) for user <PERSON_3f2a>",
            labels={"alertname": "CheckoutErrors"}, starts_at=self.now - timedelta(minutes=6),
            received_at=self.now - timedelta(minutes=6),
            redaction=RedactionManifest(ruleset_version="r1", scanned=True,
                                        findings=[RedactionFinding(kind="person", count=1)],
                                        redacted_fields=["summary"]))

    def incident(self, version: int = 1, title: str | None = None) -> IncidentUpdated:
        ev = [
            Evidence(evidence_id=self.ev_err, kind="metric_anomaly", service="checkout", signal="error_ratio",
                     summary="error ratio 0.4% -> 12.1% at onset", direction="up", score=0.93,
                     onset_ms=int((self.now - timedelta(minutes=7)).timestamp() * 1000), baseline=0.004,
                     observed=0.121, source_link="http://127.0.0.1:9090/graph?g0.expr=error_ratio"),
            Evidence(evidence_id=self.ev_deploy, kind="change_event", service="checkout", signal="deploy",
                     summary="checkout v42 deployed 1 min before onset by <PSEUDONYM_ab12>", direction="none",
                     score=0.88, onset_ms=int((self.now - timedelta(minutes=8)).timestamp() * 1000),
                     source_link="https://ci.example.test/deploys/checkout/v42"),
            Evidence(evidence_id=self.ev_log, kind="log_burst", service="checkout", signal="NullPointerException",
                     summary="burst of NullPointerException in PaymentAdapter (token=[REDACTED:api_key])",
                     direction="up", score=0.71, source_link="javascript:alert(1)"),
        ]
        return IncidentUpdated(
            **self._env(f"incident-v{version}", -5), version=version, change="opened" if version == 1 else "updated",
            state="open", title=title or f"checkout errors after deploy ({self.tag})", severity="critical",
            primary_service="checkout", services=["checkout", "payments"], alert_fingerprints=[f"fp-{self.tag}"],
            alert_count=1, first_seen=self.now - timedelta(minutes=6), last_seen=self.now - timedelta(minutes=1),
            evidence=ev, redaction=RedactionManifest(ruleset_version="r1", scanned=True,
                                                     findings=[RedactionFinding(kind="api_key", count=1)]))

    def hypotheses(self) -> HypothesesProposed:
        h1 = Hypothesis(
            hypothesis_id=self.h1, rank=1, origin="llm", root_cause_service="checkout", fault_kind="bad_deploy",
            summary="The v42 deploy of checkout introduced a null dereference in PaymentAdapter.",
            status="supported", confidence=0.82,
            claims=[Claim(claim_id="c1", text="Errors started within a minute of the v42 deploy", kind="temporal",
                          service="checkout", evidence_ids=[self.ev_deploy, self.ev_err], verified=True),
                    Claim(claim_id="c2", text="The new errors are NullPointerExceptions in PaymentAdapter",
                          kind="log", service="checkout", evidence_ids=[self.ev_log], verified=True)],
            predictions=[Prediction(prediction_id="p1", kind="counterfactual",
                                    description="instances still on v41 show no error increase", verdict="holds",
                                    detail="v41 canary error ratio 0.3%"),
                         Prediction(prediction_id="p2", kind="counterfactual",
                                    description="payments' own error ratio is flat", verdict="holds")],
            dropped_claims=[DroppedClaim(text="Database latency rose at the same time", evidence_ids=["ev-none"],
                                         reason="cites evidence that does not exist")])
        h2 = Hypothesis(
            hypothesis_id=self.h2, rank=2, origin="deterministic", root_cause_service="payments",
            fault_kind="dependency_failure", summary="payments is failing and checkout propagates its errors.",
            status="inconclusive", confidence=0.21,
            claims=[Claim(claim_id="c3", text="checkout calls payments", kind="topology", service="payments",
                          evidence_ids=[self.ev_err])],
            predictions=[Prediction(prediction_id="p3", kind="counterfactual",
                                    description="payments error ratio rises before checkout's", verdict="unknown",
                                    detail="no payments error metric in the window")])
        return HypothesesProposed(**self._env("hypotheses", -4), incident_version=1, outcome="supported",
                                  llm_status="ok", model="qwen2.5-7b-instruct", hypotheses=[h1, h2],
                                  deciding_data=["payments error ratio per minute"])

    def proposal(self) -> ActionProposed:
        return ActionProposed(**self._env("proposal", -3), action_id=self.action_id, hypothesis_id=self.h1,
                              action_type=self.action_type, target_kind=self.target_kind, target=self.target,
                              params_json=json.dumps(self.params), action_hash=self.hash,
                              rationale="Roll back the deploy that the top hypothesis blames.",
                              proposed_by=self.proposed_by, catalogue_version="3", reversible=True,
                              blast_radius="high", read_only=False)

    def pending(self, approved_by: list[str] | tuple[str, ...] = (), validated_by: str = "",
                minutes: float = -2) -> ApprovalRequested:
        return ApprovalRequested(
            **self._env(f"pending-{len(approved_by)}", minutes), action_id=self.action_id, decision_id=_id(),
            hypothesis_id=self.h1, action_type=self.action_type, target_kind=self.target_kind, target=self.target,
            params_json=json.dumps(self.params), action_hash=self.hash, proposed_by=self.proposed_by,
            validated_by=validated_by, approvers_needed=self.approvers_needed, approver_roles=["approver", "admin"],
            approved_by=list(approved_by),
            reasons=["high_blast_radius: rollback_deploy has blast radius high: two approvers",
                     "production: checkout runs in production"],
            risk_score=9.0, budget_remaining=22.0, budget_window="checkout/24h",
            expires_at=self.now + self.expires_in, bundle_revision="2026.11.25-1")

    def shadow(self) -> ShadowRunCompleted:
        return ShadowRunCompleted(
            **self._env("shadow", -1.5), action_id=self.action_id, action_hash=self.hash, executor="fleet-sim",
            outcome="predicted", summary="predicted: error ratio 12.1% -> 0.5% within 90 s; SLO met",
            prediction_json=json.dumps({"error_ratio_after": 0.005, "p99_ms_after": 240, "seconds_to_recover": 90}),
            slo_met_after=True)

    def authorized(self, approval_ids: list[str]) -> ActionAuthorized:
        env = self._env("authorized", 1)
        return ActionAuthorized(
            **env, authorization_id=_id(), action_id=self.action_id, action_hash=self.hash,
            action_type=self.action_type, target_kind=self.target_kind, target=self.target,
            params_json=json.dumps(self.params), decision_id=_id(), bundle_revision="2026.11.25-1",
            input_sha256="0" * 64, approval_ids=approval_ids, issued_at=env["occurred_at"],
            expires_at=env["occurred_at"] + timedelta(minutes=5), key_id="test-key", signature="c2ln")

    def executed(self) -> ActionExecuted:
        env = self._env("executed", 2)
        return ActionExecuted(**env, execution_id=f"exe-{self.tag}", action_id=self.action_id,
                              authorization_id=_id(), action_hash=self.hash, outcome="executed", executor="fleet",
                              started_at=env["occurred_at"] - timedelta(seconds=5), finished_at=env["occurred_at"])

    def verified(self) -> ActionVerified:
        return ActionVerified(**self._env("verified", 3), action_id=self.action_id, execution_id=f"exe-{self.tag}",
                              outcome="verified", window_s=60,
                              checks=[VerificationCheck(name="error_ratio_below_slo", passed=True, observed=0.004,
                                                        threshold=0.01)],
                              detail="error ratio back under the SLO")

    def upstream(self) -> list:
        """Everything before the first approval, in the order the services would produce it."""
        return [self.alert(), self.incident(), self.hypotheses(), self.proposal(), self.pending(), self.shadow()]
