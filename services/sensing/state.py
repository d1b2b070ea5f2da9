"""The correlator's durable state: its incidents, written to one changelog partition a whole batch at a time.

Pure logic (bytes in, bytes out); the Faust worker produces the records and hands back what recovery read.

Why whole batches. Correlation needs every prefix of the durable writes to be the state after some prefix of the
alerts: a restart replays the alerts after the last committed offset onto what it finds, and a state that holds a
later alert's change but not an earlier one's makes the replay group differently than the crash-free run did. One
record per alert (as the worker wrote before) kept that property but cost a changelog record per alert: a third of
the worker's CPU. So a batch writes what it changed once, in its final state, and then a **marker** (key
:data:`MARKER_KEY`) naming the batch. Each record carries the batch number and the value it replaces (``p``, null
for a new one). A crash can only cut the log short (one partition, one idempotent producer, written in order), so at
most the last batch is incomplete: its records are newer than the latest marker. Recovery rolls those back to their
``p`` (or drops them) and writes the roll-back at once, as a batch of its own; the replay then starts from the state
after the last complete batch, which is the state after a prefix of the alerts.

What a record holds: an incident is written as its **head** (every field but its alerts; key: the incident id) and
one record per **alert** (key: incident id, ``\x1e``, the alert's dedup key), and a batch writes only the alerts it
changed. (Writing the whole incident per change, as before, made an update of an incident of n alerts cost n
alerts' state, twice with its ``p``: ~9 KB per alert in the sensing bench, 18 times the alert itself, most of the
broker's work.) An incident is its head plus every alert record under its id.

Record values are JSON (orjson): ``{"b": batch, "p": previous value | null, "s": value}``; the marker is
``{"b": batch}``. A roll-back that drops a record writes a tombstone. Compaction keeps, per key, the latest record,
which is all recovery reads. Records of earlier workers (a whole incident per record: the batch worker's ``{"b",
"p", "s"}`` with the alerts inside, or the per-alert worker's bare incident) are read too and rewritten as heads and
alerts by the first recovery.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from pilothouse.sensing.correlation import Incident, MappingStore

MARKER_KEY = b"\x00batch"
"""The key of the batch marker (incident ids start with ``inc-``, so no incident has it)."""

ALERT_SEP = b"\x1e"
"""Between the incident id and the alert's dedup key in an alert record's key (incident ids are ``inc-`` + hex)."""

Record = tuple[bytes, bytes | None]
"""A changelog record: key, value (None: a tombstone)."""


class StateLogError(ValueError):
    """The changelog holds something this version cannot read (the worker stops rather than guess)."""


class BatchLogStore(MappingStore):
    """The incidents (reads and the derived indexes as :class:`MappingStore`), written a batch at a time.

    ``put_incident`` only notes the live incident; :meth:`commit` serialises what the batch changed (each changed
    incident's head and changed alerts, once) and returns the changelog records to produce (then the marker). Until
    the records are acknowledged, the in-memory state is ahead of the durable one: the worker publishes nothing of a
    batch before that.

    Reads return the LIVE incident of the ``live_max`` most recently used ones (decoding an incident of 25 alerts
    every batch cost ~40 us): change it only to put it back, and call :meth:`discard` when an alert failed half-way
    (the incidents read since the last commit are decoded afresh next time). The bound is for the garbage collector:
    a live incident is ~2 objects per alert that every full collection walks (800 incidents of 25: ~1.5 ms)."""

    writes_batches_atomically = True  # IncidentHandler.correlate_batch: no per-alert flushes, discard() on failure

    def __init__(self, live_max: int = 1_000) -> None:
        super().__init__({}, {}, {})
        self.batch = 0  # the last batch number handed out
        # The durable state as JSON (the next records' "p"), kept as bytes only and read through a decoding view:
        # thousands of incident dicts would be objects every full garbage collection walks (dicts of bytes are not).
        self._heads: dict[str, bytes] = {}  # incident id -> its head
        self._alerts: dict[str, dict[str, bytes]] = {}  # incident id -> dedup key -> the alert
        self.incidents = _StateView(self._heads, self._alerts)
        self._pending: dict[str, Incident] = {}
        self.live_max = live_max
        self._live: OrderedDict[str, Incident] = OrderedDict()  # bounded: a few thousand objects for the GC
        self._touched: set[str] = set()

    # -- writes ------------------------------------------------------------------------------------------------------
    def put_incident(self, incident: Incident) -> None:
        self._pending[incident.incident_id] = incident
        self._remember(incident)

    def get_incident(self, incident_id: str) -> Incident | None:
        inc = self._pending.get(incident_id)
        if inc is None:
            inc = self._live.get(incident_id)
        if inc is None:
            inc = super().get_incident(incident_id)
            if inc is None:
                return None
        self._remember(inc)
        return inc

    def _remember(self, inc: Incident) -> None:
        self._touched.add(inc.incident_id)
        self._live[inc.incident_id] = inc
        self._live.move_to_end(inc.incident_id)
        if len(self._live) > self.live_max:
            self._live.popitem(last=False)

    def discard(self) -> None:
        """Forget the writes since the last commit and every incident read since (an alert failed half-way and
        may have changed one in place): they are decoded from their durable state when next read."""
        for iid in self._touched:
            self._live.pop(iid, None)
        self._pending.clear()
        self._touched.clear()

    def commit(self) -> list[Record]:
        """The changelog records of the writes since the last commit (empty if none): per changed incident, in the
        order they were first written, its changed alerts and its head, each with the value it replaces; then the
        marker of this batch."""
        if not self._pending:
            self._touched.clear()
            return []
        self.batch += 1
        b = str(self.batch).encode()
        out: list[Record] = []
        for iid, inc in self._pending.items():
            key = iid.encode()
            stored = self._alerts.setdefault(iid, {})
            if len(stored) + len(inc.changed_alerts) < len(inc.alerts):  # a change the correlator did not name
                raise StateLogError(f"{iid}: {len(inc.alerts)} alerts, {len(stored)} written, "
                                    f"{len(inc.changed_alerts)} named as changed")
            # only the alerts the correlator changed (sorted: the same records whatever the set's order)
            for akey in sorted(inc.changed_alerts):
                s = orjson.dumps(inc.alerts[akey])  # a dataclass: its fields, as Incident.to_dict has them
                old = stored.get(akey)
                if s != old:
                    out.append((key + ALERT_SEP + akey.encode(), _value(b, old, s)))
                    stored[akey] = s
            inc.changed_alerts.clear()
            head = orjson.dumps(inc.head())
            out.append((key, _value(b, self._heads.get(iid), head)))
            self._heads[iid] = head
        self._pending.clear()
        self._touched.clear()
        out.append((MARKER_KEY, b'{"b":' + b + b"}"))
        return out

    # -- recovery ----------------------------------------------------------------------------------------------------
    def load(self, table: Mapping[Any, Any]) -> list[Record]:
        """Take the state a changelog replay left in ``table`` (key -> latest value, bytes or str); roll back the
        records of an incomplete last batch, and rewrite records of earlier workers (whole incidents) as heads and
        alerts. Returns those records (a batch of their own, with its marker), which must be durable before
        anything else is written; empty when there is nothing to roll back or rewrite."""
        self._heads.clear()
        self._alerts.clear()
        self._pending.clear()
        self._live.clear()
        self._touched.clear()
        marker = latest = 0
        heads: dict[str, tuple[int, Any, Any]] = {}  # incident id -> (batch, previous, value)
        alerts: dict[tuple[str, str], tuple[int, Any, Any]] = {}  # (incident id, dedup key) -> the same
        whole: dict[str, tuple[int, Any, Any]] = {}  # an earlier worker's whole incidents
        for key, value in table.items():
            key_b = key if isinstance(key, bytes) else str(key).encode()
            if value is None:
                continue
            try:
                doc = orjson.loads(value)
                if key_b == MARKER_KEY:
                    marker = int(doc["b"])
                    latest = max(latest, marker)
                elif ALERT_SEP in key_b:
                    iid, akey = key_b.split(ALERT_SEP, 1)
                    alerts[(iid.decode(), akey.decode())] = (int(doc["b"]), doc["p"], doc["s"])
                    latest = max(latest, int(doc["b"]))
                elif "s" in doc:
                    (whole if "alerts" in doc["s"] else heads)[key_b.decode()] = (int(doc["b"]), doc["p"], doc["s"])
                    latest = max(latest, int(doc["b"]))
                else:  # the per-alert worker's record: the incident dict itself
                    whole[doc["incident_id"]] = (0, None, doc)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
                raise StateLogError(f"changelog record {key_b[:80]!r} is not a state record: {e}") from None
        batch = str(latest + 1).encode()
        out: list[Record] = []

        def kept(key: bytes, batch_of: int, previous: Any, value: Any) -> Any:
            """The value to keep; a record of the incomplete batch is rolled back to its previous value (None:
            dropped, with a tombstone). A restored record names its own value as the previous one: a second
            roll-back (a crash before this batch's marker) finds the same value again."""
            if batch_of <= marker:
                return value
            if previous is None:
                out.append((key, None))
            else:
                p = orjson.dumps(previous)
                out.append((key, _value(batch, p, p)))
            return previous

        for iid, (b, p, s) in heads.items():
            value = kept(iid.encode(), b, p, s)
            if value is not None:
                self._heads[iid] = orjson.dumps(value)
        for iid, (b, p, s) in whole.items():
            value = kept(iid.encode(), b, p, s)
            if value is None:
                continue
            # rewritten: its alerts first, then its head (which replaces the whole-incident record, so a crash in
            # between leaves the whole incident, and the next recovery rewrites it again)
            key = iid.encode()
            mine = self._alerts.setdefault(iid, {})
            for akey, ref in value["alerts"].items():
                mine[akey] = enc = orjson.dumps(ref)
                out.append((key + ALERT_SEP + akey.encode(), _value(batch, enc, enc)))
            self._heads[iid] = enc = orjson.dumps({k: v for k, v in value.items() if k != "alerts"})
            out.append((key, _value(batch, enc, enc)))
        for (iid, akey), (b, p, s) in alerts.items():
            key = iid.encode() + ALERT_SEP + akey.encode()
            value = kept(key, b, p, s)
            if value is not None and iid in self._heads:
                self._alerts.setdefault(iid, {})[akey] = orjson.dumps(value)
            elif value is not None:  # no head: its incident was dropped (cannot happen; never keep half an incident)
                out.append((key, None))
        self.rebuild_indexes()
        self.batch = latest
        if not out:
            return []
        self.batch += 1
        out.append((MARKER_KEY, b'{"b":' + batch + b"}"))
        return out


def _value(batch: bytes, previous: bytes | None, value: bytes) -> bytes:
    """A state record's value: ``{"b": batch, "p": previous | null, "s": value}`` (both JSON already)."""
    return b'{"b":' + batch + b',"p":' + (b"null" if previous is None else previous) + b',"s":' + value + b"}"


def apply_records(table: dict, records: Iterable[Record]) -> None:
    """What a changelog replay does with records (tests, and the worker's in-memory copy of the table)."""
    for key, value in records:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


class _StateView(Mapping):
    """Read-only mapping of incident id -> the incident as a dict (head and alerts), decoded on access."""

    def __init__(self, heads: Mapping[str, bytes], alerts: Mapping[str, Mapping[str, bytes]]) -> None:
        self._heads = heads
        self._alerts = alerts

    def __getitem__(self, key: str) -> Any:
        head = orjson.loads(self._heads[key])
        head["alerts"] = {k: orjson.loads(v) for k, v in self._alerts.get(key, {}).items()}
        return head

    def __iter__(self) -> Iterator[str]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)
