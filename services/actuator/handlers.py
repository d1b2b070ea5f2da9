"""One handler per consumed record (ApprovalRequested, ActionAuthorized, KillSwitchChanged), plus the two follow-up
steps that run on their own (recovery of interrupted executions, verification + rollback).

Every handler is idempotent on the record's position: it checks and moves the Postgres ``consumed`` offset in the
same transaction as its decision, so a redelivered record after a crash changes nothing. Outputs are never produced
directly: they go into the outbox in that transaction, and the relay publishes them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import Counter, Histogram

from pilothouse.actuator.adapters.postgres import Store, Tx
from pilothouse.actuator.domain import (
    Accepted,
    CheckResult,
    ClockReading,
    KillSwitches,
    Refused,
    check_authorization,
    decide_verification,
    evaluate_window,
    in_sampling_half,
    parse_params,
    verification_due,
)
from pilothouse.actuator.executors import (
    Execution,
    Executor,
    ExecutorRegistry,
    Observation,
    Precheck,
    ShadowResult,
    TargetRefusedCall,
)
from pilothouse.bus.actions import ActionCatalogue, ActionRejected, action_hash
from pilothouse.bus.attestation import HumanKeyRegistry, kill_switch_refusal
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.errors import PermanentError, PilothouseError, RetryableError
from pilothouse.bus.records import (
    ActionAuthorized,
    ActionExecuted,
    ActionVerified,
    ApprovalRequested,
    AvroRecord,
    KillSwitchChanged,
    ShadowRunCompleted,
    VerificationCheck,
)

log = logging.getLogger("pilothouse.actuator")

OUTCOMES = Counter("pilothouse_actuator_executions_total", "Authorizations handled, by outcome", ["outcome"])
VERIFICATIONS = Counter("pilothouse_actuator_verifications_total", "Verifications, by outcome", ["outcome"])
SHADOWS = Counter("pilothouse_actuator_shadow_runs_total", "Shadow runs, by outcome", ["outcome"])
AUTH_TO_EXEC = Histogram("pilothouse_actuator_authorization_to_execution_seconds",
                         "From the authorization's issued_at to the target's answer",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

PRODUCER = "actuator"


@dataclass(frozen=True)
class Topics:
    shadow: str
    executions: str
    verifications: str


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class KillSwitchGate:
    """Fail closed at start-up: no execution until this process has read the kill-switch topic to its end once.

    Without it, an actuator starting on an empty database would execute before it learned that a switch is engaged.
    ``consumer`` is the kill-switch loop's consumer (its own group per instance, so it is assigned every partition).
    Caught up means, per partition: empty, or handled up to the high watermark (the Postgres offset), or the consumer
    positioned past it (the last records may be transaction markers, which are never handed to a handler).
    The consumer is only touched from the kill-switch loop's own thread (:meth:`run`): librdkafka calls from another
    thread were seen to block until that thread's poll loop ended.
    """

    def __init__(self, store: Store, loop: Any, topic: str):
        self.store = store
        self.loop = loop
        self.consumer = loop.raw
        self.topic = topic
        self._ready = threading.Event()
        self._stop = threading.Event()

    def ready(self) -> bool:
        """True once the kill-switch state has been loaded (then for good: later switches apply as they arrive)."""
        return self._ready.is_set()

    def run(self) -> None:
        """The kill-switch worker: consume until idle for 0.5 s, check whether caught up, repeat until stop()."""
        while not self._stop.is_set():
            self.loop.run(idle_timeout_s=0.5)
            if not self._ready.is_set() and not self._stop.is_set():
                try:
                    self.refresh()
                except PilothouseError as e:
                    log.warning("kill-switch catch-up check failed", extra={"error": str(e)[:300]})

    def stop(self) -> None:
        self._stop.set()
        self.loop.stop()

    def refresh(self) -> bool:
        assignment = [tp for tp in self.consumer.assignment() if tp.topic == self.topic]
        if not assignment:
            return False
        with self.store.transaction() as tx:
            handled = tx.consumed_offsets(self.topic)
        positions = {tp.partition: tp.offset for tp in self.consumer.position(assignment)}
        # After a restart with nothing new to read, the fetch position stays unset until a record arrives: the
        # group's committed offset (stored only after handling) then says how far this instance has read.
        committed = {tp.partition: tp.offset for tp in self.consumer.committed(assignment, timeout=5.0)}
        for tp in assignment:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            if (high <= low or handled.get(tp.partition, -1) >= high or positions.get(tp.partition, -1) >= high
                    or committed.get(tp.partition, -1) >= high):
                continue
            return False
        self._ready.set()
        log.info("kill-switch state loaded", extra={"topic": self.topic})
        return True


class KillSwitchNotLoaded(RetryableError):
    """The kill-switch topic has not been read to its end yet: executions wait (fail closed)."""


class ActuatorHandlers:
    """The actuator's decisions wired to its ports (store, executors, keys, clock)."""

    def __init__(
        self,
        *,
        store: Store,
        registry: ExecutorRegistry,
        catalogue: ActionCatalogue,
        keys: dict[str, Ed25519PublicKey],
        topics: Topics,
        max_skew_s: float = 5.0,
        shadow_horizon_s: int = 120,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
        stale_s: float = 30.0,
        gate: KillSwitchGate | None = None,
        humans: Callable[[], HumanKeyRegistry] = lambda: HumanKeyRegistry({}, source="<none configured>"),
    ):
        self.store = store
        self.registry = registry
        self.catalogue = catalogue
        self.keys = dict(keys)
        self.topics = topics
        self.max_skew_s = max_skew_s
        self.shadow_horizon_s = shadow_horizon_s
        self.clock = clock
        self.owner = owner or f"run-{uuid.uuid4().hex[:12]}"  # this process: rows of other runs are recovered
        self.stale_s = stale_s
        self.gate = gate
        self.humans = humans  # enrolled human keys: a kill-switch release needs an admin's signature

    # ---- outbox ------------------------------------------------------------------------------------------------
    def _enqueue(self, tx: Tx, topic: str, key: str, record: AvroRecord) -> None:
        tx.enqueue(topic, key, type(record).AVRO_NAME, record.event_id, record.model_dump(mode="json"))

    # ---- kill switch -------------------------------------------------------------------------------------------
    def on_kill_switch(self, rec: KillSwitchChanged, ctx: MessageContext) -> None:
        """Remember the scope's state (the topic is compacted: the latest record per scope is the truth)."""
        scope = rec.scope.strip()
        with self.store.transaction() as tx:
            if tx.consumed(ctx.topic, ctx.partition, ctx.offset):
                return
            refused = kill_switch_refusal(self.humans(), rec, self.clock())
            if refused is not None:
                # Not applied, loudly: the switch stays as it was (engaged stays engaged).
                log.error("kill switch change ignored", extra={"scope": scope[:200], "event_id": rec.event_id,
                                                               "reason": refused[:500]})
            elif scope == "global" or (scope.startswith("service:") and len(scope) > len("service:")):
                tx.set_kill_switch(scope, rec.engaged, rec.changed_by, rec.reason, rec.event_id, rec.occurred_at)
                log.warning("kill switch changed", extra={"scope": scope, "engaged": rec.engaged,
                                                          "changed_by": rec.changed_by, "event_id": rec.event_id})
            else:
                # Dropped, loudly: an unknown scope cannot be applied (it would block nothing or everything).
                log.error("kill switch record with an unknown scope ignored",
                          extra={"scope": scope[:200], "event_id": rec.event_id})
            tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)

    # ---- shadow runs -------------------------------------------------------------------------------------------
    def on_approval_requested(self, rec: ApprovalRequested, ctx: MessageContext) -> None:
        """Shadow-run a pending action once and publish ShadowRunCompleted for the approvers."""
        with self.store.transaction() as tx:
            if tx.consumed(ctx.topic, ctx.partition, ctx.offset):
                return
            if tx.shadow_done(rec.action_id):  # an updated request (more approvals) for an action already shadowed
                tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)
                return
        executor, result = self._shadow(rec)
        out = ShadowRunCompleted(
            event_id=str(uuid.uuid4()), incident_id=rec.incident_id, correlation_id=rec.correlation_id,
            causation_id=rec.event_id, occurred_at=self.clock(), producer=PRODUCER, action_id=rec.action_id,
            action_hash=rec.action_hash, executor=executor, outcome=result.outcome, summary=result.summary[:2000],
            prediction_json=orjson.dumps(result.prediction).decode(), slo_met_after=result.slo_met_after,
            dry_run_response=result.dry_run_response[:8000])
        with self.store.transaction() as tx:
            if tx.consumed(ctx.topic, ctx.partition, ctx.offset):
                return
            if tx.record_shadow(rec.action_id, out.event_id, out.outcome):
                self._enqueue(tx, self.topics.shadow, rec.action_id, out)
            tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)
        SHADOWS.labels(out.outcome).inc()
        log.info("shadow run", extra={"action_id": rec.action_id, "outcome": out.outcome, "executor": executor})

    def _shadow(self, rec: ApprovalRequested) -> tuple[str, ShadowResult]:
        try:
            params = parse_params(rec.params_json)
            action = self.catalogue.check(rec.action_type, rec.target_kind, params)
            if action_hash(rec.action_type, rec.target_kind, rec.target, params) != rec.action_hash:
                return "", ShadowResult("error", "action_hash does not match the action: not shadow-run")
        except (Refused, ActionRejected) as e:
            return "", ShadowResult("error", f"not a valid catalogue action: {e}")
        executor = self.registry.for_action(action.name)
        if executor is None:
            return "", ShadowResult("unsupported", f"no executor runs {action.name}")
        try:
            return executor.name, executor.shadow(action, params, self.shadow_horizon_s)
        except RetryableError as e:
            return executor.name, ShadowResult("error", f"target unavailable: {e}")
        except PermanentError as e:
            return executor.name, ShadowResult("error", str(e))

    # ---- authorizations ----------------------------------------------------------------------------------------
    def _clock_reading(self, tx: Tx) -> ClockReading:
        before = self.clock()
        ref = tx.db_now()
        return ClockReading(before, ref, self.clock())

    def _replay(self, tx: Tx, rec: ActionAuthorized) -> Refused | None:
        seen = tx.authorization(rec.authorization_id)
        if seen is not None:
            return Refused("replay", f"authorization {rec.authorization_id} was already {seen['outcome']} "
                                     f"(first seen as event {seen['event_id']})")
        done = tx.execution(rec.action_id)
        if done is not None:
            return Refused("replay", f"action {rec.action_id} already has execution {done['execution_id']} "
                                     f"({done['status']}) under authorization {done['authorization_id']}")
        return None

    def _checked(self, tx: Tx, rec: ActionAuthorized) -> Accepted | Refused:
        replay = self._replay(tx, rec)
        if replay is not None:
            return replay
        try:
            reading = self._clock_reading(tx)
            return check_authorization(rec, catalogue=self.catalogue, keys=self.keys, now=reading.local_after,
                                       clock=reading, max_skew_s=self.max_skew_s,
                                       kill_switches=KillSwitches(tx.engaged_scopes()))
        except Refused as e:
            return e

    def _refuse(self, tx: Tx, rec: ActionAuthorized, why: Refused, ctx: MessageContext | None) -> None:
        now = self.clock()
        if why.check != "replay":
            tx.record_authorization(rec.authorization_id, rec.action_id, rec.event_id, "refused", str(why))
        out = ActionExecuted(
            event_id=str(uuid.uuid4()), incident_id=rec.incident_id, correlation_id=rec.correlation_id,
            causation_id=rec.event_id, occurred_at=now, producer=PRODUCER, execution_id=str(uuid.uuid4()),
            action_id=rec.action_id, authorization_id=rec.authorization_id, action_hash=rec.action_hash,
            outcome="refused", reason=f"{why.check}: {why.reason}"[:2000], executor="", started_at=now,
            finished_at=now, result_json=orjson.dumps({"refused": why.check}).decode())
        self._enqueue(tx, self.topics.executions, rec.action_id, out)
        if ctx is not None:
            tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)
        OUTCOMES.labels("refused").inc()
        log.warning("authorization refused", extra={"action_id": rec.action_id, "check": why.check,
                                                    "reason": why.reason[:300],
                                                    "authorization_id": rec.authorization_id})

    def on_action_authorized(self, rec: ActionAuthorized, ctx: MessageContext) -> None:
        """Check, re-check against the live target, record the intent, execute once, record the answer."""
        if self.gate is not None and not self.gate.ready():
            raise KillSwitchNotLoaded("the kill-switch topic has not been read to its end yet; waiting")
        with self.store.transaction() as tx:
            if tx.consumed(ctx.topic, ctx.partition, ctx.offset):
                return
            seen = tx.authorization(rec.authorization_id)
            if seen is not None and seen["event_id"] == rec.event_id:
                # The same event delivered again (e.g. re-published by policy): deduplicated, nothing to say.
                tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)
                return
            first = self._checked(tx, rec)
            if isinstance(first, Refused):
                self._refuse(tx, rec, first, ctx)
                return
        executor = self.registry.for_action(first.action.name)
        if executor is None:
            pre = Precheck(False, "executor", f"no executor runs {first.action.name}")
        else:
            try:
                pre = executor.precheck(first.action, first.params, rec.action_id)
            except TargetRefusedCall as e:
                pre = Precheck(False, "target", str(e))
            # RetryableError (target unreachable) propagates: nothing was written, the record is handled again.
        with self.store.transaction() as tx:
            if tx.consumed(ctx.topic, ctx.partition, ctx.offset):
                return
            # Again, inside the transaction that records the intent: a kill switch engaged or the authorization
            # expired while the target was being asked wins.
            second = self._checked(tx, rec)
            if isinstance(second, Accepted) and not pre.ok:
                second = Refused("precondition", f"{pre.check}: {pre.reason}".strip(": "))
            if isinstance(second, Refused):
                self._refuse(tx, rec, second, ctx)
                return
            assert executor is not None
            row = {
                "action_id": rec.action_id, "execution_id": str(uuid.uuid4()),
                "authorization_id": rec.authorization_id, "event_id": rec.event_id, "incident_id": rec.incident_id,
                "correlation_id": rec.correlation_id, "action_hash": rec.action_hash, "action_type": rec.action_type,
                "target_kind": rec.target_kind, "target": rec.target, "params": second.params,
                "executor": executor.name, "owner": self.owner, "authorized_at": rec.issued_at,
            }
            if not tx.insert_intent(row):  # lost a race with another instance for this action id
                self._refuse(tx, rec, Refused("replay", f"action {rec.action_id} is already executing"), ctx)
                return
            tx.record_authorization(rec.authorization_id, rec.action_id, rec.event_id, "accepted")
            tx.mark_consumed(ctx.topic, ctx.partition, ctx.offset)
        self.drive(row)

    def drive(self, row: dict[str, Any]) -> bool:
        """Call the target for a recorded intent (key = action id) and record its answer. False: try again later."""
        action = self.catalogue.get(row["action_type"])
        executor: Executor | None = self.registry.by_name(row["executor"]) or self.registry.for_action(action.name)
        started = self.clock()
        try:
            if executor is None:
                raise TargetRefusedCall(f"executor {row['executor']!r} is no longer configured")
            ex = executor.execute(action, row["params"], row["action_id"])
        except RetryableError as e:
            with self.store.transaction() as tx:
                tx.note_attempt(row["action_id"], str(e))
            log.warning("execution not confirmed, will retry with the same key",
                        extra={"action_id": row["action_id"], "error": str(e)[:300]})
            return False
        except PermanentError as e:
            ex = Execution(applied=False, ok=False, replayed=False, response={"error": str(e)}, reason=str(e),
                           target_time_s=time.time())
        now = self.clock()
        status = "executed" if ex.ok else "failed"
        reason = ex.reason if not ex.ok else ("answered from the target's idempotency journal" if ex.replayed else "")
        out = ActionExecuted(
            event_id=str(uuid.uuid4()), incident_id=row["incident_id"], correlation_id=row["correlation_id"],
            causation_id=row["event_id"], occurred_at=now, producer=PRODUCER, execution_id=row["execution_id"],
            action_id=row["action_id"], authorization_id=row["authorization_id"], action_hash=row["action_hash"],
            outcome=status, reason=reason[:2000], executor=executor.name if executor else row["executor"],
            started_at=started, finished_at=now, result_json=orjson.dumps(ex.response).decode())
        with self.store.transaction() as tx:
            if not tx.finish_execution(row["action_id"], status, {**ex.response, "_replayed": ex.replayed},
                                       ex.target_time_s, verify=ex.ok):
                return True  # another worker recorded it first
            self._enqueue(tx, self.topics.executions, row["action_id"], out)
        OUTCOMES.labels(status).inc()
        authorized_at = row.get("authorized_at")
        if isinstance(authorized_at, datetime):
            AUTH_TO_EXEC.observe(max(0.0, (now - authorized_at).total_seconds()))
        log.info("action executed" if ex.ok else "action failed on the target",
                 extra={"action_id": row["action_id"], "replayed": ex.replayed, "reason": reason[:300]})
        return True

    def recover_once(self) -> int:
        """Drive ``started`` rows left by a crashed run (or stuck on an unreachable target). Returns how many."""
        done = 0
        with self.store.transaction() as tx:
            rows = tx.claim_open_executions(self.owner, self.stale_s)
            for row in rows:  # locked until this transaction ends; drive() nests savepoints inside it
                if self.drive(row):
                    done += 1
        if done:
            log.info("recovered interrupted executions", extra={"count": done})
        return done

    # ---- verification ------------------------------------------------------------------------------------------
    def verify_once(self) -> int:
        """Verify executions whose window has passed (rolling back failures); returns how many were finished."""
        with self.store.transaction() as tx:
            rows = tx.claim_verifications()
            switches = KillSwitches(tx.engaged_scopes())
        observations: dict[str, Observation | None] = {}
        finished = 0
        for row in rows:
            try:
                if self._verify(row, switches, observations):
                    finished += 1
            except RetryableError as e:
                log.warning("verification postponed", extra={"action_id": row["action_id"], "error": str(e)[:300]})
        return finished

    def _observe(self, executor: Executor, cache: dict[str, Observation | None]) -> Observation | None:
        if executor.name not in cache:
            cache[executor.name] = executor.observe()
        return cache[executor.name]

    def _verify(self, row: dict[str, Any], switches: KillSwitches, cache: dict[str, Observation | None]) -> bool:
        action = self.catalogue.get(row["action_type"])
        params = row["params"]
        before = (row.get("response") or {}).get("before") or {}
        executor = self.registry.by_name(row["executor"]) or self.registry.for_action(action.name)
        window = action.verify.window_s
        if row["verify_status"] == "rolling_back":  # a rollback was decided before a crash: finish it (same key)
            checks = [CheckResult(**c) for c in row["verify_checks"] or []]
            return self._roll_back(row, action.name, executor, checks, row["rollback"], window)
        if not action.verify.checks:
            return self._finish_verification(row, "skipped", [], window, "the catalogue defines no checks")
        obs = self._observe(executor, cache) if executor else None
        if obs is None:
            return self._finish_verification(row, "skipped", [], window, "the target cannot be observed")
        executed_at = row["target_time_s"] or 0.0
        state = obs.services.get(str(params.get("service")))
        if not verification_due(executed_at, window, obs.time_s):
            if in_sampling_half(executed_at, window, obs.time_s):
                with self.store.transaction() as tx:
                    # Scalars only (metrics, slo): instance lists and deploy history are not needed.
                    slim = {k: v for k, v in state.items() if not isinstance(v, list)} if state else None
                    tx.add_verify_sample(row["action_id"], {"t": obs.time_s, "state": slim})
            return False
        samples = [s["state"] for s in row.get("verify_samples") or []
                   if in_sampling_half(executed_at, window, s["t"])]
        checks = evaluate_window(action.verify, [*samples, state])
        decision = decide_verification(action, params, before, checks, switches)
        if decision.outcome != "roll_back":
            return self._finish_verification(row, decision.outcome, checks, window, decision.detail)
        assert decision.rollback is not None
        plan = {"action": decision.rollback.action, "params": decision.rollback.params, "detail": decision.detail}
        with self.store.transaction() as tx:  # the decision is durable before the target is called
            tx.start_rollback(row["action_id"], [c.__dict__ for c in checks], plan)
        return self._roll_back(row, action.name, executor, checks, plan, window)

    def _roll_back(self, row: dict[str, Any], name: str, executor: Executor | None, checks: list[CheckResult],
                   plan: dict[str, Any], window: int) -> bool:
        rollback_action = self.catalogue.get(plan["action"])
        if executor is None:
            return self._finish_verification(row, "rollback_failed", checks, window, "no executor for the rollback")
        try:
            ex = executor.execute(rollback_action, plan["params"], f"{row['action_id']}/rollback")
        except PermanentError as e:
            ex = Execution(applied=False, ok=False, replayed=False, response={"error": str(e)}, reason=str(e))
        # RetryableError propagates: the row stays rolling_back and the next pass calls again with the same key.
        detail = f"{plan.get('detail', '')}; rolled back with {plan['action']} {orjson.dumps(plan['params']).decode()}"
        if not ex.ok:
            detail = f"{plan.get('detail', '')}; rollback {plan['action']} failed: {ex.reason}"
        record = {**plan, "ok": ex.ok, "response": ex.response}
        return self._finish_verification(row, "rolled_back" if ex.ok else "rollback_failed", checks, window,
                                         detail, rollback=record)

    def _finish_verification(self, row: dict[str, Any], outcome: str, checks: list[CheckResult], window: int,
                             detail: str, rollback: dict[str, Any] | None = None) -> bool:
        out = ActionVerified(
            event_id=str(uuid.uuid4()), incident_id=row["incident_id"], correlation_id=row["correlation_id"],
            causation_id=row["event_id"], occurred_at=self.clock(), producer=PRODUCER, action_id=row["action_id"],
            execution_id=row["execution_id"], outcome=outcome,
            checks=[VerificationCheck(name=c.name, passed=c.passed, observed=c.observed, threshold=c.threshold,
                                      detail=c.detail[:500]) for c in checks],
            rolled_back=outcome == "rolled_back", window_s=window, detail=detail.strip("; ")[:2000])
        with self.store.transaction() as tx:
            if not tx.finish_verification(row["action_id"], [c.__dict__ for c in checks], rollback):
                return False
            self._enqueue(tx, self.topics.verifications, row["action_id"], out)
        VERIFICATIONS.labels(outcome).inc()
        log.info("verification", extra={"action_id": row["action_id"], "outcome": outcome, "detail": detail[:300]})
        return True
