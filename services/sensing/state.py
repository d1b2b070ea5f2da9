"""The correlator's durable state: its incidents, written to one changelog partition a whole batch at a time.

Pure logic (bytes in, bytes out); the Faust worker produces the records and hands back what recovery read.

Why whole batches. Correlation needs every prefix of the durable writes to be the state after some prefix of the
alerts: a restart replays the alerts after the last committed offset onto what it finds, and a state that holds a
later alert's change but not an earlier one's makes the replay group differently than the crash-free run did. One
record per alert (as the worker wrote before) kept that property but cost a changelog record per alert: a third of
the worker's CPU. So a batch now writes each incident it changed once, in its final state, and then a **marker**
(key :data:`MARKER_KEY`) naming the batch. Each incident record carries the batch number and the state it replaces
(``p``, null for an incident the batch opened). A crash can only cut the log short (one partition, one idempotent
producer, written in order), so at most the last batch is incomplete: its records are newer than the latest
marker. Recovery rolls those back to their ``p`` (or drops the incident) and writes the roll-back at once, as a
batch of its own; the replay then starts from the state after the last complete batch, which is the state after
a prefix of the alerts.

Record values are JSON (orjson): ``{"b": batch, "p": previous state | null, "s": state}``; the marker is
``{"b": batch}``. Keys are the incident ids (UTF-8). A roll-back that drops an incident writes a tombstone.
Compaction keeps, per key, the latest record, which is all recovery reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from pilothouse.sensing.correlation import Incident, MappingStore

MARKER_KEY = b"\x00batch"
"""The key of the batch marker (incident ids start with ``inc-``, so no incident has it)."""

Record = tuple[bytes, bytes | None]
"""A changelog record: key, value (None: a tombstone)."""


class StateLogError(ValueError):
    """The changelog holds something this version cannot read (the worker stops rather than guess)."""


class BatchLogStore(MappingStore):
    """The incidents as dicts (reads and the derived indexes as :class:`MappingStore`), written a batch at a time.

    ``put_incident`` only notes the live incident; :meth:`commit` serialises every incident the batch changed, once,
    and returns the changelog records to produce (incidents, then the marker). Until the records are acknowledged,
    the in-memory state is ahead of the durable one: the worker publishes nothing of a batch before that.

    Reads return the LIVE incident of the ``live_max`` most recently used ones (decoding an incident of 25 alerts
    every batch cost ~40 us): change it only to put it back, and call :meth:`discard` when an alert failed half-way
    (the incidents read since the last commit are decoded afresh next time). The bound is for the garbage collector:
    a live incident is ~2 objects per alert that every full collection walks (800 incidents of 25: ~1.5 ms)."""

    writes_batches_atomically = True  # IncidentHandler.correlate_batch: no per-alert flushes, discard() on failure

    def __init__(self, live_max: int = 1_000) -> None:
        super().__init__({}, {}, {})
        self.batch = 0  # the last batch number handed out
        # incident id -> JSON of its durable state (the next record's "p"). The state is kept as bytes only, read
        # through a decoding view: thousands of incident dicts would be objects every full garbage collection walks.
        self._encoded: dict[str, bytes] = {}
        self.incidents = _JsonView(self._encoded)
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
        """The changelog records of the writes since the last commit (empty if none): one per changed incident, in
        the order they were first written, each with the state it replaces, then the marker of this batch."""
        if not self._pending:
            self._touched.clear()
            return []
        self.batch += 1
        b = str(self.batch).encode()
        out: list[Record] = []
        for iid, inc in self._pending.items():
            s = orjson.dumps(inc)  # a dataclass: orjson writes its fields, as to_dict() has them, without the copy
            out.append((iid.encode(), b'{"b":' + b + b',"p":' + self._encoded.get(iid, b"null") + b',"s":' + s + b"}"))
            self._encoded[iid] = s
        self._pending.clear()
        self._touched.clear()
        out.append((MARKER_KEY, b'{"b":' + b + b"}"))
        return out

    # -- recovery ----------------------------------------------------------------------------------------------------
    def load(self, table: Mapping[Any, Any]) -> list[Record]:
        """Take the state a changelog replay left in ``table`` (key -> latest value, bytes or str); roll back the
        records of an incomplete last batch. Returns the roll-back records (a batch of their own, with its marker)
        that must be durable before anything else is written; empty when the last batch was complete.

        A record of the worker before batch records (a bare incident dict) counts as written by a complete batch 0.
        """
        self._encoded.clear()
        self._pending.clear()
        self._live.clear()
        self._touched.clear()
        marker = latest = 0
        records: dict[str, tuple[int, dict | None, dict]] = {}  # incident id -> (batch, previous, state)
        for key, value in table.items():
            key_b = key if isinstance(key, bytes) else str(key).encode()
            if value is None:
                continue
            try:
                doc = orjson.loads(value)
                if key_b == MARKER_KEY:
                    marker = int(doc["b"])
                    latest = max(latest, marker)
                elif "s" in doc:
                    records[key_b.decode()] = (int(doc["b"]), doc["p"], doc["s"])
                    latest = max(latest, int(doc["b"]))
                else:  # the per-alert worker's record: the incident dict itself
                    records[doc["incident_id"]] = (0, None, doc)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise StateLogError(f"changelog record {key_b[:80]!r} is not a state record: {e}") from None
        stale: list[str] = []
        for iid, (batch, previous, state) in records.items():
            if batch > marker:  # written by a batch whose marker never made it: not durable as a whole
                stale.append(iid)
                if previous is None:
                    continue
                state = previous
            self._encoded[iid] = orjson.dumps(state)
        self.rebuild_indexes()
        self.batch = latest
        if not stale:
            return []
        self.batch += 1
        b = str(self.batch).encode()
        out: list[Record] = []
        for iid in stale:
            s = self._encoded.get(iid)
            # a restored incident's record names its own state as the previous one: a second roll-back (a crash
            # before this batch's marker) finds the same state again
            out.append((iid.encode(), None if s is None else b'{"b":' + b + b',"p":' + s + b',"s":' + s + b"}"))
        out.append((MARKER_KEY, b'{"b":' + b + b"}"))
        return out


def apply_records(table: dict, records: Iterable[Record]) -> None:
    """What a changelog replay does with records (tests, and the worker's in-memory copy of the table)."""
    for key, value in records:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


class _JsonView(Mapping):
    """Read-only mapping of key -> JSON bytes, decoded on access."""

    def __init__(self, raw: Mapping[str, bytes]) -> None:
        self._raw = raw

    def __getitem__(self, key: str) -> Any:
        return orjson.loads(self._raw[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)
