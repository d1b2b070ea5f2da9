"""The correlator's durable state (services/sensing/state.py): a batch's incidents and its marker on one changelog
partition. A crash may cut the log anywhere after the last acknowledged batch (two batches can be in flight);
recovery rolls back a batch without its marker, and a replay of the alerts after the committed offset, batched
differently, must end in the state one-alert-at-a-time processing gives."""

from __future__ import annotations

import random

import orjson
import pytest

from pilothouse.sensing.correlation import Correlator, MemoryStore
from pilothouse.sensing.handlers import IncidentHandler
from pilothouse.sensing.redaction import Redactor
from pilothouse.sensing.state import ALERT_SEP, MARKER_KEY, BatchLogStore, StateLogError, apply_records
from tests.unit.test_sensing_batching import RULES, _batches, _current, _events, _numbered, _one_at_a_time, _record


@pytest.fixture(scope="module")
def handler(deps) -> IncidentHandler:
    return IncidentHandler(Correlator(deps, RULES), Redactor(b"unit-test-pseudonym-key-000001"))


@pytest.fixture(scope="module")
def deps():
    from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
    from pilothouse.sensing.correlation import DependencyMap

    return DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())


def _run(handler, store: BatchLogStore, batch) -> list:
    handler.correlate_batch([(_record(ev), ev.sequence) for ev in batch], store)
    return store.commit()


def _recover(log: list, keep: int) -> tuple[BatchLogStore, list]:
    """A fresh worker after a crash that kept ``log[:keep]``: the table a changelog replay builds, loaded."""
    durable = log[:keep]
    table: dict = {}
    apply_records(table, durable)
    store = BatchLogStore()
    return store, store.load(table)


@pytest.mark.parametrize("seed", range(200))
def test_a_crash_anywhere_in_the_unacknowledged_tail_then_a_differently_batched_replay_ends_in_the_reference_state(
        handler, deps, seed):
    events = _events(seed, 30)
    reference = _one_at_a_time(deps, events)

    rng = random.Random(2000 + seed)
    batches = list(_batches(rng, events))
    crash_in = rng.randrange(len(batches))
    store, log = BatchLogStore(), []
    ends: list[tuple[int, int]] = []  # per batch: (log length after it, alerts after it)
    done = 0
    for batch in batches[:crash_in + 1]:
        log += _run(handler, store, batch)
        done += len(batch)
        ends.append((len(log), done))
    # pipelined: the batch before the crashed one may be unacknowledged too; a crash keeps any prefix beyond that
    acked_batches = max(0, crash_in - rng.randint(1, 2))
    acked_log, acked_alerts = ends[acked_batches - 1] if acked_batches else (0, 0)
    keep = rng.randint(acked_log, len(log))
    committed = rng.randint(max(0, acked_alerts - 10), acked_alerts)  # acked alerts whose offsets were not committed
    store, rollback = _recover(log, keep)
    # recovered: exactly the state after the last batch whose marker was kept (one alert at a time to there)
    whole = sum(1 for n, _ in ends if n <= keep)
    prefix = _one_at_a_time(deps, events[:ends[whole - 1][1] if whole else 0])
    assert _current(store) == _current(prefix)
    log = log[:keep]
    if rollback and rng.random() < 0.3:  # crash again while the roll-back is written
        log += rollback[:rng.randint(0, len(rollback) - 1)]
        store, rollback = _recover(log, len(log))
    log += rollback
    for batch in _batches(random.Random(seed), events[committed:]):
        log += _run(handler, store, batch)
    assert _current(store) == _current(reference)
    assert store.alert_index == reference.alert_index and store.service_index == reference.service_index
    # and what the log now holds recovers to the same state
    again, more = _recover(log, len(log))
    assert more == [] and _current(again) == _current(reference)


def _docs(records: list) -> dict[bytes, dict]:
    return {k: orjson.loads(v) for k, v in records}


def test_a_batch_writes_each_changed_incident_once_with_only_its_changed_alerts_then_its_marker(handler):
    store = BatchLogStore()
    records = [(_numbered(i, "cart", f"cart-{i}"), i) for i in range(5)] + [(_numbered(9, "ad", "ad-0"), 9)]
    handler.correlate_batch(records, store)
    out = store.commit()
    assert out[-1] == (MARKER_KEY, b'{"b":1}')
    heads = [(k, orjson.loads(v)) for k, v in out[:-1] if ALERT_SEP not in k]
    assert [(d["b"], d["p"], d["s"]["version"], "alerts" in d["s"]) for _, d in heads] == [
        (1, None, 5, False), (1, None, 1, False)]  # cart's, then ad's: in the order they first changed
    alerts = [k for k, _ in out[:-1] if ALERT_SEP in k]
    assert len(alerts) == 6 and len(out) == 9
    assert all(k.split(ALERT_SEP)[0] in (heads[0][0], heads[1][0]) for k in alerts)
    assert store.commit() == []  # nothing written since
    # one more alert on cart: that alert and cart's head, nothing of the other five
    handler.correlate_batch([(_numbered(10, "cart", "cart-9"), 10)], store)
    out2 = _docs(store.commit())
    cart = heads[0][0]
    (new_alert,) = [k for k in out2 if ALERT_SEP in k]
    assert len(out2) == 3 and out2[new_alert]["p"] is None and out2[new_alert]["s"]["fingerprint"] == "cart-9"
    assert out2[cart]["b"] == 2 and out2[cart]["p"] == heads[0][1]["s"] and out2[cart]["s"]["version"] == 6
    # an alert that changes (resolved): its record names the value it replaces
    resolved = _numbered(11, "cart", "cart-9").model_copy(update={"status": "resolved"})
    handler.correlate_batch([(resolved, 11)], store)
    out3 = _docs(store.commit())
    assert out3[new_alert]["p"] == out2[new_alert]["s"] and out3[new_alert]["s"]["status"] == "resolved"
    assert len(out3) == 3
    # the records recover to the live state
    table: dict = {}
    apply_records(table, out + list(_records(out2)) + list(_records(out3)))
    again = BatchLogStore()
    assert again.load(table) == [] and dict(again.incidents) == dict(store.incidents)
    assert again.get_incident(cart.decode()) == store.get_incident(cart.decode())


def _records(docs: dict[bytes, dict]) -> list:
    return [(k, orjson.dumps(d)) for k, d in docs.items()]


def test_an_incomplete_batch_is_rolled_back_and_an_incident_it_opened_is_dropped(handler):
    store = BatchLogStore()
    log = _run(handler, store, [])  # nothing
    handler.correlate_batch([(_numbered(0, "cart", "cart-0"), 0)], store)
    log += store.commit()
    handler.correlate_batch([(_numbered(1, "cart", "cart-1"), 1), (_numbered(2, "ad", "ad-0"), 2)], store)
    second = store.commit()
    log += second[:-1]  # the crash took the marker
    recovered, rollback = _recover(log, len(log))
    (cart_id,) = [k for k in recovered.incidents]
    assert recovered.incidents[cart_id]["version"] == 1  # the cart incident as batch 1 left it; ad's is gone
    assert list(recovered.incidents[cart_id]["alerts"]) == ["alertmanager\x1fcart-0"]
    undone = dict(rollback)
    assert rollback[-1][0] == MARKER_KEY and len(rollback) == 5  # cart-1, cart's head, ad-0, ad's head; marker
    assert orjson.loads(undone[cart_id.encode()])["s"]["version"] == 1  # restored
    dropped = [k for k, v in undone.items() if v is None]
    assert len(dropped) == 3 and all(not k.startswith(cart_id.encode()) or k.endswith(b"cart-1") for k in dropped)
    assert orjson.loads(undone[MARKER_KEY])["b"] == 3  # above every batch number seen
    again, more = _recover(log + rollback, len(log + rollback))
    assert more == [] and dict(again.incidents) == dict(recovered.incidents)


def _whole_incident_tables(handler) -> tuple[MemoryStore, list[dict]]:
    """The state of two incidents (one of 3 alerts) as the two earlier workers wrote it: whole incidents."""
    old = MemoryStore()
    handler.correlate_batch([(_numbered(i, "cart", f"cart-{i}"), i) for i in range(3)]
                            + [(_numbered(5, "ad", "ad-0"), 5)], old)
    per_alert = {iid.encode(): orjson.dumps(d) for iid, d in old.incidents.items()}
    batched = {iid.encode(): orjson.dumps({"b": 4, "p": None, "s": d}) for iid, d in old.incidents.items()}
    batched[MARKER_KEY] = b'{"b":4}'
    return old, [per_alert, batched]


@pytest.mark.parametrize("era", [0, 1], ids=["per-alert worker", "whole-incident batches"])
def test_an_earlier_workers_whole_incidents_load_and_are_rewritten_as_heads_and_alerts(handler, era):
    old, tables = _whole_incident_tables(handler)
    table = dict(tables[era])
    store = BatchLogStore()
    rewrite = store.load(table)
    assert _current(store) == _current(old) and store.alert_index == old.alert_index
    assert rewrite[-1][0] == MARKER_KEY and len(rewrite) == 3 + 1 + 1 + 1 + 1  # 4 alerts, 2 heads, marker
    for k, v in rewrite[:-1]:
        doc = orjson.loads(v)
        assert doc["p"] == doc["s"] and "alerts" not in doc["s"]
    # a crash anywhere in the rewrite: the next recovery finds the same state (and rewrites what is left)
    for cut in range(len(rewrite) + 1):
        crashed = dict(table)
        apply_records(crashed, rewrite[:cut])
        again = BatchLogStore()
        more = again.load(crashed)
        assert _current(again) == _current(old), cut
        apply_records(crashed, more)
        final = BatchLogStore()
        assert final.load(crashed) == [] and _current(final) == _current(old)
        assert dict(final.incidents) == dict(old.incidents)


def test_an_unreadable_record_stops_the_worker_with_a_reason():
    with pytest.raises(StateLogError, match="not a state record"):
        BatchLogStore().load({b"inc-1": b"\x00garbage"})


def test_a_failing_record_leaves_no_damage_in_the_live_incidents(deps):
    from tests.unit.test_sensing_batching import _Failing

    good = IncidentHandler(Correlator(deps), Redactor(b"unit-test-pseudonym-key-000001"))
    store, expected = BatchLogStore(), MemoryStore()
    first = [(_numbered(i, "cart", f"cart-{i}"), i) for i in range(3)]
    good.correlate_batch(first, store)
    store.commit()
    for record, seq in first:
        good.correlate(record, expected, sequence=seq)
    # the next batch reads the live incident, damages it in place and raises on ev-4; the others must still apply
    failing = IncidentHandler(_Failing(deps, "ev-4"), Redactor(b"unit-test-pseudonym-key-000001"))
    second = [(_numbered(i, "cart", f"cart-{i}"), i) for i in range(3, 6)]
    result = failing.correlate_batch(second, store)
    store.commit()
    assert isinstance(result.outcomes[1], RuntimeError)
    for record, seq in second[:1] + second[2:]:
        good.correlate(record, expected, sequence=seq)
    assert _current(store) == _current(expected)
    (iid,) = list(store.incidents)
    assert len(store.get_incident(iid).alerts) == 5  # the live object too, not only the bytes


def test_the_correlation_state_makes_no_cyclic_garbage(deps):
    """The correlator makes its full garbage collections itself, under load only every few minutes
    (pilothouse.bus.runtime.CollectionSchedule): its state must be freed by reference counting alone. Incidents
    evicted from the live set and decoded again, evidence items evicted from their cache, alerts replaced by new
    refs (resolved, fired again): none of it may be left in a reference cycle, which only a full collection frees."""
    import dataclasses
    import gc

    from pilothouse.sensing.correlation import CorrelationRules
    from tests.unit.test_sensing_correlation import MIN, FakeClock, alert

    handler = IncidentHandler(Correlator(deps, CorrelationRules(group_window_ms=15 * MIN)),
                              Redactor(b"unit-test-pseudonym-key-000001"))
    handler.alert_items.max_items = 300  # evicted as the run goes on
    store, clock, rng = BatchLogStore(live_max=20), FakeClock(), random.Random(7)
    events = []
    for i in range(3000):  # 150 services outside the map, 5 fingerprints each, firing and resolving
        clock.advance(rng.choice([0, 0, 0, 1000]))
        k = rng.randrange(150)
        status = "resolved" if rng.random() < 0.2 else "firing"
        ev = alert(clock, f"fp{k}-{rng.randrange(5)}", f"svc-{k}", status, event_id=f"nocycle-{i}")
        events.append(dataclasses.replace(ev, sequence=i))

    def run(batch):
        result = handler.correlate_batch([(_record(ev), ev.sequence) for ev in batch], store)
        store.commit()
        for inc in result.incidents:
            handler.encoded_incident_record(inc)

    run(events[:100])  # warm: the caches, lazily built modules
    gc.collect()
    gc.disable()
    try:
        for start in range(100, len(events), 25):
            run(events[start:start + 25])
        assert len(store._live) == 20 and len(handler.alert_items) <= 300  # evictions happened
        assert gc.collect() == 0
    finally:
        gc.enable()
