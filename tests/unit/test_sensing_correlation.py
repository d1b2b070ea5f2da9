"""Correlation of alerts into incidents (pure domain logic; time from a fake clock)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
from pilothouse.sensing.correlation import (
    AlertInput,
    CorrelationRules,
    Correlator,
    DependencyMap,
    DependencyMapError,
    Incident,
    MemoryStore,
    incident_id_for,
)

MIN = 60_000


class FakeClock:
    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


@pytest.fixture
def deps() -> DependencyMap:
    return DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


_ids = itertools.count()


def alert(clock: FakeClock, fp: str, service: str, status: str = "firing", *, severity: str = "warning",
          source: str = "alertmanager", labels: dict | None = None, event_id: str | None = None) -> AlertInput:
    return AlertInput(event_id=event_id or f"ev-{next(_ids)}", source=source, fingerprint=fp, status=status,
                      severity=severity, service=service, summary=f"{fp} on {service}",
                      received_at_ms=clock.now, labels=labels or {})


def test_default_dependency_map_is_the_fleet_graph(deps):
    # written out from infra/fleet/README.md ("Graph"), independently of the YAML file
    assert ("frontend", "checkout") in deps.edges and ("checkout", "payment") in deps.edges
    assert ("cart", "redis") in deps.edges and ("recommendation", "productcatalog") in deps.edges
    assert len(deps.edges) == 7 + 6 + 1 + 1
    assert deps.neighbours("payment", 1) == ["payment", "checkout"]
    assert deps.depends_on("frontend", "redis") and not deps.depends_on("redis", "frontend")


@pytest.mark.parametrize("text, where", [
    ("edges: {a: [b]}", "version: 1"),
    ("version: 1\nedges: {a: b}", "edges.a"),
    ("version: 1\nedges: [a, b]", "version: 1"),
    ("version: 1\nedges: {a: [1]}", "edges.a"),
    ("{{", "not YAML"),
])
def test_a_bad_dependency_map_is_refused_with_the_place(text, where):
    with pytest.raises(DependencyMapError, match=where.replace("{", r"\{")):
        DependencyMap.from_yaml(text)


def test_a_repeated_firing_alert_is_deduplicated(deps, clock):
    c, store = Correlator(deps), MemoryStore()
    first = c.apply(alert(clock, "fp1", "cart"), store)
    clock.advance(MIN)
    again = c.apply(alert(clock, "fp1", "cart"), store)
    assert first.kind == "opened" and first.incident.version == 1
    assert again.kind == "unchanged" and not again.emits
    assert store.get_incident(first.incident.incident_id).version == 1


def test_same_fingerprint_from_two_sources_is_two_alerts(deps, clock):
    c, store = Correlator(deps), MemoryStore()
    a = c.apply(alert(clock, "fp1", "cart", source="alertmanager"), store)
    b = c.apply(alert(clock, "fp1", "cart", source="grafana"), store)
    assert b.kind == "updated" and b.incident.incident_id == a.incident.incident_id
    assert len(b.incident.alerts) == 2 and b.incident.fingerprints == ["fp1"]


def test_neighbours_in_the_window_share_an_incident_others_do_not(deps, clock):
    c, store = Correlator(deps), MemoryStore()
    front = c.apply(alert(clock, "f1", "frontend"), store)
    clock.advance(2 * MIN)
    check = c.apply(alert(clock, "c1", "checkout", severity="critical"), store)
    pay = c.apply(alert(clock, "p1", "payment"), store)  # neighbour of checkout, two hops from frontend
    redis = c.apply(alert(clock, "r1", "redis"), store)  # two hops from frontend, not a neighbour of checkout
    assert check.kind == "updated" and check.incident.incident_id == front.incident.incident_id
    assert pay.incident.incident_id == front.incident.incident_id  # joins via checkout, which is in the incident
    assert redis.kind == "opened" and redis.incident.incident_id != front.incident.incident_id
    inc = store.get_incident(front.incident.incident_id)
    assert inc.services == ["checkout", "frontend", "payment"]
    assert inc.severity == "critical"
    assert inc.primary_service(deps) == "payment"  # the most downstream service of the incident
    assert inc.title(deps).startswith("payment: p1 on payment (+2 related alerts)")


def test_zero_hops_groups_only_the_same_service(deps, clock):
    c, store = Correlator(deps, CorrelationRules(topology_hops=0)), MemoryStore()
    a = c.apply(alert(clock, "a", "frontend"), store)
    b = c.apply(alert(clock, "b", "checkout"), store)
    d = c.apply(alert(clock, "d", "frontend"), store)
    assert b.kind == "opened" and d.incident.incident_id == a.incident.incident_id


def test_a_neighbour_alert_after_the_window_opens_a_new_incident(deps, clock):
    c, store = Correlator(deps, CorrelationRules(group_window_ms=5 * MIN)), MemoryStore()
    a = c.apply(alert(clock, "f1", "frontend"), store)
    clock.advance(5 * MIN + 1)
    b = c.apply(alert(clock, "c1", "checkout"), store)
    assert b.kind == "opened" and b.incident.incident_id != a.incident.incident_id


def test_scope_label_keeps_clusters_apart(deps, clock):
    c, store = Correlator(deps, CorrelationRules(scope_label="cluster")), MemoryStore()
    a = c.apply(alert(clock, "f1", "frontend", labels={"cluster": "eu"}), store)
    b = c.apply(alert(clock, "f2", "frontend", labels={"cluster": "us"}), store)
    d = c.apply(alert(clock, "f3", "checkout", labels={"cluster": "eu"}), store)
    assert b.incident.incident_id != a.incident.incident_id
    assert d.incident.incident_id == a.incident.incident_id


def test_lifecycle_open_update_resolve_reopen_and_new_after_window(deps, clock):
    c = Correlator(deps, CorrelationRules(reopen_window_ms=10 * MIN))
    store = MemoryStore()
    kinds = []

    def step(*args, **kw):
        out = c.apply(alert(clock, *args, **kw), store)
        kinds.append((out.kind, out.incident.version if out.incident else None,
                      out.incident.state if out.incident else None))
        episodes.append(out.incident.episode if out.incident else None)
        return out

    episodes = []

    first = step("a", "cart")
    step("b", "redis")
    clock.advance(MIN)
    step("a", "cart", "resolved")
    step("b", "redis", "resolved")
    clock.advance(9 * MIN)
    step("a", "cart")  # fires again inside the reopen window
    clock.advance(MIN)
    step("a", "cart", "resolved")
    clock.advance(10 * MIN + 1)
    late = step("a", "cart")  # after the window: a new incident
    assert kinds == [("opened", 1, "open"), ("updated", 2, "open"), ("updated", 3, "open"),
                     ("resolved", 4, "resolved"), ("reopened", 5, "open"), ("resolved", 6, "resolved"),
                     ("opened", 1, "open")]
    assert episodes == [1, 1, 1, 1, 2, 2, 1]  # the re-open starts episode 2; a new incident starts at 1
    assert Incident.from_dict(store.get_incident(first.incident.incident_id).to_dict()).episode == 2
    assert late.incident.incident_id != first.incident.incident_id
    assert store.get_alert_index(late.incident and next(iter(late.incident.alerts))) == late.incident.incident_id


def test_a_resolved_alert_never_seen_firing_is_ignored(deps, clock):
    out = Correlator(deps).apply(alert(clock, "x", "cart", "resolved"), MemoryStore())
    assert out.kind == "ignored" and out.incident is None and "never seen firing" in out.reason


def test_a_replayed_event_re_emits_the_same_version(deps, clock):
    c, store = Correlator(deps), MemoryStore()
    ev = alert(clock, "a", "cart")
    first = c.apply(ev, store)
    again = c.apply(ev, store)
    assert again.kind == "replayed" and again.emits
    assert again.incident.version == first.incident.version == 1
    assert first.incident.incident_id == incident_id_for(ev.event_id)


def test_incident_size_is_bounded(deps, clock):
    c, store = Correlator(deps, CorrelationRules(max_alerts_per_incident=3)), MemoryStore()
    outs = [c.apply(alert(clock, f"a{i}", "cart"), store) for i in range(5)]
    assert len({o.incident.incident_id for o in outs[:3]}) == 1
    assert outs[3].kind == "opened" and outs[4].incident.incident_id == outs[3].incident.incident_id


class LossyStore(MemoryStore):
    """A store whose last writes can be lost, as after a crash between changelog writes (any subset)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, object]] = []

    def put_incident(self, incident):
        self.log.append(("incidents", incident.incident_id, incident.to_dict()))

    def put_alert_index(self, key, incident_id):
        self.log.append(("alert_index", key, incident_id))

    def put_service_index(self, scoped, incident_id):
        self.log.append(("service_index", scoped, incident_id))

    def get_incident(self, incident_id):
        self._apply_log()
        return super().get_incident(incident_id)

    def get_alert_index(self, key):
        self._apply_log()
        return super().get_alert_index(key)

    def get_service_index(self, scoped):
        self._apply_log()
        return super().get_service_index(scoped)

    def _apply_log(self):
        for table, key, value in self.log:
            getattr(self, table)[key] = value
        self.log.clear()

    def crash(self, rng: random.Random) -> None:
        """Drop a random subset of the writes not yet applied (they never reached the changelog)."""
        self.log = [w for w in self.log if rng.random() < 0.5]
        self._apply_log()


@pytest.mark.parametrize("seed", range(60))
def test_replay_after_a_crash_with_lost_writes_neither_loses_nor_duplicates(deps, seed):
    rng = random.Random(seed)
    clock = FakeClock()
    services = ["frontend", "checkout", "payment", "cart", "redis", "ad", "email"]
    events = []
    for i in range(30):
        clock.advance(rng.randint(0, 3 * MIN))
        fp = f"fp{rng.randint(0, 12)}"
        status = "resolved" if rng.random() < 0.3 else "firing"
        ev = alert(clock, fp, services[int(fp[2:]) % len(services)], status, event_id=f"e{seed}-{i}")
        events.append(dataclasses.replace(ev, sequence=i))  # the Kafka offset of the record

    reference = MemoryStore()
    for ev in events:
        Correlator(deps).apply(ev, reference)

    store = LossyStore()
    c = Correlator(deps)
    crash_at = rng.randint(1, len(events))
    committed = rng.randint(max(0, crash_at - 6), crash_at)  # offsets committed before the crash
    for i, ev in enumerate(events[:crash_at]):
        c.apply(ev, store)
        if i + 1 == committed:
            store._apply_log()  # Faust flushes the changelog before it commits offsets: these writes are durable
        elif rng.random() < 0.3:
            store._apply_log()  # some later writes reached the changelog too
    store.crash(rng)
    store.rebuild_indexes()  # only incidents are persisted: the restarted worker derives its indexes from them
    for ev in events[committed:]:  # the restarted worker resumes at the committed offset
        c.apply(ev, store)
    store._apply_log()

    def current(s: MemoryStore) -> dict[str, tuple]:
        return {iid: (inc["version"], inc["state"], sorted(inc["alerts"])) for iid, inc in s.incidents.items()}

    # Deterministic ids and versions: the crashed-and-replayed run ends in exactly the reference state,
    # so no incident is lost or duplicated and every alert belongs to exactly one incident.
    assert current(store) == current(reference)
    assert store.alert_index == reference.alert_index
    owners = [key for inc in store.incidents.values() for key in inc["alerts"]]
    assert len(owners) == len(set(owners)) or _reopened_elsewhere(store)


def _reopened_elsewhere(store: MemoryStore) -> bool:
    # an alert that fired again after the reopen window is in its old (resolved) incident and in a new one:
    # it belongs to one *current* incident, the one the index points to
    for key, iid in store.alert_index.items():
        holders = [i for i, inc in store.incidents.items() if key in inc["alerts"]]
        if len(holders) > 1 and any(store.incidents[h]["state"] == "open" and h != iid for h in holders):
            return False
    return True


def test_downstream_covers_callees_within_hops_only():
    from pilothouse.sensing.correlation import DependencyMap

    deps = DependencyMap.from_yaml("version: 1\nedges:\n  a: [b]\n  b: [c]\n  c: [d]\n  x: [a]\n")
    assert deps.downstream(["a"], 2) == ["a", "b", "c"]
    assert deps.downstream(["b", "a"], 1) == ["b", "a", "c"]
    assert deps.downstream(["d"], 3) == ["d"]  # callers are not pulled in


def test_topology_carries_the_direct_callers_of_the_incidents_own_services():
    """A failing dependency is mitigated at its caller: the incident names the caller from its first version, before
    the caller's own alert joins; callers of services that are only in the evidence scope are not added."""
    deps = DependencyMap.from_yaml("version: 1\nedges:\n  front: [cart]\n  cart: [redis]\n  redis: [disk]\n"
                                   "  other: [disk]\n")
    assert deps.topology(["redis"], ["redis", "disk"]) == [("cart", "redis"), ("redis", "disk")]
    assert deps.topology(["cart", "redis"], ["cart", "redis", "disk"]) == [
        ("cart", "redis"), ("front", "cart"), ("redis", "disk")]
    assert deps.topology([], ["redis", "disk"]) == [("redis", "disk")]  # the evidence scope alone, as before


def _walked_views(alerts):
    """The derived views by a plain walk over every alert (what Incident computed per update before they were kept
    up to date alert by alert): services, fingerprints, severity, each service's lead alert."""
    rank = {"critical": 4, "error": 3, "warning": 2, "info": 1, "unknown": 0}
    leads = {}
    for a in alerts.values():
        held = leads.get(a.service)
        if held is None or (a.first_seen, a.fingerprint) < (held.first_seen, held.fingerprint):
            leads[a.service] = a
    firing = [a.severity for a in alerts.values() if a.status == "firing"]
    pool = firing or [a.severity for a in alerts.values()]
    severity = max(pool, key=lambda s: rank.get(s, 0)) if pool else "unknown"  # max(): the first of the highest
    return (sorted(s for s in leads if s), sorted({a.fingerprint for a in alerts.values()}), severity, leads,
            all(a.status == "resolved" for a in alerts.values()))


@pytest.mark.parametrize("seed", range(6))
def test_views_kept_alert_by_alert_equal_a_walk_over_every_alert(seed):
    """Incident's views (services, fingerprints, severity, leads, all-resolved) are kept up to date per alert write
    (AlertMap): after any mix of writes, replacements that change the lead, deletes, ``update``, ``pop`` and a plain
    dict assigned in place, they must equal a walk over every alert, ties included (same first_seen and
    fingerprint from two sources; severities outside the ranking)."""
    from pilothouse.sensing.correlation import AlertMap, AlertRef

    rnd = random.Random(seed)
    inc = Incident("inc-x", 1, "open", "opened", "", 0, 0, None, {}, "e0")

    def ref(k: int, **changes) -> AlertRef:
        base = AlertRef(rnd.choice(["am", "pd"]), f"fp-{k % 7}", rnd.choice(["cart", "ad", "", "frontend"]),
                        rnd.choice(["firing", "firing", "resolved"]),
                        rnd.choice(["critical", "warning", "info", "unknown", "weird", "page"]), f"s{k}",
                        rnd.choice([0, 5, 5, 9]), 10, f"e{k}")
        return dataclasses.replace(base, **changes)

    gone_seen = 0
    for step in range(400):
        op = rnd.random()
        keys = list(inc.alerts)
        token = inc.alerts.append_token() if isinstance(inc.alerts, AlertMap) else None
        if op < 0.45 or not keys:  # a new alert
            k = rnd.randrange(60)
            inc.alerts[f"k{k}"] = ref(k)
        elif op < 0.8:  # what the correlator does: a new state of the same alert
            key = rnd.choice(keys)
            old = inc.alerts[key]
            inc.alerts[key] = dataclasses.replace(old, status=rnd.choice(["firing", "resolved"]),
                                                  severity=rnd.choice(["critical", "error", "weird"]),
                                                  summary="changed", last_event_id=f"x{step}")
        elif op < 0.87:  # a replacement that moves the alert (its service or first_seen): views built afresh
            key = rnd.choice(keys)
            inc.alerts[key] = dataclasses.replace(inc.alerts[key], service=rnd.choice(["cart", "db"]),
                                                  first_seen=rnd.choice([0, 1, 9]))
        elif op < 0.92:
            del inc.alerts[rnd.choice(keys)]
        elif op < 0.95:
            inc.alerts.pop(rnd.choice(keys))
        elif op < 0.98:
            inc.alerts.update({f"u{step}": ref(step)})
        else:
            inc.alerts = dict(inc.alerts)  # a plain dict: no views kept, built from a walk at each read
        # the same token: no key has gone (what the evidence cache relies on to skip looking for gone keys)
        if isinstance(inc.alerts, AlertMap) and inc.alerts.append_token() is token:
            assert all(k in inc.alerts for k in keys)
        gone_seen += not all(k in inc.alerts for k in keys)
        services, fingerprints, severity, leads, all_resolved = _walked_views(inc.alerts)
        assert inc.services == services
        assert inc.fingerprints == fingerprints
        assert inc.severity == severity
        assert inc._scan().leads == leads
        assert inc.all_resolved() == all_resolved
    assert isinstance(Incident.from_dict(inc.to_dict()).alerts, AlertMap)  # a loaded incident keeps its views
    assert gone_seen > 10  # the token's question came up
