"""Handlers of the sensing service: model in, model(s) out. No I/O here; the gateway and the Faust app do the I/O.

* :class:`IngestHandler` — one request body of one source: normalise → redact (fail closed) → Avro records
  (``AlertReceived`` / ``TelemetryReceived``) with the redaction manifest; ``messages`` encodes them for Kafka (a
  request's alerts as one ``AlertsReceived`` per partition). Nothing is produced unless every record of
  the body was normalised and scanned.
* :class:`IncidentHandler` — one ``AlertReceived``: correlate (``correlation.Correlator``) → ``IncidentUpdated`` with
  evidence, ``evidence_sha256`` and dependency edges. One ``TelemetryReceived``: remembered as evidence input.

Fingerprints. Source fingerprints are hex digests, which the redactor's entropy check rightly cannot tell from a hex
API key. Rather than forward them or break deduplication with numbered placeholders, a fingerprint the redactor would
change is replaced by a keyed pseudonym (``psd:`` + 24 hex of HMAC-SHA256 under the deployment's pseudonym key):
stable, so deduplication holds, and never the original value. The manifest lists ``$.fingerprint`` and the kind
``FINGERPRINT_PSEUDONYM``.
"""

from __future__ import annotations

import bisect
import hashlib
import uuid
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import compress, islice
from operator import is_not, itemgetter
from typing import Any

import orjson

from pilothouse.bus import records as avro
from pilothouse.bus.errors import DecodeError, OversizedMessage
from pilothouse.bus.serde import Serde
from pilothouse.sensing import evidence as ev
from pilothouse.sensing.correlation import (
    AlertInput,
    AlertMap,
    BatchStore,
    Correlator,
    CorrelationStore,
    Incident,
    Outcome,
)
from pilothouse.sensing.mapping import MappingRules
from pilothouse.sensing.normalize import DEFAULT_LIMITS, Limits, NormalizedAlert, TelemetryRecord, normalize
from pilothouse.sensing.redaction import RedactionManifest, RedactionRefused, Redactor

PRODUCER = "sensing"
FINGERPRINT_PSEUDONYM = "FINGERPRINT_PSEUDONYM"


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def to_avro_manifest(manifests: Iterable[RedactionManifest], extra: Mapping[str, int] | None = None,
                     extra_fields: Iterable[str] = ()) -> avro.RedactionManifest:
    """Merge the redactor's manifests of one record into the Avro ``RedactionManifest`` (kinds and counts only)."""
    counts: Counter[str] = Counter(dict(extra or {}))
    fields: list[str] = list(extra_fields)
    version = ""
    scanned = True
    for m in manifests:
        version = version or m.ruleset_version
        scanned = scanned and m.scanned
        for f in m.findings:
            counts[f.kind] += f.count
        fields.extend(m.redacted_fields)
    return avro.RedactionManifest(
        ruleset_version=version, scanned=scanned,
        findings=[avro.RedactionFinding(kind=k, count=n) for k, n in sorted(counts.items())],
        redacted_fields=sorted(set(fields)),
    )


ALERTS_RECORD = avro.AlertsReceived.AVRO_NAME


@dataclass(frozen=True)
class Message:
    """One Kafka message to produce: encoded value, topic, key, partition (None: the producer's partitioner)."""

    topic: str
    value: bytes
    key: str | None
    partition: int | None = None
    count: int = 1  # the alerts / telemetry records it carries


@dataclass(frozen=True)
class IngestResult:
    kind: str  # alert | telemetry
    records: list[avro.AlertReceived] | list[avro.TelemetryReceived]  # one per alert / telemetry record, in order
    findings: dict[str, int]

    @property
    def event_ids(self) -> list[str]:
        return [r.event_id for r in self.records]


def alert_partition(fingerprint: str, partitions: int) -> int:
    """The alerts-topic partition of an alert: CRC-32 of its fingerprint modulo the partition count. Every alert
    of a fingerprint lands in one partition, so the correlator sees them in order (its replay check relies on it)."""
    return zlib.crc32(fingerprint.encode()) % partitions


class IngestHandler:
    """Normalise, redact and build the records of one request body; encode them into the messages to produce."""

    def __init__(self, redactor: Redactor, *, alerts_topic: str, telemetry_topic: str,
                 mapping_rules: Mapping[str, MappingRules] | None = None, limits: Limits = DEFAULT_LIMITS,
                 serde: Serde | None = None, new_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> None:
        self.redactor = redactor
        self.alerts_topic = alerts_topic
        self.telemetry_topic = telemetry_topic
        self.mapping_rules = dict(mapping_rules or {})
        self.limits = limits
        self.serde = serde or Serde()
        self._new_id = new_id

    def handle(self, source: str, body: bytes, *, received_at_ms: int, mapping: str | None = None) -> IngestResult:
        """Raises MalformedPayload (400), RedactionRefused (422) — in both cases nothing is to be produced."""
        rules = self.mapping_rules[mapping] if mapping is not None else None
        items = normalize(source, body, rules, received_at_ms=received_at_ms, limits=self.limits)
        out: list[Any] = []
        findings: Counter[str] = Counter()
        for i, item in enumerate(items):
            try:
                record = (self._alert(item, received_at_ms) if isinstance(item, NormalizedAlert)
                          else self._telemetry(item, received_at_ms))
            except RedactionRefused as e:
                raise RedactionRefused(f"record {i} of {len(items)}: {e.reason}") from None
            for f in record.redaction.findings:
                findings[f.kind] += f.count
            out.append(record)
        kind = "alert" if items and isinstance(items[0], NormalizedAlert) else "telemetry"
        return IngestResult(kind, out, dict(findings))

    def messages(self, result: IngestResult, *, partitions: int) -> list[Message]:
        """The Kafka messages of a result. Alerts: one ``AlertsReceived`` per partition of the alerts topic
        (``partitions`` of them; see :func:`alert_partition`), in request order, each alert encoded once and the
        list split where a record would pass the message size limit. Telemetry: one record each, keyed by service.
        Raises RecordInvalid / OversizedMessage (a single alert above the limit)."""
        if result.kind == "telemetry":
            return [Message(self.telemetry_topic, self.serde.encode(r, topic=self.telemetry_topic), r.service)
                    for r in result.records]
        groups: dict[int, list[bytes]] = {}
        for r in result.records:
            item = self.serde.encode_item(ALERTS_RECORD, "alerts", r.model_dump())
            groups.setdefault(alert_partition(r.fingerprint, partitions), []).append(item)
        out: list[Message] = []
        for partition, items in groups.items():
            for chunk in self._fitting(items, result.records[0].received_at):
                out.append(Message(self.alerts_topic, chunk[0], None, partition, chunk[1]))
        return out

    def _fitting(self, items: list[bytes], received_at: datetime) -> list[tuple[bytes, int]]:
        """Encoded AlertsReceived of ``items`` (in order), as few as fit the message size limit: (value, count)."""
        event_id = self._new_id()
        envelope = {"event_id": event_id, "incident_id": None, "correlation_id": event_id, "causation_id": None,
                    "occurred_at": received_at, "producer": PRODUCER}
        try:
            return [(self.serde.encode_spliced(ALERTS_RECORD, envelope, {"alerts": items}, topic=self.alerts_topic),
                     len(items))]
        except OversizedMessage:
            if len(items) == 1:
                raise
        half = len(items) // 2
        return self._fitting(items[:half], received_at) + self._fitting(items[half:], received_at)

    def pseudonymous_fingerprint(self, fingerprint: str) -> str:
        """The keyed pseudonym that replaces a fingerprint the redactor would change (96 bits, stable per key)."""
        return ("psd:" + self.redactor.pseudonym(FINGERPRINT_PSEUDONYM, fingerprint)
                + self.redactor.pseudonym(FINGERPRINT_PSEUDONYM + "/2", fingerprint))[:28]

    def _alert(self, a: NormalizedAlert, received_at_ms: int) -> avro.AlertReceived:
        doc = {"service": a.service, "entity": a.entity, "summary": a.summary, "labels": a.labels,
               "annotations": a.annotations, "links": a.links}
        red, manifest = self.redactor.redact_record(doc)
        fp_red, _ = self.redactor.redact_text(a.fingerprint)  # its findings count as one FINGERPRINT_PSEUDONYM
        extra: dict[str, int] = {}
        extra_fields: list[str] = []
        fingerprint = a.fingerprint
        if fp_red != a.fingerprint:
            fingerprint = self.pseudonymous_fingerprint(a.fingerprint)
            extra[FINGERPRINT_PSEUDONYM] = 1
            extra_fields.append("$.fingerprint")
        event_id = self._new_id()
        return avro.AlertReceived(
            event_id=event_id, correlation_id=event_id, occurred_at=_ts(received_at_ms), producer=PRODUCER,
            source=a.wire_source, fingerprint=fingerprint, status=a.status, severity=a.severity,
            service=red["service"], entity=red["entity"], summary=red["summary"], labels=red["labels"],
            annotations=red["annotations"], starts_at=_ts(a.starts_at_ms),
            ends_at=_ts(a.ends_at_ms) if a.ends_at_ms is not None else None, links=red["links"],
            received_at=_ts(received_at_ms), redaction=to_avro_manifest([manifest], extra, extra_fields),
        )

    def _telemetry(self, t: TelemetryRecord, received_at_ms: int) -> avro.TelemetryReceived:
        doc = {"service": t.service, "entity": t.entity, "body": t.body, "attributes": t.attributes,
               "source": t.source}
        red, manifest = self.redactor.redact_record(doc)
        event_id = self._new_id()
        return avro.TelemetryReceived(
            event_id=event_id, correlation_id=event_id, occurred_at=_ts(t.timestamp_ms), producer=PRODUCER,
            kind=t.kind, source=red["source"], service=red["service"], entity=red["entity"],
            timestamp=_ts(t.timestamp_ms), severity=t.severity, body=red["body"], attributes=red["attributes"],
            trace_id=t.trace_id or "", span_id=t.span_id or "", redaction=to_avro_manifest([manifest]),
        )


# ---------------------------------------------------------------------------------------------------- incidents

def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


#: an alert's sequence is its record's offset times this plus its index in the record (AlertsReceived)
SEQUENCE_STRIDE = 1 << 20


def alert_input(record: avro.AlertReceived, sequence: int = -1) -> AlertInput:
    """The fields of an AlertReceived that correlation reads; ``sequence``: its place in its partition (see
    :func:`decode_alert_inputs`)."""
    return AlertInput(event_id=record.event_id, source=record.source, fingerprint=record.fingerprint,
                      status=record.status, severity=record.severity, service=record.service,
                      summary=record.summary, received_at_ms=_ms(record.received_at), labels=record.labels,
                      sequence=sequence)


ALERT_INPUT_FIELDS = ("event_id", "source", "fingerprint", "status", "severity", "service", "summary", "received_at",
                      "labels")


def decode_alert_inputs(serde: Serde, raw: bytes, offset: int = -1) -> list[AlertInput]:
    """The alerts of a framed AlertsReceived as AlertInputs: only the fields correlation reads, timestamps as
    milliseconds (no model: the Avro decoding is the validation, and the generated model adds no constraint to an
    AlertReceived that Avro does not enforce). Each alert's sequence is ``offset * SEQUENCE_STRIDE + index``: it grows
    along the partition, as the replay check needs (-1 when the offset is unknown). Raises DecodeError /
    OversizedMessage like ``Serde.decode``."""
    d = serde.decode_fields(raw, (("alerts", ALERT_INPUT_FIELDS),), expected=ALERTS_RECORD, millis=True)
    alerts = d["alerts"]
    if len(alerts) >= SEQUENCE_STRIDE:
        raise DecodeError(f"{len(alerts)} alerts in one record, at most {SEQUENCE_STRIDE - 1} are numbered")
    base = offset * SEQUENCE_STRIDE if offset >= 0 else -1
    return [AlertInput(event_id=a["event_id"], source=a["source"], fingerprint=a["fingerprint"], status=a["status"],
                       severity=a["severity"], service=a["service"], summary=a["summary"],
                       received_at_ms=a["received_at"], labels=a["labels"], sequence=base + i if base >= 0 else -1)
            for i, a in enumerate(alerts)]


def evidence_sha256(items: Iterable[avro.Evidence]) -> str:
    """SHA-256 over the evidence set: over the SHA-256 digests of its items, sorted, each the digest of the item's
    canonical JSON (sorted keys, orjson). Independent of the items' order, and an update hashes 32 bytes per item,
    not every item's JSON again (at 150 alerts, ~100 KB per update)."""
    return _set_digest(hashlib.sha256(orjson.dumps(i.model_dump(), option=orjson.OPT_SORT_KEYS)).digest()
                       for i in items)


def _set_digest(digests: Iterable[bytes]) -> str:
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


@dataclass
class TelemetryBuffer:
    """Recent telemetry per service (bounded), the input of log-burst and change evidence. In memory only: after a
    restart, evidence starts again from the telemetry that arrives (the records stay on their topic)."""

    per_service: int = 2000
    logs: dict[str, deque] = field(default_factory=dict)
    changes: dict[str, deque] = field(default_factory=dict)

    def add(self, record: avro.TelemetryReceived) -> None:
        store = self.logs if record.kind == "log" else self.changes
        buf = store.get(record.service)
        if buf is None:
            buf = store[record.service] = deque(maxlen=self.per_service)
        buf.append(record)

    def log_records(self, services: Iterable[str]) -> list[ev.LogRecord]:
        return [ev.LogRecord(_ms(r.timestamp), r.service, r.body, source_link=f"telemetry:{r.event_id}")
                for s in services for r in self.logs.get(s, ())]

    def change_records(self, services: Iterable[str]) -> list[ev.ChangeRecord]:
        out = []
        for s in services:
            for r in self.changes.get(s, ()):
                change_type = r.attributes.get("change_type") or r.attributes.get("type") or "change"
                out.append(ev.ChangeRecord(_ms(r.timestamp), r.service, change_type, r.body,
                                           source_link=f"telemetry:{r.event_id}"))
        return out


@dataclass(frozen=True)
class BatchOutcome:
    """What a batch of alerts did: one outcome (or the exception that record raised) per alert, in order, and the
    incidents to emit — each once, in its state after the batch, in the order they first changed."""

    outcomes: list[Outcome | Exception]
    incidents: list[Incident]


def _emitted(outcomes: Iterable[Outcome | Exception]) -> list[Incident]:
    emit: dict[str, Incident] = {}
    for o in outcomes:
        if isinstance(o, Outcome) and o.emits and o.incident is not None:
            emit[o.incident.incident_id] = o.incident  # the batch's live object: its final state
    return list(emit.values())


_HEAD_TIMESTAMPS = ("occurred_at", "first_seen", "last_seen", "resolved_at")  # of an IncidentUpdated, in ms in _update

MetricEvidence = tuple[list[ev.EvidenceItem], str]
"""Metric evidence of an incident and where it came from ("prometheus", "not configured", "unreachable: ...")."""


class IncidentHandler:
    """Correlate one alert and build the IncidentUpdated to write (or None)."""

    def __init__(self, correlator: Correlator, redactor: Redactor, *, telemetry: TelemetryBuffer | None = None,
                 new_id: Callable[[], str] = lambda: str(uuid.uuid4()), evidence_hops: int = 2,
                 serde: Serde | None = None) -> None:
        self.correlator = correlator
        self.evidence_hops = evidence_hops
        self.redactor = redactor
        self.telemetry = telemetry or TelemetryBuffer()
        self._new_id = new_id
        self.serde = serde or Serde()
        self.alert_items = AlertEvidenceCache(self.serde)
        self._empty: dict[str, Any] | None = None

    def correlate(self, record: avro.AlertReceived | AlertInput, store: CorrelationStore, *,
                  sequence: int = -1) -> Outcome:
        """Apply one alert; ``outcome.emits`` says whether an IncidentUpdated must be written. An AlertInput
        (:func:`decode_alert_inputs`) carries its sequence already."""
        return self.correlator.apply(record if isinstance(record, AlertInput) else alert_input(record, sequence),
                                     store)

    def correlate_batch(self, alerts: Sequence[tuple[avro.AlertReceived | AlertInput, int]],
                        store: CorrelationStore) -> BatchOutcome:
        """Apply a batch of ``(record, sequence)`` in order; emit each changed incident once, in its final state.

        Reads go through a :class:`BatchStore` (live incidents, no ``from_dict`` per alert). Its writes reach
        ``store`` in alert order, as one-at-a-time processing makes them, except a write that the very next write
        replaces (same incident, no other key in between; a burst on one incident costs one write): so every
        prefix of the writes is the state after some prefix of the alerts, which is what a restart may find and the
        replay rules expect. (Coalescing ALL of a batch's writes per key would let a crash keep a later alert's
        write and lose an earlier one's; a replay then saw the future and diverged from the crash-free run.)
        The updates are coalesced per batch: a skipped intermediate version is one consumers, idempotent on
        incident id + version and keeping the highest, never needed.

        A store that writes a batch atomically (``writes_batches_atomically``, the worker's
        :class:`~pilothouse.sensing.state.BatchLogStore`) gets each changed incident once, at the end: every prefix
        of its durable writes is a whole number of batches.

        A record that raises is reported as its outcome (the exception); nothing of it is written, and the live
        state it may have half-changed is dropped.
        """
        atomic = getattr(store, "writes_batches_atomically", False)
        cache = BatchStore(store)
        outcomes: list[Outcome | Exception] = []
        failed = False
        for i, (record, sequence) in enumerate(alerts):
            try:
                outcome = self.correlate(record, cache, sequence=sequence)
            except Exception as e:  # noqa: BLE001 - reported per record; the worker dead-letters it
                outcomes.append(e)
                # Forget what the failure may have half-changed in place; that includes the held write of the
                # alerts just before it, so apply the batch's earlier alerts again: those already written are
                # recognised as replays and change nothing, the others redo their writes.
                if atomic:
                    store.discard()  # the live incidents it read may be damaged in place
                cache, failed = BatchStore(store), True
                for (r, seq), o in zip(alerts[:i], outcomes[:i]):
                    if not isinstance(o, Exception):
                        self.correlate(r, cache, sequence=seq)
                        if not atomic:
                            cache.flush_superseded()
                continue
            if not atomic:
                cache.flush_superseded()
            outcomes.append(outcome)
        cache.flush()
        emitted = _emitted(outcomes)
        if failed:  # an incident emitted before the failure may have been damaged in place: take the stored state
            emitted = [inc for inc in (store.get_incident(i.incident_id) for i in emitted) if inc is not None]
        return BatchOutcome(outcomes, emitted)

    def handle_alert(self, record: avro.AlertReceived, store: CorrelationStore, *, sequence: int = -1,
                     metrics: MetricEvidence | None = None) -> tuple[Outcome, avro.IncidentUpdated | None]:
        """Correlate and build the record in one step (metric evidence, if any, fetched by the caller)."""
        outcome = self.correlate(record, store, sequence=sequence)
        if not outcome.emits or outcome.incident is None:
            return outcome, None
        return outcome, self.incident_record(outcome.incident, metrics=metrics)

    @staticmethod
    def window(inc: Incident) -> ev.Window:
        """The incident window evidence looks at: from a minute before its first alert to its last."""
        return ev.Window(inc.first_seen - 60_000, inc.last_seen)

    def handle_telemetry(self, record: avro.TelemetryReceived) -> None:
        self.telemetry.add(record)

    def evidence_scope(self, inc: Incident, services: list[str] | None = None) -> list[str]:
        """The incident's services and their callees (evidence and topology cover both; see Dependencies.downstream).
        ``services``: the incident's, if the caller has them already."""
        return self.correlator.deps.downstream(inc.services if services is None else services, self.evidence_hops)

    def incident_record(self, inc: Incident, *, metrics: MetricEvidence | None = None) -> avro.IncidentUpdated:
        """The IncidentUpdated of the incident's current version."""
        head, evidence = self._update(inc, metrics)
        return avro.IncidentUpdated.model_validate({
            **head, **{k: _ts(head[k]) if head[k] is not None else None for k in _HEAD_TIMESTAMPS},
            "evidence": [_CachedEvidence.model(i) for i in evidence]})

    def encoded_incident_record(self, inc: Incident, *, metrics: MetricEvidence | None = None) -> bytes:
        """The same record, Avro-encoded (the bytes ``serde.encode(incident_record(...))`` gives): each evidence item
        (and each fingerprint) is encoded once per state of its source and spliced in, so an update no longer costs
        a dump and an encode of every alert of its incident (an incident's n-th update cost O(n) item encodings, its
        whole life O(n^2)); the rest is written from a plain dict (no model to validate and dump again: the Avro
        writer checks every field against the schema)."""
        head, evidence = self._update(inc, metrics)
        fingerprints = self.alert_items.encoded_fingerprints(inc.incident_id, head.pop("alert_fingerprints"))
        return self.serde.encode_spliced(avro.IncidentUpdated.AVRO_NAME, head, {
            "alert_fingerprints": fingerprints, "evidence": list(map(itemgetter(2), evidence))})

    def _update(self, inc: Incident, metrics: MetricEvidence | None) -> tuple[dict[str, Any], list[CachedItem]]:
        """The record without its evidence, as the dict its model dumps to (timestamps as milliseconds), and its
        evidence items in the order the record lists them."""
        deps = self.correlator.deps
        view = inc.view(deps)  # every derived view from one walk over the incident's alerts
        services, primary = view.services, view.primary_service
        scope = self.evidence_scope(inc, services)
        metric_items, status = metrics or ([], "not configured")
        # The title and the alert items are built from alerts that were redacted at the gateway (and come from the
        # cache: built once per alert state, see AlertEvidenceCache). Every string leaving sensing passes redaction:
        # every other item (Prometheus labels, log templates, change descriptions) is scanned again here — a second
        # pass over already-redacted text is cheap insurance, not a no-op by design.
        alert_items = self.alert_items.items(inc, status)
        found = self._other_evidence(scope, self.window(inc), metric_items)
        if found:
            other, manifest = self.redactor.redact_record([i.to_dict() for i in found])
            other_items = [_CachedEvidence.of(avro.Evidence.model_validate(d), self.serde) for d in other]
            redaction = to_avro_manifest([manifest]).model_dump()
        else:  # nothing to scan: the manifest of an empty scan (same every time, built once)
            other_items, redaction = [], self._empty_manifest()
        evidence = alert_items + other_items
        head = {
            "event_id": self._new_id(), "incident_id": inc.incident_id, "correlation_id": inc.incident_id,
            "causation_id": inc.causation_id, "occurred_at": inc.last_seen, "producer": PRODUCER,
            "version": inc.version, "change": inc.change, "state": inc.state, "title": view.title,
            "severity": view.severity, "primary_service": primary, "services": services,
            "alert_fingerprints": view.fingerprints, "alert_count": len(inc.alerts), "first_seen": inc.first_seen,
            "last_seen": inc.last_seen, "resolved_at": inc.resolved_at, "evidence": [],
            "dependency_edges": [{"caller": a, "callee": b} for a, b in deps.topology(services, scope)],
            "evidence_sha256": _CachedEvidence.sha256(evidence), "redaction": redaction, "episode": inc.episode,
        }
        return head, evidence

    def _empty_manifest(self) -> dict[str, Any]:
        if self._empty is None:
            self._empty = to_avro_manifest([self.redactor.redact_record([])[1]]).model_dump()
        return self._empty

    def _other_evidence(self, services: list[str], window: ev.Window,
                        metric_items: list[ev.EvidenceItem]) -> list[ev.EvidenceItem]:
        """Evidence besides the alerts: log bursts and changes of the buffered telemetry, and the metric items."""
        items: list[ev.EvidenceItem] = []
        logs = self.telemetry.log_records(services)
        items += ev.log_bursts(logs, window) if logs else []
        changes = self.telemetry.change_records(services)
        items += ev.change_evidence(changes, window) if changes else []
        return items + list(metric_items)


CachedItem = tuple[str, bytes, bytes, bytes]
"""One evidence item as an IncidentUpdated carries it: (evidence_id, canonical JSON, Avro body, SHA-256 digest of
the canonical JSON: what :func:`evidence_sha256` takes of it). A plain tuple of
bytes and strings: tens of thousands live as long as their incidents, and the garbage collector stops tracking
such tuples, where objects (a validated model each, before) are walked at every full collection (10-27 ms)."""


class _CachedEvidence:
    """Functions over :data:`CachedItem`."""

    @staticmethod
    def of(model: avro.Evidence, serde: Serde) -> CachedItem:
        return _CachedEvidence.of_dict(model.model_dump(), serde)

    @staticmethod
    def of_dict(data: dict[str, Any], serde: Serde) -> CachedItem:
        """``data``: every field of an Evidence (as ``model_dump`` gives it). The Avro writer checks each field
        against the schema (types, enum symbols), so an item that is not a valid Evidence is refused here too."""
        canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)  # what evidence_sha256 hashes
        # encoded from the canonical form (maps in key order), so model() encodes to the same bytes
        return (data["evidence_id"], canonical,
                serde.encode_item(avro.IncidentUpdated.AVRO_NAME, "evidence", orjson.loads(canonical)),
                hashlib.sha256(canonical).digest())

    @staticmethod
    def model(item: CachedItem) -> avro.Evidence:
        """The item as a model again (for the record; the worker publishes the bytes)."""
        return avro.Evidence.model_validate_json(item[1])

    @staticmethod
    def sha256(items: Sequence[CachedItem]) -> str:
        """Same digest as :func:`evidence_sha256` of the models, from the items' digests."""
        return _set_digest(map(itemgetter(3), items))


class AlertEvidenceCache:
    """The ``alert`` evidence items of recent incidents, each built (and validated, and dumped for the hash) once
    per state of its alert.

    An IncidentUpdated carries one item per alert of its incident, so building them afresh made an incident's n-th
    update cost n validations and dumps (its whole life n²): two thirds of the correlator's CPU per update in the
    sensing bench. An item depends only on its alert (an :class:`AlertRef`, frozen: a changed alert is a new ref) and
    the incident's context (its first_seen, the metric-source note), so an item is rebuilt when its alert's ref is
    neither the one it was built from nor equal to it, and the first question is a walk in C (``map``/``compress``),
    not a Python loop over the incident's alerts (which cost ~110 us per update at 75 alerts). Bounded by
    ``max_items``: the least recently updated incidents are dropped."""

    def __init__(self, serde: Serde, max_items: int = 50_000) -> None:
        self.serde = serde
        self.max_items = max_items
        # incident id -> _IncidentItems (most recently used last)
        self._by_incident: OrderedDict[str, _IncidentItems] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def items(self, inc: Incident, metrics_source: str) -> list[CachedItem]:
        """The incident's alert items, ordered by (first_seen, fingerprint) of their alerts, then their keys."""
        context = (inc.first_seen, metrics_source)
        held = self._by_incident.pop(inc.incident_id, None)
        if held is not None:
            self._size -= len(held.order)
        if held is None or held.context != context or not held.follow(inc.alerts):
            held = _IncidentItems(context, inc.alerts)
        refs = list(map(inc.alerts.__getitem__, held.order))
        # not the ref the item was built from, nor an equal one (an incident decoded from its state again has new
        # refs of the same alerts: comparing values, ~1 us, spares rebuilding every item, ~20 us each)
        changed = [i for i in compress(range(len(refs)), map(is_not, refs, held.refs)) if refs[i] != held.refs[i]]
        if any(held.moved(refs[i], held.refs[i]) for i in changed):  # its place in the order changed: afresh
            held = _IncidentItems(context, inc.alerts)
            refs = list(map(inc.alerts.__getitem__, held.order))
            changed = range(len(refs))
        for i in changed:
            held.items[i] = self._build(inc, refs[i], metrics_source, self.serde)
            fingerprint = refs[i].fingerprint
            if fingerprint not in held.fingerprints:
                held.fingerprints[fingerprint] = self._fingerprint(fingerprint)
        held.refs = refs
        self._size += len(held.order)
        self._by_incident[inc.incident_id] = held
        while self._size > self.max_items and len(self._by_incident) > 1:
            _, dropped = self._by_incident.popitem(last=False)
            self._size -= len(dropped.order)
        return list(held.items)

    def encoded_fingerprints(self, incident_id: str, fingerprints: list[str]) -> list[bytes]:
        """``fingerprints`` (those of an incident's alerts, as its view lists them), each Avro-encoded as an item of
        ``alert_fingerprints``: from the incident's items (:meth:`items` encodes each fingerprint once)."""
        held = self._by_incident.get(incident_id)
        known = held.fingerprints if held is not None else {}
        try:
            return list(map(known.__getitem__, fingerprints))
        except KeyError:  # not an incident whose items were just taken: encode the missing ones
            return [known[f] if f in known else self._fingerprint(f) for f in fingerprints]

    def _fingerprint(self, fingerprint: str) -> bytes:
        return self.serde.encode_item(avro.IncidentUpdated.AVRO_NAME, "alert_fingerprints", fingerprint)

    @staticmethod
    def _build(inc: Incident, ref: Any, metrics_source: str, serde: Serde) -> CachedItem:
        # Say where metric evidence came from (or why there is none) on every alert item, so a reader of the
        # incident sees that the absence of metric evidence is not a clean bill of health.
        # A plain dict, not a validated model (two thirds of the item's cost): every field is given, with its
        # schema type, and the Avro writer checks them (test_sensing_handlers compares it with the model's item).
        return _CachedEvidence.of_dict({
            "evidence_id": ev.evidence_id("alert", ref.service, f"{ref.source}/{ref.fingerprint}",
                                          ev.Window(inc.first_seen, inc.first_seen)),
            "kind": "alert", "service": ref.service, "signal": f"{ref.source}/{ref.fingerprint}",
            "summary": f"{ref.severity} alert {ref.status}: {ref.summary[:300]}", "direction": "none",
            "score": float(_ALERT_SCORE.get(ref.severity, 0)), "onset_ms": ref.first_seen, "baseline": None,
            "observed": None, "source_link": f"alert:{ref.last_event_id}",
            "attributes": {"status": ref.status, "source": ref.source, "metrics_source": metrics_source},
        }, serde)


class _IncidentItems:
    """One incident's cached alert items: its alerts' dedup keys in item order, the refs the items were built from
    (None: not built yet) and the items, in that order; the fingerprints of its alerts, Avro-encoded."""

    __slots__ = ("context", "order", "keys", "refs", "items", "fingerprints", "token")

    def __init__(self, context: tuple, alerts: Mapping[str, Any]) -> None:
        self.context = context
        self.order = sorted(alerts, key=self._position(alerts))
        self.keys = set(alerts)
        self.refs: list[Any] = [None] * len(self.order)
        self.items: list[Any] = [None] * len(self.order)
        self.fingerprints: dict[str, bytes] = {}  # fingerprint -> its Avro body (a pure function of it)
        self.token = self._token(alerts)

    @staticmethod
    def _token(alerts: Mapping[str, Any]) -> object | None:
        return alerts.append_token() if isinstance(alerts, AlertMap) else None

    @staticmethod
    def _position(alerts: Mapping[str, Any]) -> Callable[[str], tuple[int, str, str]]:
        """Where an alert's item goes: a total order (a tie by the map's order would change when a key is written
        again)."""
        return lambda k: (alerts[k].first_seen, alerts[k].fingerprint, k)

    @staticmethod
    def moved(ref: Any, built_from: Any) -> bool:
        """A new state of an alert sorts elsewhere (the correlator never changes an alert's first_seen)."""
        return built_from is not None and (ref.first_seen, ref.fingerprint) != (built_from.first_seen,
                                                                                built_from.fingerprint)

    def follow(self, alerts: Mapping[str, Any]) -> bool:
        """Take in the keys added to ``alerts`` since the last call (where a new state of a known alert sorts is
        :meth:`moved`'s question). False: a key is gone (the items must be built afresh)."""
        known = len(self.keys)
        token = self._token(alerts)
        if len(alerts) < known or (  # keys may have gone since the last call, unless the map says it only gained
                (token is None or token is not self.token) and not all(map(alerts.__contains__, self.keys))):
            return False
        self.token = token
        if len(alerts) == known:
            return True
        # every known key is there, so exactly len(alerts) - known keys are new: the last ones in the map's order,
        # unless a key was deleted and written again (then one of the last is known, and the walk starts afresh)
        added = list(islice(reversed(alerts), len(alerts) - known))[::-1]  # from the end: O(added), not O(n)
        if any(map(self.keys.__contains__, added)):
            return False
        position = self._position(alerts)
        for key in added:
            new = position(key)
            # most often the newest alert sorts last: one comparison, not a bisection calling position ~log2(n) times
            at = len(self.order) if not self.order or new > position(self.order[-1]) else bisect.bisect(
                self.order, new, key=position)
            self.order.insert(at, key)
            self.refs.insert(at, None)
            self.items.insert(at, None)
        self.keys.update(added)
        return True


_ALERT_SCORE = {"critical": 4, "error": 3, "warning": 2, "info": 1}
"""The score of an alert evidence item, by severity (0 for any other)."""
