"""Read-only observers of topics: decoded records for tools (demo progress, red-team checks), and the offsets a
consumer group resumes from and the records between two offsets (a Faust worker checks that its stream skipped
nothing). No commits.

Services use ConsumerLoop (offsets, retries, dead letters); tools that only watch use this, so they never import
confluent_kafka themselves.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, TopicPartition

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


class PartitionProbe:
    """Asks the broker where a consumer group resumes a partition, and which records lie between two offsets.

    It never joins the group and never commits: it only assigns partitions to itself. ``isolation`` must be the
    group's own (Faust at least once reads uncommitted), so the probe sees the records that the group's consumer
    sees. Thread-safe; each call blocks for a broker round trip or more, so run it off the event loop."""

    def __init__(self, settings: BusSettings, group_id: str, *, isolation: str = "read_uncommitted") -> None:
        self._consumer = Consumer({
            **settings.librdkafka(), "group.id": group_id, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "isolation.level": isolation, "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        })
        self._lock = threading.Lock()

    def start_offset(self, topic: str, partition: int, timeout_s: float = 10.0) -> int:
        """The offset the group resumes from: its committed offset, or the log start when it has committed nothing
        (or retention deleted what it committed)."""
        tp = TopicPartition(topic, partition)
        with self._lock:
            committed = self._consumer.committed([tp], timeout=timeout_s)[0]
            low, _high = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
        if committed.error:
            raise RuntimeError(f"committed offset of {topic}[{partition}]: {committed.error}")
        return max(committed.offset, low) if committed.offset >= 0 else low

    def data_offsets(self, topic: str, partition: int, start: int, end: int, timeout_s: float = 10.0) -> list[int]:
        """The offsets in ``[start, end)`` that hold records. Transaction markers take offsets and hold none, and
        compaction removes records, so an empty list means that the gap is legitimate. Raises TimeoutError when the
        broker did not answer within ``timeout_s``."""
        found: list[int] = []
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._consumer.assign([TopicPartition(topic, partition, start)])
            try:
                while time.monotonic() < deadline:
                    m = self._consumer.poll(0.2)
                    if m is None:
                        continue
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            return found
                        raise RuntimeError(f"reading {topic}[{partition}] from {start}: {m.error()}")
                    if m.offset() >= end:
                        return found
                    found.append(m.offset())
            finally:
                self._consumer.unassign()
        raise TimeoutError(f"reading {topic}[{partition}] offsets {start}..{end - 1}: no answer in {timeout_s} s")

    def close(self) -> None:
        """Close the probe's consumer (it holds no group membership to leave)."""
        self._consumer.close()
