"""A read-only observer of topics (demo progress, red-team checks, tooling): decoded records, no commits.

Services use ConsumerLoop (offsets, retries, dead letters); tools that only watch use this, so they never import
confluent_kafka themselves.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable

from confluent_kafka import Consumer

from pilothouse.bus.catalogue import load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde


class TopicReader:
    """Reads ``topics`` from the end (``start="latest"``) or the beginning, decoding each record."""

    def __init__(self, settings: BusSettings, topics: Iterable[str], *, start: str = "latest",
                 group_id: str | None = None, serde: Serde | None = None):
        self.serde = serde or Serde(max_message_bytes=settings.max_message_bytes)
        self._assigned = threading.Event()
        self._early: list = []  # messages polled while waiting for the assignment: handed out first, never lost
        self.undecodable = 0  # undecodable, or not the record type the catalogue says the topic carries
        catalogue = load_catalogue()
        self._expected = {t: catalogue.record_of(t) for t in topics}
        self._consumer = Consumer({
            **settings.librdkafka(), "group.id": group_id or f"test.reader.{uuid.uuid4().hex}",
            "auto.offset.reset": start, "enable.auto.commit": False, "isolation.level": "read_committed",
        })
        self._consumer.subscribe(list(self._expected), on_assign=lambda _c, _p: self._assigned.set())

    def wait_assigned(self, timeout_s: float) -> bool:
        """Poll until partitions are assigned (records from then on are seen); False on timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self._assigned.is_set() and time.monotonic() < deadline:
            m = self._consumer.poll(0.2)
            if m is not None:
                self._early.append(m)
        return self._assigned.is_set()

    def _next(self, timeout_s: float):
        return self._early.pop(0) if self._early else self._consumer.poll(timeout_s)

    def poll(self, timeout_s: float = 0.2) -> tuple[str, AvroRecord] | None:
        """The next decoded (topic, record), or None (nothing yet, or undecodable or of another record type than
        the topic carries, e.g. a poison pill: counted, skipped)."""
        m = self._next(timeout_s)
        if m is None or m.error():
            return None
        try:
            return m.topic(), self.serde.decode(m.value(), expected=self._expected.get(m.topic())).record
        except PermanentError:
            self.undecodable += 1
            return None

    def poll_raw(self, timeout_s: float = 0.2) -> tuple[str, bytes | None, dict[str, bytes]] | None:
        """The next (topic, raw value, headers) without decoding (for scanning bytes, e.g. canary searches)."""
        m = self._next(timeout_s)
        if m is None or m.error():
            return None
        return m.topic(), m.value(), dict(m.headers() or [])

    def close(self) -> None:
        """Leave the group."""
        self._consumer.close()
