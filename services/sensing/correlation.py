"""Correlation of alerts into incidents: deduplication, grouping, lifecycle. Pure: no I/O, no clock.

Time comes from the alert (its ``received_at``, stamped by the gateway), so replaying the same alerts gives the same
incidents, the same ids and the same versions — which is what makes a restart of the correlation worker safe.

Rules, in order, for one alert (deduplication key: ``(source, fingerprint)``):

1. **Replay.** The alert's ``event_id`` is already recorded on its incident: it was applied before a crash. Nothing
   changes; the incident's current state is emitted again (same version: consumers keep the highest version, so a
   repeated version is harmless). Only incidents need persisting: the alert and service indexes are derived from
   them after a restart (``MappingStore.rebuild_indexes``; service-index writes stamp the incident with a mark).
2. **Known fingerprint, open incident.** firing→firing and resolved→resolved are duplicates (``unchanged``: Alertmanager
   re-sends firing alerts every ``repeat_interval``). firing→resolved marks the alert resolved; when every alert of
   the incident is resolved the incident is ``resolved``, otherwise ``updated``. resolved→firing is ``updated``.
3. **Known fingerprint, resolved incident.** Firing again within ``reopen_window_ms`` of the resolution:
   ``reopened``. Later: treated as a new alert (rule 4). A resolved alert for a resolved incident is ``unchanged``.
4. **New alert.** Firing: it joins the open incident, seen within ``group_window_ms``, of its own service or of a
   service at most ``topology_hops`` dependency hops away (same ``scope_label`` value, if one is configured); the most
   recently active candidate wins, ties by incident id. None: a new incident is ``opened``, with an id derived from
   the alert's event id (deterministic). A resolved alert nobody saw firing is ``ignored`` (and counted).

Incident state is bounded: at most ``max_alerts_per_incident`` alerts; beyond it a new incident is opened.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import deque
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol

import yaml

from pilothouse.bus.errors import ConfigurationError

Change = Literal["opened", "updated", "resolved", "reopened"]
OutcomeKind = Literal["opened", "updated", "resolved", "reopened", "replayed", "unchanged", "ignored"]
SEVERITY_RANK = {"critical": 4, "error": 3, "warning": 2, "info": 1, "unknown": 0}


class DependencyMapError(ConfigurationError):
    """The dependency map file is not a valid ``{version: 1, edges: {caller: [callee, ...]}}`` document."""


# ---------------------------------------------------------------------------------------------------- topology

@dataclass(frozen=True)
class DependencyMap:
    """Who calls whom. Grouping uses it undirected (a failing callee alerts its callers too); the primary service of
    an incident is the one that depends on no other service of the incident (the most downstream)."""

    edges: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def from_yaml(cls, text: str, where: str = "dependency map") -> DependencyMap:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DependencyMapError(f"{where}: not YAML: {e}") from e
        if not isinstance(doc, Mapping) or doc.get("version") != 1 or not isinstance(doc.get("edges"), Mapping):
            raise DependencyMapError(f"{where}: expected {{version: 1, edges: {{caller: [callee, ...]}}}}")
        edges = set()
        for caller, callees in doc["edges"].items():
            if not isinstance(caller, str) or not caller:
                raise DependencyMapError(f"{where}: edges: caller {caller!r} is not a service name")
            if not isinstance(callees, list) or not all(isinstance(c, str) and c for c in callees):
                raise DependencyMapError(f"{where}: edges.{caller}: expected a list of service names")
            edges.update((caller, c) for c in callees if c != caller)
        return cls(frozenset(edges))

    def to_yaml(self) -> str:
        out: dict[str, list[str]] = {}
        for caller, callee in sorted(self.edges):
            out.setdefault(caller, []).append(callee)
        return yaml.safe_dump({"version": 1, "edges": out}, sort_keys=True)

    def neighbours(self, service: str, hops: int) -> list[str]:
        """``service`` and every service within ``hops`` edges (either direction), sorted, service first."""
        adj = self._adjacency()
        seen = {service}
        frontier = deque([(service, 0)])
        while frontier:
            node, dist = frontier.popleft()
            if dist == hops:
                continue
            for nxt in adj.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append((nxt, dist + 1))
        return [service, *sorted(seen - {service})]

    def depends_on(self, caller: str, callee: str) -> bool:
        """True if ``caller`` (transitively) calls ``callee``."""
        out = self._out()
        stack, seen = [caller], {caller}
        while stack:
            for nxt in out.get(stack.pop(), ()):
                if nxt == callee:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    def downstream(self, services: Iterable[str], hops: int) -> list[str]:
        """``services`` plus everything they call within ``hops`` edges (sorted after the originals).

        Evidence looks here too: an alert usually fires on the caller first (users see the frontend fail) while the
        cause sits in a callee that has not alerted yet; without the callee's metrics no engine could point at it.
        """
        out = self._out()
        start = list(dict.fromkeys(services))
        seen = set(start)
        frontier = [(s, 0) for s in start]
        while frontier:
            node, dist = frontier.pop()
            if dist == hops:
                continue
            for nxt in out.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append((nxt, dist + 1))
        return start + sorted(seen - set(start))

    def topology(self, services: Iterable[str], scope: Iterable[str]) -> list[tuple[str, str]]:
        """The edges an incident carries: those among its evidence ``scope``, plus the direct callers of its own
        ``services`` (sorted). A caller is where a failing dependency is mitigated (its fallback, its retries):
        knowing it must not wait until the caller's own alert joins the incident."""
        own, inside = set(services), set(scope)
        return sorted(e for e in self.edges if e[1] in inside and (e[0] in inside or e[1] in own))

    def _adjacency(self) -> dict[str, set[str]]:
        cached = self.__dict__.get("_adj")
        if cached is None:
            cached = {}
            for a, b in self.edges:
                cached.setdefault(a, set()).add(b)
                cached.setdefault(b, set()).add(a)
            object.__setattr__(self, "_adj", cached)
        return cached

    def _out(self) -> dict[str, set[str]]:
        cached = self.__dict__.get("_outm")
        if cached is None:
            cached = {}
            for a, b in self.edges:
                cached.setdefault(a, set()).add(b)
            object.__setattr__(self, "_outm", cached)
        return cached


@dataclass(frozen=True)
class CorrelationRules:
    group_window_ms: int = 15 * 60_000
    reopen_window_ms: int = 30 * 60_000
    topology_hops: int = 1
    max_alerts_per_incident: int = 500
    scope_label: str | None = None  # e.g. "cluster": alerts of different clusters never share an incident


# ---------------------------------------------------------------------------------------------------- state

@dataclass(frozen=True)
class AlertInput:
    """The fields of an AlertReceived that correlation reads."""

    event_id: str
    source: str
    fingerprint: str
    status: Literal["firing", "resolved"]
    severity: str
    service: str
    summary: str
    received_at_ms: int
    labels: Mapping[str, str] = field(default_factory=dict)
    #: position of the alert in its source partition (the Kafka offset): every alert key lives in one partition,
    #: so a replayed record has a sequence at or below the last one applied for its key. -1: unknown.
    sequence: int = -1

    @property
    def key(self) -> str:
        return dedup_key(self.source, self.fingerprint)


def dedup_key(source: str, fingerprint: str) -> str:
    """The deduplication key of an alert: its source and its fingerprint within that source."""
    return f"{source}\x1f{fingerprint}"


@dataclass(frozen=True)
class AlertRef:
    """One alert as the incident remembers it. Frozen: a change is a new ref put in the incident's :class:`AlertMap`
    (which keeps the incident's views up to date; the evidence cache finds changed alerts by the ref's identity)."""

    source: str
    fingerprint: str
    service: str
    status: str
    severity: str
    summary: str
    first_seen: int
    last_seen: int
    last_event_id: str
    last_sequence: int = -1

    def already_applied(self, alert: AlertInput) -> bool:
        """This alert record (or a later one of the same key) is already in the state: a replay."""
        if alert.event_id == self.last_event_id:
            return True
        return alert.sequence >= 0 and alert.sequence <= self.last_sequence


@dataclass(frozen=True, slots=True)
class IncidentView:
    """The views of an incident that its IncidentUpdated carries (:meth:`Incident.view`)."""

    services: list[str]  # sorted, non-empty names
    fingerprints: list[str]  # sorted, distinct
    severity: str  # the highest of the firing alerts (of all alerts when none fires)
    primary_service: str  # the most downstream service (see Incident.view); "unknown" without services
    title: str


@dataclass(frozen=True, slots=True)
class _Scan:
    services: list[str]
    fingerprints: list[str]
    severity: str
    leads: dict[str, AlertRef]
    lead: AlertRef | None


class _Views:
    """What an incident's derived views are made of, kept up to date one alert write at a time (see
    :class:`AlertMap`), so an update no longer walks every alert of its incident: at 75 alerts the walk cost ~75 us
    per update, O(n) per update and O(n^2) over an incident's life."""

    __slots__ = ("fingerprints", "_fp_count", "leads", "services", "_all", "_firing", "unresolved")

    def __init__(self) -> None:
        self.fingerprints: list[str] = []  # sorted, distinct
        self._fp_count: dict[str, int] = {}  # fingerprint -> alerts that have it (sources may share one)
        # service -> dedup key of its lead: its first alert by (first_seen, fingerprint), the earlier-written on a
        # tie (as a walk in the map's order finds it)
        self.leads: dict[str, str] = {}
        self.services: list[str] = []  # sorted, non-empty names
        self._all: dict[str, int] = {}  # severity -> alerts of it
        self._firing: dict[str, int] = {}  # severity -> firing alerts of it
        self.unresolved = 0  # alerts whose status is not "resolved"

    def write(self, key: str, old: AlertRef | None, new: AlertRef, alerts: Mapping[str, AlertRef]) -> bool:
        """Account for ``alerts[key]`` going from ``old`` (None: a new key) to ``new`` (already in ``alerts``).
        False: this change cannot be accounted for incrementally (the views must be built afresh)."""
        if old is not None:
            if (old.service, old.first_seen, old.fingerprint) != (new.service, new.first_seen, new.fingerprint):
                return False  # the lead of a service could change to any other alert: not what the correlator does
            self._count(old, -1)
            self._count(new, +1)
            return True
        self._count(new, +1)
        count = self._fp_count.get(new.fingerprint, 0)
        if count == 0:
            bisect.insort(self.fingerprints, new.fingerprint)
        self._fp_count[new.fingerprint] = count + 1
        held_key = self.leads.get(new.service)
        if held_key is None:
            self.leads[new.service] = key
            if new.service:
                bisect.insort(self.services, new.service)
        else:
            held = alerts[held_key]
            if (new.first_seen, new.fingerprint) < (held.first_seen, held.fingerprint):
                self.leads[new.service] = key
        return True

    def _count(self, ref: AlertRef, step: int) -> None:
        for counts, counted in ((self._all, True), (self._firing, ref.status == "firing")):
            if counted:
                n = counts.get(ref.severity, 0) + step
                if n:
                    counts[ref.severity] = n
                else:
                    del counts[ref.severity]
        if ref.status != "resolved":
            self.unresolved += step

    def severity(self, alerts: Mapping[str, AlertRef]) -> str:
        """The highest severity of the firing alerts, or of all alerts when none fires ("unknown" without alerts);
        between severities of the same rank (names outside SEVERITY_RANK), the first alert's."""
        firing = bool(self._firing)
        counts = self._firing if firing else self._all
        if not counts:
            return "unknown"
        rank_of = SEVERITY_RANK.get
        top = max(rank_of(s, 0) for s in counts)
        tied = [s for s in counts if rank_of(s, 0) == top]
        if len(tied) == 1:
            return tied[0]
        return next(a.severity for a in alerts.values()
                    if rank_of(a.severity, 0) == top and (a.status == "firing" or not firing))


class AlertMap(dict):
    """An incident's alerts (dedup key -> :class:`AlertRef`) with the incident's :class:`_Views`, kept up to date
    by every ``map[key] = ref``; any other change (a delete, ``update``, ...) drops them, to be built afresh from
    every alert at the next read."""

    __slots__ = ("_views",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._views: _Views | None = None

    def __setitem__(self, key: str, ref: AlertRef) -> None:
        old = self.get(key)
        super().__setitem__(key, ref)
        if self._views is not None and not self._views.write(key, old, ref, self):
            self._views = None

    def append_token(self) -> object:
        """An object that stays the same (``is``) while the map only gains keys or has alerts written again in
        place; after any other change (a delete, ``update``, ...) the map hands out a new one. A holder of a token
        knows, if it gets the same one later, that no key it saw has gone."""
        return self.views()

    def views(self) -> _Views:
        if self._views is None:
            views = _Views()
            for key, ref in self.items():
                views.write(key, None, ref, self)
            self._views = views
        return self._views

    def _dropping_views(name: str):  # noqa: N805 - builds the methods below
        method = getattr(dict, name)

        def drop(self: AlertMap, *args: Any, **kwargs: Any) -> Any:
            self._views = None
            return method(self, *args, **kwargs)
        drop.__name__ = name
        return drop

    __delitem__ = _dropping_views("__delitem__")
    __ior__ = _dropping_views("__ior__")
    pop = _dropping_views("pop")
    popitem = _dropping_views("popitem")
    clear = _dropping_views("clear")
    update = _dropping_views("update")
    setdefault = _dropping_views("setdefault")
    del _dropping_views


@dataclass
class Incident:
    incident_id: str
    version: int
    state: Literal["open", "resolved"]
    change: Change
    scope: str
    first_seen: int
    last_seen: int
    resolved_at: int | None
    alerts: dict[str, AlertRef]  # dedup key -> alert
    causation_id: str  # event id of the alert that caused the latest version
    #: service -> mark (a store-wide counter) of this incident's latest service-index write for that service: the
    #: service index is derived from the incidents after a restart (the highest mark wins), so it never needs
    #: writes of its own that a crash could lose or reorder
    service_marks: dict[str, int] = field(default_factory=dict)
    #: 1 as opened, +1 per re-open: what happens in a later episode is decided afresh downstream
    episode: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.alerts, AlertMap):
            self.alerts = AlertMap(self.alerts)
        #: dedup keys of the alerts changed since a store last wrote the incident (not state, not a field: the
        #: correlator adds the key of every alert it changes, a store that writes alerts one by one takes the set;
        #: see state.BatchLogStore.commit)
        self.changed_alerts: set[str] = set()

    # -- derived views (what IncidentUpdated carries) -------------------------------------------------------------
    # Kept up to date alert by alert (AlertMap), not walked per update: an update needs all of them.
    @property
    def services(self) -> list[str]:
        return list(self._views().services)

    @property
    def severity(self) -> str:
        return self._views().severity(self.alerts)

    @property
    def fingerprints(self) -> list[str]:
        return list(self._views().fingerprints)

    def all_resolved(self) -> bool:
        return self._views().unresolved == 0

    def primary_service(self, deps: DependencyMap) -> str:
        return self.view(deps).primary_service

    def title(self, deps: DependencyMap) -> str:
        return self.view(deps).title

    def view(self, deps: DependencyMap) -> IncidentView:
        """Every derived view of the incident, from one walk over its alerts."""
        scan = self._scan()
        services = scan.services
        if not services:
            primary = "unknown"
        else:
            # the most downstream service: it depends on no other service of the incident; the earliest wins
            roots = [s for s in services if not any(deps.depends_on(s, o) for o in services if o != s)]
            primary = min(roots or services, key=lambda s: (scan.leads[s].first_seen, s))
        lead = scan.leads.get(primary, scan.lead)
        text = lead.summary if lead is not None and lead.summary else "alert"
        more = len(self.alerts) - 1
        title = f"{primary}: {text[:200]}" + (f" (+{more} related alert{'s' if more > 1 else ''})" if more else "")
        return IncidentView(services, scan.fingerprints, scan.severity, primary, title)

    def _views(self) -> _Views:
        # an AlertMap unless somebody assigned a plain dict since (then its views are built afresh, every time)
        alerts = self.alerts if isinstance(self.alerts, AlertMap) else AlertMap(self.alerts)
        return alerts.views()

    def _scan(self) -> _Scan:
        views, alerts = self._views(), self.alerts
        leads = {service: alerts[key] for service, key in views.leads.items()}
        lead = min(leads.values(), key=lambda a: (a.first_seen, a.fingerprint), default=None)
        return _Scan(list(views.services), list(views.fingerprints), views.severity(alerts), leads, lead)

    # -- (de)serialisation for state stores -----------------------------------------------------------------------
    def head(self) -> dict[str, Any]:
        """Every field but the alerts (what state.BatchLogStore writes as the incident's own record); not copies."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "alerts"}

    def to_dict(self) -> dict[str, Any]:
        """The incident as plain data (what the state stores keep): its fields, alerts as dicts (copies)."""
        return {**self.head(), "service_marks": dict(self.service_marks),
                "alerts": {k: dict(a.__dict__) for k, a in self.alerts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Incident:
        # copies: the stored dict must never change behind the store's back (a Faust table would not persist it)
        return cls(**{**d, "alerts": {k: AlertRef(**v) for k, v in d["alerts"].items()},
                      "service_marks": dict(d.get("service_marks", {}))})


class CorrelationStore(Protocol):
    """Where correlation state lives: dicts in memory, Faust tables (changelog-backed) in the service."""

    def get_incident(self, incident_id: str) -> Incident | None: ...
    def put_incident(self, incident: Incident) -> None: ...
    def get_alert_index(self, key: str) -> str | None: ...
    def put_alert_index(self, key: str, incident_id: str) -> None: ...
    def get_service_index(self, scoped_service: str) -> str | None: ...
    def put_service_index(self, scoped_service: str, incident_id: str) -> None: ...
    def next_mark(self) -> int: ...


class MappingStore:
    """A CorrelationStore over three mappings: plain dicts (tests, benchmark) or Faust tables (the worker)."""

    def __init__(self, incidents: MutableMapping[str, Any] | None = None,
                 alert_index: MutableMapping[str, Any] | None = None,
                 service_index: MutableMapping[str, Any] | None = None) -> None:
        self.incidents = {} if incidents is None else incidents
        self.alert_index = {} if alert_index is None else alert_index
        self.service_index = {} if service_index is None else service_index
        self.last_mark = 0  # the service-mark counter (rebuild_indexes restores it from the incidents)

    def get_incident(self, incident_id: str) -> Incident | None:
        d = self.incidents.get(incident_id)
        return Incident.from_dict(d) if d is not None else None

    def put_incident(self, incident: Incident) -> None:
        self.incidents[incident.incident_id] = incident.to_dict()

    def get_alert_index(self, key: str) -> str | None:
        return self.alert_index.get(key)

    def put_alert_index(self, key: str, incident_id: str) -> None:
        self.alert_index[key] = incident_id

    def get_service_index(self, scoped_service: str) -> str | None:
        return self.service_index.get(scoped_service)

    def put_service_index(self, scoped_service: str, incident_id: str) -> None:
        self.service_index[scoped_service] = incident_id

    def next_mark(self) -> int:
        self.last_mark += 1
        return self.last_mark

    def rebuild_indexes(self) -> None:
        """Derive the alert and service indexes (and the mark counter) from the incidents, e.g. after a restart:
        only the incidents are persisted, so the indexes always match the durable state."""
        incidents = [d for d in self.incidents.values() if isinstance(d, Mapping)]
        self.alert_index = alert_index_from(incidents)
        self.service_index, self.last_mark = service_index_from(incidents)


MemoryStore = MappingStore  # the in-memory store is the mapping store over dicts


def alert_index_from(incidents: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The alert index (dedup key -> incident id) that the incidents themselves imply, e.g. after a restart.

    A key held by several incidents (it fired again after the reopen window, into a new incident) belongs to the
    one that took it last: the holder whose record of it is the latest (Kafka offset, then time). The old holder
    is resolved and can no longer change that alert, so this is exactly what the live index points to.
    """
    best: dict[str, tuple[int, int, str]] = {}
    for inc in incidents:
        iid = inc["incident_id"]
        for key, ref in inc["alerts"].items():
            rank = (ref["last_sequence"], ref["last_seen"], iid)
            if key not in best or rank > best[key]:
                best[key] = rank
    return {key: rank[2] for key, rank in best.items()}


def service_index_from(incidents: Iterable[Mapping[str, Any]]) -> tuple[dict[str, str], int]:
    """The service index (scope + service -> incident id) the incidents' service marks imply, and the highest mark.

    Each service-index write stamps the incident with a fresh mark for that service, in the same incident write, so
    the incident with the highest mark for a service is the one the live index points to."""
    best: dict[str, tuple[int, str]] = {}
    top = 0
    for inc in incidents:
        for service, mark in inc.get("service_marks", {}).items():
            key = f"{inc['scope']}\x1f{service}"
            top = max(top, mark)
            if key not in best or (mark, inc["incident_id"]) > best[key]:
                best[key] = (mark, inc["incident_id"])
    return {key: v[1] for key, v in best.items()}, top


_GETTERS = {"incidents": "get_incident", "alert_index": "get_alert_index", "service_index": "get_service_index"}
_PUTTERS = {"alert_index": "put_alert_index", "service_index": "put_service_index"}


class BatchStore:
    """A write-back CorrelationStore in front of another, for one batch of alerts.

    Reads go through once and are kept (as live ``Incident`` objects: no ``from_dict`` per alert); writes stay here
    until :meth:`flush`, which writes every changed key once, in the order the keys first changed. The worker calls
    :meth:`flush_superseded` after every alert and :meth:`flush` after the batch (see
    ``IncidentHandler.correlate_batch`` for why); discard the object instead of flushing it if an alert failed
    half-way.
    """

    def __init__(self, backing: CorrelationStore) -> None:
        self.backing = backing
        self._cache: dict[str, dict[str, Any]] = {"incidents": {}, "alert_index": {}, "service_index": {}}
        self._dirty: dict[tuple[str, str], None] = {}  # (table, key), insertion-ordered
        self._last_incident: str | None = None

    def _get(self, table: str, key: str) -> Any:
        cache = self._cache[table]
        if key not in cache:
            cache[key] = getattr(self.backing, _GETTERS[table])(key)
        return cache[key]

    def _put(self, table: str, key: str, value: Any) -> None:
        self._cache[table][key] = value
        self._dirty[(table, key)] = None

    def get_incident(self, incident_id: str) -> Incident | None:
        return self._get("incidents", incident_id)

    def put_incident(self, incident: Incident) -> None:
        self._put("incidents", incident.incident_id, incident)
        self._last_incident = incident.incident_id

    def get_alert_index(self, key: str) -> str | None:
        return self._get("alert_index", key)

    def put_alert_index(self, key: str, incident_id: str) -> None:
        self._put("alert_index", key, incident_id)

    def get_service_index(self, scoped_service: str) -> str | None:
        return self._get("service_index", scoped_service)

    def put_service_index(self, scoped_service: str, incident_id: str) -> None:
        self._put("service_index", scoped_service, incident_id)

    def next_mark(self) -> int:
        return self.backing.next_mark()

    @property
    def changed_incidents(self) -> list[str]:
        """Ids of the incidents written in this batch (first change first)."""
        return [key for table, key in self._dirty if table == "incidents"]

    def flush_superseded(self) -> int:
        """Write what the next alert cannot supersede: everything changed before the incident changed last. That
        incident (and the index entries changed with it) stays held: if the next alert changes it again, the
        write in between is one no crash could have needed (no other key was written between the two), so a
        burst of alerts on one incident costs one write instead of one per alert."""
        if self._last_incident is None:
            return 0
        held = ("incidents", self._last_incident)
        order = list(self._dirty)
        cut = order.index(held) if held in self._dirty else len(order)
        return self._write(order[:cut])

    def flush(self) -> int:
        """Write every changed key to the backing store once; returns the number of writes."""
        return self._write(list(self._dirty))

    def _write(self, keys: list[tuple[str, str]]) -> int:
        for table, key in keys:
            value = self._cache[table][key]
            if table == "incidents":
                self.backing.put_incident(value)
            else:
                getattr(self.backing, _PUTTERS[table])(key, value)
            del self._dirty[(table, key)]
        return len(keys)


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    incident: Incident | None
    reason: str = ""

    @property
    def emits(self) -> bool:
        """Whether an IncidentUpdated is written for this outcome (replays re-emit the same version)."""
        return self.kind not in ("unchanged", "ignored")


def incident_id_for(event_id: str) -> str:
    """Deterministic: the incident opened by an alert event always gets the same id (replays find it again)."""
    return "inc-" + hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------- correlator

class Correlator:
    """Applies alerts to a CorrelationStore, one at a time, in partition order."""

    def __init__(self, deps: DependencyMap, rules: CorrelationRules = CorrelationRules()) -> None:
        self.deps = deps
        self.rules = rules

    def _scope(self, alert: AlertInput) -> str:
        return alert.labels.get(self.rules.scope_label, "") if self.rules.scope_label else ""

    def apply(self, alert: AlertInput, store: CorrelationStore) -> Outcome:
        now = alert.received_at_ms
        known_id = store.get_alert_index(alert.key)
        inc = store.get_incident(known_id) if known_id else None
        if inc is not None and alert.key in inc.alerts:
            ref = inc.alerts[alert.key]
            if ref.already_applied(alert):
                return self._replayed(inc, alert, store)
            return self._known(alert, ref, inc, store, now)
        return self._new(alert, store, now)

    # -- rule 1 ---------------------------------------------------------------------------------------------------
    def _replayed(self, inc: Incident, alert: AlertInput, store: CorrelationStore) -> Outcome:
        # Nothing to repair: only incidents are persisted, and the indexes are derived from them after a restart
        # (MappingStore.rebuild_indexes). (Re-indexing here, as before, overwrote newer service-index entries that
        # point at other incidents, and later alerts grouped differently than in the crash-free run.)
        return Outcome("replayed", inc, "event already applied; current state re-emitted")

    # -- rules 2 and 3 --------------------------------------------------------------------------------------------
    def _known(self, alert: AlertInput, ref: AlertRef, inc: Incident, store: CorrelationStore, now: int) -> Outcome:
        if inc.state == "resolved":
            if alert.status == "resolved":
                return Outcome("unchanged", inc, "resolved alert of a resolved incident")
            if inc.resolved_at is not None and now - inc.resolved_at <= self.rules.reopen_window_ms:
                self._touch(inc, ref, alert, now)
                inc.state, inc.resolved_at, inc.episode = "open", None, inc.episode + 1
                return self._commit(inc, "reopened", alert, store)
            return self._new(alert, store, now, reason="fired again after the reopen window")
        if alert.status == ref.status:
            return Outcome("unchanged", inc, f"duplicate {alert.status} alert")
        self._touch(inc, ref, alert, now)
        if alert.status == "resolved" and inc.all_resolved():
            inc.state, inc.resolved_at = "resolved", now
            return self._commit(inc, "resolved", alert, store)
        return self._commit(inc, "updated", alert, store)

    # -- rule 4 ---------------------------------------------------------------------------------------------------
    def _new(self, alert: AlertInput, store: CorrelationStore, now: int, reason: str = "") -> Outcome:
        if alert.status == "resolved":
            return Outcome("ignored", None, "resolved alert that was never seen firing")
        new_id = incident_id_for(alert.event_id)
        existing = store.get_incident(new_id)
        if existing is not None and alert.key in existing.alerts:
            return self._replayed(existing, alert, store)  # opened before a crash; its indexes may be missing
        ref = AlertRef(alert.source, alert.fingerprint, alert.service, "firing", alert.severity, alert.summary,
                       now, now, alert.event_id, alert.sequence)
        target = self._candidate(alert, store, now)
        if target is not None:
            if alert.key in target.alerts and target.alerts[alert.key].already_applied(alert):
                return self._replayed(target, alert, store)
            target.alerts[alert.key] = ref
            target.last_seen = max(target.last_seen, now)
            return self._commit(target, "updated", alert, store)
        inc = Incident(new_id, 0, "open", "opened", self._scope(alert), now, now, None, {alert.key: ref},
                       alert.event_id)
        return self._commit(inc, "opened", alert, store, reason)

    def _candidate(self, alert: AlertInput, store: CorrelationStore, now: int) -> Incident | None:
        scope = self._scope(alert)
        services = (self.deps.neighbours(alert.service, self.rules.topology_hops) if alert.service else [""])
        best: Incident | None = None
        seen: set[str] = set()
        for service in services:
            iid = store.get_service_index(f"{scope}\x1f{service}")
            if iid is None or iid in seen:
                continue
            seen.add(iid)
            inc = store.get_incident(iid)
            if (inc is None or inc.state != "open" or inc.scope != scope
                    or now - inc.last_seen > self.rules.group_window_ms
                    or len(inc.alerts) >= self.rules.max_alerts_per_incident):
                continue
            if best is None or (inc.last_seen, best.incident_id) > (best.last_seen, inc.incident_id):
                best = inc
        return best

    # -- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def _touch(inc: Incident, ref: AlertRef, alert: AlertInput, now: int) -> None:
        inc.alerts[alert.key] = replace(ref, status=alert.status, severity=alert.severity,
                                        summary=alert.summary or ref.summary, last_seen=now,
                                        last_event_id=alert.event_id, last_sequence=alert.sequence)
        inc.last_seen = max(inc.last_seen, now)

    def _commit(self, inc: Incident, change: Change, alert: AlertInput, store: CorrelationStore,
                reason: str = "") -> Outcome:
        inc.version += 1
        inc.change = change
        inc.causation_id = alert.event_id
        inc.changed_alerts.add(alert.key)  # every rule changes at most this alert of the incident
        # Only this alert's entries can have changed, except on reopen (the incident's services point back to it).
        only_key = None if change == "reopened" else alert.key
        services = self._indexed_services(inc, only_key)
        if services:  # stamped in the incident write itself: the service index can be derived from incidents
            mark = store.next_mark()
            for service in services:
                inc.service_marks[service] = mark
        store.put_incident(inc)
        keys = [only_key] if only_key is not None else list(inc.alerts)
        for key in keys:
            if store.get_alert_index(key) != inc.incident_id:
                store.put_alert_index(key, inc.incident_id)
        for service in services:
            scoped = f"{inc.scope}\x1f{service}"
            if store.get_service_index(scoped) != inc.incident_id:
                store.put_service_index(scoped, inc.incident_id)
        return Outcome(change, inc, reason)

    @staticmethod
    def _indexed_services(inc: Incident, only_key: str | None) -> list[str]:
        """The services whose index entry a commit points at the incident (only while it is open)."""
        if inc.state != "open":
            return []
        return [s for s in ([inc.alerts[only_key].service] if only_key is not None else inc.services) if s]
