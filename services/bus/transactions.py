"""Consume → produce exactly once inside Kafka, for the command services (policy, actuator, ledger).

A batch of input records is handled, its output records and the input offsets are committed in ONE Kafka
transaction: either all outputs become visible to ``read_committed`` consumers together with the offset move, or none
do and the batch is re-delivered. Dead letters are written inside the same transaction. Side effects outside Kafka
(an HTTP call, a Postgres row) are NOT covered: those need their own idempotency record (see the actuator).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from pilothouse.bus.catalogue import DLQ_SUFFIX, Catalogue, load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.consumer import MessageContext, dlq_headers
from pilothouse.bus.errors import PermanentError, PilothouseError, RetryableError
from pilothouse.bus.producer import translate_kafka_error
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde

log = logging.getLogger("pilothouse.bus")


@dataclass(frozen=True)
class Output:
    """A record to produce as part of the transaction."""

    record: AvroRecord
    key: str | bytes | None
    topic: str | None = None
    headers: dict[str, str | bytes] | None = None


TxHandler = Callable[[AvroRecord, MessageContext], Sequence[Output]]


class TransactionalProcessor:
    """Poll a batch, handle each record, produce its outputs and commit offsets atomically."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        group_id: str,
        transactional_id: str,
        handlers: dict[str, TxHandler],
        serde: Serde | None = None,
        catalogue: Catalogue | None = None,
        expected_records: dict[str, str] | None = None,
        batch_size: int = 100,
        max_retries: int = 5,
        backoff_initial_s: float = 0.2,
        extra_consumer_config: dict[str, Any] | None = None,
    ):
        self.catalogue = catalogue or load_catalogue()
        self.serde = serde or Serde(max_message_bytes=settings.max_message_bytes)
        self.handlers = dict(handlers)
        self.group_id = group_id
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.expected = {
            t: (expected_records or {}).get(t) or (self.catalogue.topics[t].record if t in self.catalogue.topics else None)
            for t in handlers
        }
        base = settings.librdkafka()
        self._producer = Producer({**base, "transactional.id": transactional_id, "enable.idempotence": True,
                                   "acks": "all", "linger.ms": 5, "transaction.timeout.ms": 60000})
        self._consumer = Consumer({**base, "group.id": group_id, "enable.auto.commit": False,
                                   "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                                   **(extra_consumer_config or {})})
        try:
            self._producer.init_transactions(30)
        except KafkaException as e:
            raise translate_kafka_error(e.args[0], f"init transactions ({transactional_id})") from e
        self._consumer.subscribe(list(handlers))
        self._stopping = False
        self.committed_batches = 0

    def stop(self) -> None:
        """Finish the current batch and return from run()."""
        self._stopping = True

    def run(self, *, idle_timeout_s: float | None = None, max_batches: int | None = None) -> None:
        """Process batches until stop(), ``max_batches``, or ``idle_timeout_s`` without input."""
        idle_since = time.monotonic()
        batches = 0
        while not self._stopping:
            msgs = [m for m in self._consumer.consume(self.batch_size, 0.5) if not self._skip(m)]
            if not msgs:
                if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                    return
                continue
            idle_since = time.monotonic()
            self.process_batch(msgs)
            batches += 1
            if max_batches is not None and batches >= max_batches:
                return

    def _skip(self, m) -> bool:
        if m.error() is None:
            return False
        if m.error().code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error", extra={"error": m.error().str()})
        return True

    def process_batch(self, msgs: list) -> None:
        """Handle ``msgs`` and commit outputs + offsets in one transaction (abort and rewind on failure)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._producer.begin_transaction()
                for m in msgs:
                    for out in self._handle(m, attempt):
                        self._produce(out)
                offsets = [TopicPartition(m.topic(), m.partition(), m.offset() + 1) for m in _last_per_partition(msgs)]
                self._producer.send_offsets_to_transaction(
                    offsets, self._consumer.consumer_group_metadata(), 30
                )
                self._producer.commit_transaction(30)
                self.committed_batches += 1
                return
            except (RetryableError, KafkaException) as e:
                self._abort(e)
                if attempt > self.max_retries:
                    # Give the batch back: rewind to the committed offsets so it is delivered again later.
                    self._rewind()
                    raise RetryableError(f"transaction failed {attempt} times: {e}") from e
                # Retry the same batch in place; its offsets only move inside a committed transaction.
                time.sleep(min(5.0, self.backoff_initial_s * 2 ** (attempt - 1)))

    def _handle(self, m, attempt: int) -> Sequence[Output]:
        topic = m.topic()
        try:
            record = self.serde.decode(m.value(), expected=self.expected.get(topic)).record
        except PermanentError as e:
            return [self._dead_letter(m, str(e), e, 0)]
        ctx = MessageContext(topic, m.partition(), m.offset(), m.key(), dict(m.headers() or []), m.timestamp()[1])
        try:
            return list(self.handlers[topic](record, ctx))
        except RetryableError:
            raise  # process_batch aborts and retries the whole transaction (bounded)
        except PilothouseError as e:
            return [self._dead_letter(m, str(e), e, attempt)]
        except Exception as e:  # noqa: BLE001 - a handler bug dead-letters the record; the service stays up
            log.exception("handler crashed", extra={"topic": topic, "offset": m.offset()})
            return [self._dead_letter(m, f"handler crashed: {type(e).__name__}: {e}", e, attempt)]

    def _dead_letter(self, m, reason: str, error: Exception, attempts: int) -> Output:
        return Output(record=None, key=m.key(), topic=m.topic() + DLQ_SUFFIX,  # type: ignore[arg-type]
                      headers={**dlq_headers(m, reason, error, self.group_id, attempts), "__raw__": m.value() or b""})

    def _produce(self, out: Output) -> None:
        if out.record is None:  # a dead letter: raw bytes, reason in headers
            headers = dict(out.headers or {})
            raw = headers.pop("__raw__")
            self._producer.produce(out.topic, value=raw, key=out.key, headers=list(headers.items()))
            return
        topic = out.topic or self.catalogue.topic_for_record(type(out.record).AVRO_NAME).name
        value = self.serde.encode(out.record, topic=topic)
        self._producer.produce(topic, value=value, key=out.key,
                               headers=list(out.headers.items()) if out.headers else None)

    def _abort(self, e: Exception) -> None:
        log.warning("aborting transaction", extra={"error": str(e)})
        # What the transaction produced is delivered first (librdkafka#4849, open): librdkafka sends the abort's
        # EndTxn once its AddPartitionsToTxn request is sent, not once it is answered. So an abort right after a
        # produce can reach the coordinator while the transaction is still empty there, and the coordinator's
        # INVALID_TXN_STATE is fatal to the producer: seen once here, a handler's retryable error right after the
        # batch's first outputs. A delivered message proves its partition was added. The messages stay invisible:
        # the abort marker hides them from read_committed consumers.
        self._producer.flush(30)
        try:
            self._producer.abort_transaction(30)
        except KafkaException as ae:
            if ae.args[0].fatal():
                raise translate_kafka_error(ae.args[0], "abort transaction") from ae

    def _rewind(self) -> None:
        assignment = self._consumer.assignment()
        if assignment:
            for tp in self._consumer.committed(assignment, 30):
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))

    def close(self) -> None:
        """Leave the group and flush."""
        self._consumer.close()
        self._producer.flush(30)


def _last_per_partition(msgs: list) -> list:
    last: dict[tuple[str, int], Any] = {}
    for m in msgs:
        last[(m.topic(), m.partition())] = m
    return list(last.values())
