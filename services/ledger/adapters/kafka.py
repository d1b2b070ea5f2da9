"""The ledger's Kafka side, built only from the bus package (which alone imports the Kafka client and Avro).

* :class:`TopicReader` — reads one topic in offset order, ``read_committed``, from positions the caller chooses (the
  mirror's stored offsets, the tail window, the beginning), and hands back every record *as it is*: a null value
  (tombstone) or bytes that do not decode are returned, never skipped or dead-lettered, because on the ledger topic
  they are tamper evidence. It never commits consumer offsets (positions live in Postgres or nowhere).
* :class:`AppenderProcessor` — the bus's :class:`TransactionalProcessor` (consume decision events → produce ledger
  entries + input offsets in one Kafka transaction) with the appender's in-memory head kept in step with each
  transaction's outcome.
* :func:`open_appender` — fence any previous appender (``init_transactions`` aborts its open transaction), then
  recover the chain head from the ledger topic's committed tail, then return the processor ready to run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge

from pilothouse.bus.catalogue import DLQ_SUFFIX, load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.consumer import DLQ_HEADER_PREFIX, ConsumerLoop, MessageContext
from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.bus.producer import BusProducer, translate_kafka_error
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde
from pilothouse.bus.transactions import Output, TransactionalProcessor
from pilothouse.ledger.domain import Checkpoint, KafkaTombstone, LedgerEntry
from pilothouse.ledger.handlers import Appender, to_checkpoint_record

log = logging.getLogger("pilothouse.ledger")

APPENDED = Counter("pilothouse_ledger_entries_appended_total", "Ledger entries committed by the appender")
DUPLICATES = Counter("pilothouse_ledger_duplicate_events_total", "Redelivered decision events given no second entry")
HEAD = Gauge("pilothouse_ledger_next_sequence", "Next sequence number of the chain (entries committed)")

ENTRY_RECORD = "pilothouse.ledger.LedgerEntry"
CHECKPOINT_RECORD = "pilothouse.ledger.CheckpointSigned"

StartAt = Callable[[int, int, int], int]  # (partition, low watermark, high watermark) -> first offset to read


class RawRecord(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Undecodable(NamedTuple):
    """A ledger-topic value that is not a LedgerEntry: verify and the mirror report it (malformed), never skip it."""

    offset: int
    reason: str


def _refuse(record: AvroRecord, ctx: MessageContext) -> None:  # the reader never dispatches through the loop
    raise PermanentError("TopicReader does not dispatch records")


class TopicReader:
    """Positioned, read-only, read_committed reader of one topic (all partitions), tombstones included."""

    def __init__(self, bus: BusSettings, topic: str, *, group_id: str, producer: BusProducer, start: StartAt,
                 serde: Serde | None = None) -> None:
        self.topic = topic
        self.serde = serde or producer.serde
        self._start = start
        # The bus's consumer, used for its configured client only: no handler runs, nothing is dead-lettered,
        # no offset is committed (enable.auto.commit off), and partitions are positioned in on_assign.
        self._loop = ConsumerLoop(bus, group_id=group_id, handlers={topic: _refuse}, dlq_producer=producer,
                                  serde=self.serde,
                                  extra_config={"enable.auto.commit": False, "enable.partition.eof": True,
                                                "isolation.level": "read_committed",
                                                "auto.offset.reset": "earliest"})
        self._consumer = self._loop.raw
        self.starts: dict[int, int] = {}
        self.lows: dict[int, int] = {}
        self.highs: dict[int, int] = {}
        self._eof: dict[int, bool] = {}
        self._error: Exception | None = None
        self._consumer.subscribe([topic], on_assign=self._on_assign)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            for tp in partitions:
                low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                tp.offset = max(low, self._start(tp.partition, low, high))
                self.starts[tp.partition], self.lows[tp.partition], self.highs[tp.partition] = tp.offset, low, high
                self._eof[tp.partition] = False
            consumer.assign(partitions)
        except Exception as e:  # noqa: BLE001 - surfaced by the next poll() as a retryable error
            self._error = RetryableError(f"positioning the reader of {self.topic} failed: {e}")

    @property
    def at_end(self) -> bool:
        """Every assigned partition has been read to its (committed) end at least once since the last record."""
        return bool(self._eof) and all(self._eof.values())

    def poll(self, max_records: int = 500, timeout: float = 0.5) -> list[RawRecord]:
        out: list[RawRecord] = []
        for m in self._consumer.consume(max_records, timeout):
            err = m.error()
            if err is not None:
                if err.name() == "_PARTITION_EOF":
                    self._eof[m.partition()] = True
                    continue
                e = translate_kafka_error(err, f"reading {self.topic}")
                if err.fatal() or not isinstance(e, RetryableError):
                    raise e
                log.warning("transient error reading the ledger", extra={"topic": self.topic, "error": str(e)})
                continue
            self._eof[m.partition()] = False
            out.append(RawRecord(m.partition(), m.offset(), m.key(), m.value()))
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        return out

    def read_to_end(self, timeout_s: float = 60.0, batch: int = 1000) -> list[RawRecord]:
        """Everything from the start positions to the committed end (raises RetryableError after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        out: list[RawRecord] = []
        while not self.at_end:
            if time.monotonic() > deadline:
                assigned = sorted(self._eof) or "none: does the topic exist, and may this principal read it?"
                raise RetryableError(f"could not read {self.topic} to its end within {timeout_s:.0f}s "
                                     f"(partitions assigned: {assigned}; read {len(out)} records)")
            out += self.poll(batch, 0.5)
        return out

    # ---- decoding ---------------------------------------------------------------------------------------------------
    def entry(self, r: RawRecord) -> LedgerEntry | KafkaTombstone | Undecodable:
        if r.value is None:
            key = r.key.decode("utf-8", "replace") if r.key is not None else "?"
            return KafkaTombstone(key, r.offset)
        try:
            return LedgerEntry.from_record(self.serde.decode(r.value, expected=ENTRY_RECORD).data)
        except (PermanentError, TypeError, ValueError) as e:
            return Undecodable(r.offset, f"offset {r.offset}: {e}")

    def checkpoint(self, r: RawRecord) -> Checkpoint | Undecodable:
        if r.value is None:
            return Undecodable(r.offset, f"offset {r.offset}: null value (tombstone) on the checkpoints topic")
        try:
            return Checkpoint.from_dict(self.serde.decode(r.value, expected=CHECKPOINT_RECORD).data)
        except (PermanentError, TypeError, ValueError) as e:
            return Undecodable(r.offset, f"offset {r.offset}: {e}")

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception:  # noqa: BLE001 - closing twice or after a broker loss is not worth a crash
            pass


def read_all(bus: BusSettings, topic: str, producer: BusProducer, *, group_prefix: str,
             timeout_s: float = 60.0) -> tuple[list[RawRecord], TopicReader]:
    """The whole committed topic (for verify and prove); returns the records and the reader (for decoding)."""
    reader = TopicReader(bus, topic, group_id=f"{group_prefix}.read.{uuid.uuid4().hex[:12]}", producer=producer,
                         start=lambda p, low, high: low)
    try:
        return reader.read_to_end(timeout_s), reader
    finally:
        reader.close()


class AppenderProcessor(TransactionalProcessor):
    """TransactionalProcessor whose handler is an :class:`Appender`, kept in step with each transaction."""

    appender: Appender | None = None

    def process_batch(self, msgs: list) -> None:
        if self.appender is None:
            raise PermanentError("the appender has not recovered the chain head yet")
        self.appender.begin_batch()
        before, dups = self.appender.head.next_sequence, self.appender.duplicates_skipped
        try:
            super().process_batch(msgs)
        except BaseException:
            # Aborted for good (and the consumer rewound): these entries never existed; their sequences are reused.
            self.appender.rollback()
            raise
        self.appender.commit()
        APPENDED.inc(self.appender.head.next_sequence - before)
        DUPLICATES.inc(self.appender.duplicates_skipped - dups)
        HEAD.set(self.appender.head.next_sequence)

    def on_event(self, record: AvroRecord, ctx: MessageContext) -> list[Output]:
        if self.appender is None:
            raise PermanentError("the appender has not recovered the chain head yet")
        return self.appender.on_event(record, ctx)

    def _handle(self, m: Any, attempt: int) -> list[Output]:
        # The processor dead-letters what cannot be decoded or recorded (inside the same transaction). Record that
        # too, so the ledger has no silent hole. NOTE: overrides a private hook of the bus's TransactionalProcessor;
        # a public "on dead letter" callback there would be cleaner (asked for in the ledger's report).
        outs = list(super()._handle(m, attempt))
        dead = [o for o in outs if o.record is None and (o.topic or "").endswith(DLQ_SUFFIX)]
        if dead and self.appender is not None:
            headers = dead[0].headers or {}
            reason = str(headers.get(DLQ_HEADER_PREFIX + "reason", "dead-lettered"))
            ctx = MessageContext(m.topic(), m.partition(), m.offset(), m.key())
            outs += self.appender.on_dead_letter(ctx, reason=reason, value=m.value())
        return outs


def open_appender(bus: BusSettings, *, chain: str, decision_topics: tuple[str, ...], topic_entries: str,
                  group_id: str, transactional_id: str, producer: BusProducer, window: int, batch_size: int,
                  timeout_s: float = 60.0, clock: Callable[[], int] | None = None) -> AppenderProcessor:
    """Fence, recover, return the appender ready to ``run()``. Raises LedgerIntegrityError on a tampered tail."""
    catalogue = load_catalogue()
    expected = {t: catalogue.topics[t].record if t in catalogue.topics else None for t in decision_topics}
    proc = AppenderProcessor(bus, group_id=group_id, transactional_id=transactional_id,
                             handlers={t: (lambda r, c: proc.on_event(r, c)) for t in decision_topics},
                             serde=producer.serde, expected_records={k: v for k, v in expected.items() if v},
                             batch_size=batch_size,
                             # Static membership: a restarted appender takes the partitions back at once
                             # instead of waiting for the killed member's session to time out.
                             extra_consumer_config={"session.timeout.ms": 10000,
                                                    "group.instance.id": f"{transactional_id}.consumer"})
    # init_transactions ran in the constructor: a previous appender's open transaction is aborted, so the tail read
    # below (read_committed) is exactly the chain the new transactions continue.
    start: dict[str, Any] = {}

    def tail(p: int, low: int, high: int) -> int:
        start[p] = max(low, high - window)
        start["from_start"] = start[p] == low
        return start[p]

    reader = TopicReader(bus, topic_entries, group_id=f"{group_id}.recover.{uuid.uuid4().hex[:8]}",
                         producer=producer, start=tail)
    try:
        raw = reader.read_to_end(timeout_s)
        items = [reader.entry(r) for r in raw]
    finally:
        reader.close()
    from_start = bool(start.get("from_start", True))
    if not from_start and not any(isinstance(e, LedgerEntry) and e.chain == chain for e in items):
        # The window held only transaction markers / other chains: read the whole topic instead.
        reader = TopicReader(bus, topic_entries, group_id=f"{group_id}.recover.{uuid.uuid4().hex[:8]}",
                             producer=producer, start=lambda p, low, high: low)
        try:
            items = [reader.entry(r) for r in reader.read_to_end(timeout_s)]
        finally:
            reader.close()
        from_start = True
    kwargs: dict[str, Any] = {"topic_entries": topic_entries, "window": window}
    if clock is not None:
        kwargs["clock"] = clock
    proc.appender = Appender.recover(chain, items, from_start=from_start, **kwargs)
    log.info("chain head recovered", extra={"chain": chain, "next_sequence": proc.appender.head.next_sequence,
                                            "tail_records": len(items), "from_start": from_start})
    return proc


class CheckpointPublisher:
    """Sends signed checkpoints to their topic (idempotent producer, acknowledged before returning)."""

    def __init__(self, producer: BusProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def publish(self, cp: Checkpoint) -> None:
        self.producer.send(to_checkpoint_record(cp), key=str(cp.tree_size), topic=self.topic)
