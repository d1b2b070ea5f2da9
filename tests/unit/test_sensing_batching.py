"""Batched correlation (what the Faust worker does): a write-back BatchStore per batch, one update per changed
incident per batch, the alert index derived from the incidents after a restart. Batching must never change what
the incidents are: the same alerts in the same order give the same states, ids and versions, whatever the batch
boundaries, including across a crash that loses any subset of a batch's writes."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone

import pytest

from pilothouse.bus.records import AlertReceived, RedactionManifest
from pilothouse.sensing.correlation import (
    CorrelationRules,
    Correlator,
    DependencyMap,
    MemoryStore,
    alert_index_from,
)
from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
from pilothouse.sensing.handlers import IncidentHandler
from pilothouse.sensing.redaction import Redactor
from tests.unit.test_sensing_correlation import MIN, FakeClock, alert

SERVICES = ["frontend", "checkout", "payment", "cart", "redis", "ad", "email"]


@pytest.fixture(scope="module")
def deps() -> DependencyMap:
    return DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())


def _events(seed: int, n: int = 40):
    """Random firing/resolved alerts over a few fingerprints, with pauses long enough for reopen windows to pass."""
    rng, clock, out = random.Random(seed), FakeClock(), []
    for i in range(n):
        clock.advance(rng.choice([0, 0, MIN, 3 * MIN, 40 * MIN]))
        fp = f"fp{rng.randint(0, 9)}"
        status = "resolved" if rng.random() < 0.3 else "firing"
        ev = alert(clock, fp, SERVICES[int(fp[2:]) % len(SERVICES)], status, event_id=f"e{seed}-{i}")
        out.append(dataclasses.replace(ev, sequence=i))
    return out


def _batches(rng: random.Random, items: list):
    i = 0
    while i < len(items):
        size = rng.randint(1, 8)
        yield items[i:i + size]
        i += size


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str]] = []
        self.incident_log: list[tuple[str, int]] = []  # (incident id, version written)

    def put_incident(self, incident):
        self.writes.append(("incidents", incident.incident_id))
        self.incident_log.append((incident.incident_id, incident.version))
        super().put_incident(incident)

    def put_alert_index(self, key, incident_id):
        self.writes.append(("alert_index", key))
        super().put_alert_index(key, incident_id)

    def put_service_index(self, scoped, incident_id):
        self.writes.append(("service_index", scoped))
        super().put_service_index(scoped, incident_id)


def _replayed(outcomes) -> set[str]:
    """Incidents a batch only re-emits (replays change nothing, so they are not written)."""
    changed = {o.incident.incident_id for o in outcomes if o.incident and o.kind not in ("replayed", "unchanged")}
    return {o.incident.incident_id for o in outcomes if o.incident and o.kind == "replayed"} - changed


def _current(store: MemoryStore) -> dict[str, tuple]:
    return {iid: (d["version"], d["state"], sorted(d["alerts"])) for iid, d in store.incidents.items()}


RULES = CorrelationRules(reopen_window_ms=30 * MIN)


def _record(ev) -> AlertReceived:
    """The AlertReceived that carries an AlertInput (what the worker decodes)."""
    at = datetime.fromtimestamp(ev.received_at_ms / 1000, tz=timezone.utc)
    return AlertReceived(
        event_id=ev.event_id, correlation_id=ev.event_id, occurred_at=at, producer="sensing", source=ev.source,
        fingerprint=ev.fingerprint, status=ev.status, severity=ev.severity, service=ev.service, summary=ev.summary,
        labels=dict(ev.labels), starts_at=at, received_at=at,
        redaction=RedactionManifest(ruleset_version="rs-test", scanned=True))


@pytest.fixture(scope="module")
def handler(deps) -> IncidentHandler:
    return IncidentHandler(Correlator(deps, RULES), Redactor(b"unit-test-pseudonym-key-000001"))


def _one_at_a_time(deps, events) -> MemoryStore:
    """The reference: the events applied one at a time, unbatched, on a fresh store."""
    reference = MemoryStore()
    for ev in events:
        Correlator(deps, RULES).apply(ev, reference)
    return reference


def _collapsed(writes: list[tuple]) -> list[tuple]:
    """Incident writes without those the very next write replaces (same incident, nothing in between)."""
    out: list[tuple] = []
    for w in writes:
        if out and out[-1][0] == w[0]:
            out[-1] = w
        else:
            out.append(w)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_batch_writes_what_one_alert_at_a_time_writes_and_emits_each_incident_once(deps, handler, seed):
    events = _events(seed)
    reference, store, rng = CountingStore(), CountingStore(), random.Random(seed)
    for batch in _batches(rng, events):
        reference.incident_log.clear()
        for ev in batch:
            Correlator(deps, RULES).apply(ev, reference)
        store.incident_log.clear()
        result = handler.correlate_batch([(_record(ev), ev.sequence) for ev in batch], store)
        # the same incident writes in the same order, minus those the next write replaced: every prefix of them
        # is the state after some prefix of the alerts (what a restart may find)
        assert store.incident_log == _collapsed(reference.incident_log)
        ids = [inc.incident_id for inc in result.incidents]
        assert len(ids) == len(set(ids))  # one update per changed incident per batch
        assert set(ids) == {o.incident.incident_id for o in result.outcomes if o.emits}
        for inc in result.incidents:  # ... in its state after the batch, which is the stored state
            assert store.get_incident(inc.incident_id).to_dict() == inc.to_dict()
    assert _current(store) == _current(reference)
    assert store.alert_index == reference.alert_index and store.service_index == reference.service_index


def test_a_burst_on_one_incident_costs_one_write_per_batch(deps, handler):
    clock = FakeClock()
    burst = [dataclasses.replace(alert(clock, f"b{i}", "cart", event_id=f"burst-{i}"), sequence=i) for i in range(50)]
    store = CountingStore()
    result = handler.correlate_batch([(_record(ev), ev.sequence) for ev in burst], store)
    assert store.incident_log == [(result.incidents[0].incident_id, 50)]
    assert result.incidents[0].version == 50 and len(store.incidents[result.incidents[0].incident_id]["alerts"]) == 50


class OrderedLog(MemoryStore):
    """The worker's persistence: only incidents, in one changelog partition, durable in the order they were written.
    A crash keeps a prefix of the writes not yet acknowledged (the worker waits for the acks of a batch before it
    takes the next one) and the indexes are derived again from the incidents."""

    def __init__(self) -> None:
        super().__init__()
        self.unacked: list[tuple[str, object]] = []

    def put_incident(self, incident):
        super().put_incident(incident)
        self.unacked.append((incident.incident_id, self.incidents[incident.incident_id]))

    def ack(self) -> None:
        self.unacked.clear()

    def crash(self, rng: random.Random, durable: dict) -> None:
        self.incidents = dict(durable)
        for key, value in self.unacked[:rng.randint(0, len(self.unacked))]:
            self.incidents[key] = value
        self.unacked.clear()
        self.rebuild_indexes()


# Seed 24 found a real bug (one alert at a time too): a replay re-indexed ALL services of its incident, which
# overwrote a newer service-index entry of another incident, and a later alert grouped differently.
@pytest.mark.parametrize("seed", range(150))
def test_a_crash_mid_batch_and_a_differently_batched_replay_end_in_the_reference_state(deps, handler, seed):
    events = _events(seed, 30)
    reference = _one_at_a_time(deps, events)

    rng = random.Random(1000 + seed)
    batches = list(_batches(rng, events))
    crash_in = rng.randrange(len(batches))
    start = sum(len(b) for b in batches[:crash_in])
    committed = rng.randint(max(0, start - 10), start)  # acked alerts whose offsets were not committed yet
    store, durable = OrderedLog(), {}
    for batch in batches[:crash_in + 1]:
        handler.correlate_batch([(_record(ev), ev.sequence) for ev in batch], store)
        if batch is not batches[crash_in]:
            store.ack()
            durable = dict(store.incidents)
    store.crash(rng, durable)
    for batch in _batches(random.Random(seed), events[committed:]):  # other batch boundaries than before
        handler.correlate_batch([(_record(ev), ev.sequence) for ev in batch], store)
    assert _current(store) == _current(reference)
    assert store.alert_index == reference.alert_index and store.service_index == reference.service_index


@pytest.mark.parametrize("seed", range(30))
def test_the_indexes_the_incidents_imply_are_the_live_ones(deps, seed):
    store = MemoryStore()
    c = Correlator(deps, CorrelationRules(reopen_window_ms=10 * MIN))
    for ev in _events(seed, 60):
        c.apply(ev, store)
    alert_index, service_index = dict(store.alert_index), dict(store.service_index)
    store.rebuild_indexes()
    assert (store.alert_index, store.service_index) == (alert_index, service_index)
    assert alert_index_from(store.incidents.values()) == alert_index


def test_an_alert_that_fires_again_after_the_reopen_window_is_indexed_to_its_new_incident(deps):
    clock, store = FakeClock(), MemoryStore()
    c = Correlator(deps, CorrelationRules(reopen_window_ms=10 * MIN))
    old = c.apply(alert(clock, "a", "cart", event_id="e1", ), store).incident.incident_id
    c.apply(alert(clock, "a", "cart", "resolved", event_id="e2"), store)
    clock.advance(11 * MIN)
    new = c.apply(alert(clock, "a", "cart", event_id="e3"), store).incident.incident_id
    assert new != old and all("alertmanager\x1fa" in store.incidents[i]["alerts"] for i in (old, new))
    assert alert_index_from(store.incidents.values()) == store.alert_index
    assert store.alert_index["alertmanager\x1fa"] == new


# ---------------------------------------------------------------------------------------------------- the handler

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _numbered(i: int, service: str, fp: str) -> AlertReceived:
    eid = f"ev-{i}"
    return AlertReceived(
        event_id=eid, correlation_id=eid, occurred_at=T0, producer="sensing", source="alertmanager",
        fingerprint=fp, status="firing", severity="warning", service=service, summary=f"alert {i}",
        starts_at=T0, received_at=T0, redaction=RedactionManifest(ruleset_version="rs-test", scanned=True))


class _Failing(Correlator):
    """A correlator with a bug that shows on one record only (after it changed the incident in place)."""

    def __init__(self, deps, bad_event: str) -> None:
        super().__init__(deps)
        self.bad_event = bad_event

    def apply(self, alert, store):
        if alert.event_id == self.bad_event:
            inc = store.get_incident(store.get_alert_index(f"{alert.source}\x1fcart-0") or "")
            if inc is not None:
                inc.alerts.clear()  # half-done damage that must not leak into the batch's writes
            raise RuntimeError("bug")
        return super().apply(alert, store)


def test_a_batch_emits_each_changed_incident_once_in_its_final_state(deps):
    handler = IncidentHandler(Correlator(deps), Redactor(b"unit-test-pseudonym-key-000001"))
    records = [(_numbered(i, "cart", f"cart-{i}"), i) for i in range(5)] + [(_numbered(9, "ad", "ad-0"), 9)]
    store = MemoryStore()
    result = handler.correlate_batch(records, store)
    assert [o.kind for o in result.outcomes] == ["opened", "updated", "updated", "updated", "updated", "opened"]
    assert [(i.version, len(i.alerts)) for i in result.incidents] == [(5, 5), (1, 1)]
    update = handler.incident_record(result.incidents[0])
    assert update.version == 5 and update.alert_count == 5 and update.causation_id == "ev-4"
    assert _current(store) == {i.incident_id: (i.version, i.state, sorted(i.alerts)) for i in result.incidents}


def test_a_failing_record_is_reported_alone_and_its_damage_is_not_written(deps):
    handler = IncidentHandler(_Failing(deps, "ev-2"), Redactor(b"unit-test-pseudonym-key-000001"))
    records = [(_numbered(i, "cart", f"cart-{i}"), i) for i in range(5)]
    store = MemoryStore()
    result = handler.correlate_batch(records, store)
    assert isinstance(result.outcomes[2], RuntimeError)
    assert [getattr(o, "kind", None) for o in result.outcomes] == ["opened", "updated", None, "updated", "updated"]

    expected = MemoryStore()  # the same records without the failing one, one at a time
    for record, seq in records[:2] + records[3:]:
        handler.correlate(record, expected, sequence=seq)
    assert _current(store) == _current(expected)
    assert [len(i.alerts) for i in result.incidents] == [4]
