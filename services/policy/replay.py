"""``pilothouse policy replay [--since T]``: re-evaluate past decisions' inputs against the policy OPA serves now.

For a policy author: edit policies/, let OPA reload them (``opa run --watch``), then replay. Every past
``PolicyDecided`` carries the exact input document (``input_json``) and its SHA-256; each is evaluated again and the
differences are printed: outcome (allowed → denied ...), approvers needed, reason codes added or removed. Sources:

* ``kafka`` — the decisions topic (read from the start with a throw-away consumer group, nothing committed);
* ``postgres`` — the policy service's own record of its outputs (``<schema>.processed``);
* ``ledger`` — the ledger's Postgres mirror (``<schema>.ledger_entries``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from pilothouse.bus.errors import PilothouseError
from pilothouse.bus.records import PolicyDecided
from pilothouse.policy.domain import (
    PolicyEngineUnavailable,
    PolicyInputInvalid,
    parse_policy_input,
    service_stage_and_outcome,
    sha256_hex,
)

#: What each published outcome means for the action, for the "allowed → denied" summary.
_MEANING = {"auto_allowed": "allowed", "authorized": "allowed", "pending_approval": "needs approval",
            "waiting": "waiting", "denied": "denied"}


@dataclass
class Replayed:
    """One past decision and what the current policy says about the same input."""

    decision_id: str
    action_id: str
    occurred_at: str
    stage: str
    before: str
    after: str
    approvers_before: int
    approvers_after: int
    codes_added: list[str] = field(default_factory=list)
    codes_removed: list[str] = field(default_factory=list)
    bundle_before: str = ""
    bundle_after: str = ""
    error: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.error) or self.before != self.after or self.approvers_before != self.approvers_after \
            or bool(self.codes_added or self.codes_removed)

    def line(self) -> str:
        if self.error:
            return f"{self.occurred_at} {self.action_id} [{self.stage}] NOT REPLAYED: {self.error}"
        parts = []
        if self.before != self.after:
            parts.append(f"{self.before} -> {self.after} ({_MEANING.get(self.before, self.before)} -> "
                         f"{_MEANING.get(self.after, self.after)})")
        if self.approvers_before != self.approvers_after:
            parts.append(f"approvers {self.approvers_before} -> {self.approvers_after}")
        if self.codes_added:
            parts.append("+" + ",+".join(self.codes_added))
        if self.codes_removed:
            parts.append("-" + ",-".join(self.codes_removed))
        return f"{self.occurred_at} {self.action_id} [{self.stage}] " + ("; ".join(parts) or "unchanged")


def _codes(reasons: Iterable[str]) -> set[str]:
    return {r.split(":", 1)[0] for r in reasons if ":" in r}


def replay_one(engine: Any, record: PolicyDecided) -> Replayed:
    """Evaluate ``record.input_json`` again; never raises for a bad record (the error is reported)."""
    base = Replayed(record.decision_id, record.action_id, record.occurred_at.isoformat(), record.stage,
                    record.outcome, "", record.approvers_needed, 0, bundle_before=record.bundle_revision)
    if sha256_hex(record.input_json.encode("utf-8")) != record.input_sha256:
        base.error = "input_json does not hash to input_sha256 (altered record): refusing to replay it"
        return base
    try:
        policy_input = parse_policy_input(record.input_json)
    except PolicyInputInvalid as e:
        base.error = f"input no longer validates: {str(e)[:300]}"
        return base
    entrypoint = "proposal" if record.stage == "proposal" else "approvals"
    decision = engine.decide(entrypoint, policy_input).decision  # PolicyEngineUnavailable propagates: stop
    _, outcome = service_stage_and_outcome(decision)
    # The published reasons also list refused approvals ("approval_refused: ..."); compare like with like.
    old = _codes(record.reasons) - {"approval_refused"}
    new = set(decision.reason_codes)
    base.after, base.approvers_after, base.bundle_after = outcome, decision.approvers_needed, decision.bundle_revision
    base.codes_added, base.codes_removed = sorted(new - old), sorted(old - new)
    return base


def replay(engine: Any, records: Iterable[PolicyDecided], since: datetime | None = None) -> list[Replayed]:
    """Replay every record at or after ``since``, oldest first; duplicates (same decision id) once."""
    seen: set[str] = set()
    out = []
    for record in sorted(records, key=lambda r: r.occurred_at):
        if (since is not None and record.occurred_at < since) or record.event_id in seen:
            continue
        seen.add(record.event_id)
        out.append(replay_one(engine, record))
    return out


def parse_records(raw: Iterable[dict[str, Any]]) -> tuple[list[PolicyDecided], list[str]]:
    records, errors = [], []
    for item in raw:
        try:
            records.append(PolicyDecided.model_validate(item))
        except ValidationError as e:
            errors.append(f"not a PolicyDecided record: {str(e)[:200]}")
    return records, errors


def read_topic(topic: str, idle_s: float = 3.0, timeout_s: float = 300.0) -> tuple[list[PolicyDecided], list[str]]:
    """Every committed PolicyDecided on ``topic`` (Kafka settings from PILOTHOUSE_KAFKA_*), read from the start
    until ``idle_s`` pass without a record. A reader never commits offsets nor dead-letters: undecodable records
    are counted and reported."""
    from pilothouse.bus.config import BusSettings
    from pilothouse.bus.reader import TopicReader

    bus = BusSettings(client_id="pilothouse-policy-replay")
    reader = TopicReader(bus, [topic], start="earliest", group_id=f"pilothouse.policy.replay.{uuid.uuid4().hex[:12]}")
    found: list[PolicyDecided] = []
    bad: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        # Not reader.wait_assigned(): it polls, and a record polled there would be lost. Allow the group join
        # (a few seconds) before the first record, then stop after idle_s without one.
        idle_since = time.monotonic() + 10.0
        while time.monotonic() < deadline and time.monotonic() - idle_since < idle_s:
            got = reader.poll(0.2)
            if got is None:
                continue
            idle_since = time.monotonic()
            if isinstance(got[1], PolicyDecided):
                found.append(got[1])
            else:
                bad.append(f"{topic}: a {type(got[1]).__name__} record is not a PolicyDecided")
        if reader.undecodable:
            bad.append(f"{topic}: {reader.undecodable} undecodable record(s)")
    finally:
        reader.close()
    return found, bad


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when nothing would change, 1 when some decisions would change (or could not be replayed), 2 for bad
    arguments or sources, 3 when OPA is unavailable."""
    parser = argparse.ArgumentParser(prog="pilothouse policy replay", description=__doc__.split("\n")[0])
    parser.add_argument("--since", help="only decisions at or after this time (ISO 8601, e.g. 2026-11-25T00:00:00Z)")
    parser.add_argument("--source", choices=("kafka", "postgres", "ledger"), default="kafka")
    parser.add_argument("--topic", default="pilothouse.policy.decisions.v1", help="with --source kafka")
    parser.add_argument("--schema", help="Postgres schema (default: policy for postgres, ledger for ledger)")
    parser.add_argument("--dsn", help="Postgres URI (default: PILOTHOUSE_POLICY_POSTGRES_DSN)")
    parser.add_argument("--opa-url", default=os.environ.get("PILOTHOUSE_POLICY_OPA_URL", "http://127.0.0.1:18181"))
    parser.add_argument("--all", action="store_true", help="print unchanged decisions too")
    parser.add_argument("--json", action="store_true", help="one JSON object per replayed decision")
    args = parser.parse_args(argv)

    from pilothouse.policy.adapters.opa import OpaPolicyEngine
    from pilothouse.policy.adapters.postgres import recorded_decisions

    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            parser.error(f"--since {args.since!r} is not an ISO 8601 time")
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
    try:
        if args.source == "kafka":
            records, bad = read_topic(args.topic)
        else:
            dsn = args.dsn or os.environ.get("PILOTHOUSE_POLICY_POSTGRES_DSN")
            if not dsn:
                parser.error("--dsn or PILOTHOUSE_POLICY_POSTGRES_DSN is required for a Postgres source")
            schema = args.schema or ("ledger" if args.source == "ledger" else "policy")
            records, bad = parse_records(recorded_decisions(dsn, schema, ledger=args.source == "ledger"))
    except PilothouseError as e:
        print(f"cannot read past decisions: {e}", file=sys.stderr)
        return 2
    for problem in bad:
        print(f"skipped: {problem}", file=sys.stderr)
    try:
        with OpaPolicyEngine.from_url(args.opa_url) as engine:
            results = replay(engine, records, since)
    except PolicyEngineUnavailable as e:
        print(f"OPA unavailable: {e}", file=sys.stderr)
        return 3
    changed = [r for r in results if r.changed]
    for r in results if args.all else changed:
        print(json.dumps({**asdict(r), "changed": r.changed}) if args.json else r.line())
    transitions: dict[str, int] = {}
    for r in changed:
        if not r.error and r.before != r.after:
            key = f"{_MEANING.get(r.before, r.before)} -> {_MEANING.get(r.after, r.after)}"
            transitions[key] = transitions.get(key, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(transitions.items())) or "no outcome changes"
    print(f"replayed {len(results)} decision(s); {len(changed)} would change ({summary}); "
          f"{sum(1 for r in results if r.error)} not replayable", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
