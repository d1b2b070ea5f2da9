"""The consumer loop: decode, dispatch to a handler, retry, dead-letter, commit only after side effects.

* Offsets are *stored* only after the handler returned (or the message was safely dead-lettered, i.e. the DLQ write
  was acknowledged), and committed from the stored positions: nothing is skipped when a handler fails mid-way.
* Undecodable, oversized or invalid records and ``PermanentError`` from a handler go to ``<topic>.dlq`` with headers
  saying where they came from and why. ``RetryableError`` is retried with bounded exponential backoff, then
  dead-lettered with ``retries exhausted``. An unexpected exception is a bug: it is dead-lettered too, so one poison
  pill never stops the service.
* Handlers must be idempotent on ``event_id``: after a crash, records since the last commit are delivered again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message
from prometheus_client import Counter, Histogram

from pilothouse.bus.catalogue import DLQ_SUFFIX, Catalogue, load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import (
    DecodeError,
    PermanentError,
    PilothouseError,
    RetryableError,
)
from pilothouse.bus.producer import BusProducer, translate_kafka_error
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde

log = logging.getLogger("pilothouse.bus")

CONSUMED = Counter("pilothouse_bus_consumed_total", "Records consumed", ["topic", "outcome"])
HANDLER_SECONDS = Histogram("pilothouse_bus_handler_seconds", "Handler time per record", ["topic"])

DLQ_HEADER_PREFIX = "pilothouse.dlq."


@dataclass(frozen=True)
class MessageContext:
    """Where a record came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int | None = None


Handler = Callable[[AvroRecord, MessageContext], None]


def dlq_headers(msg: Message, reason: str, error: Exception, group_id: str, attempts: int) -> dict[str, str]:
    """The headers of a dead letter: original coordinates, reason and failure class."""
    return {
        DLQ_HEADER_PREFIX + "original_topic": msg.topic(),
        DLQ_HEADER_PREFIX + "original_partition": str(msg.partition()),
        DLQ_HEADER_PREFIX + "original_offset": str(msg.offset()),
        DLQ_HEADER_PREFIX + "reason": reason[:2000],
        DLQ_HEADER_PREFIX + "error_class": type(error).__name__,
        DLQ_HEADER_PREFIX + "consumer_group": group_id,
        DLQ_HEADER_PREFIX + "attempts": str(attempts),
        DLQ_HEADER_PREFIX + "failed_at": datetime.now(timezone.utc).isoformat(),
    }


class ConsumerLoop:
    """Consume topics with one handler each until stopped."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        group_id: str,
        handlers: dict[str, Handler],
        dlq_producer: BusProducer,
        serde: Serde | None = None,
        catalogue: Catalogue | None = None,
        expected_records: dict[str, str] | None = None,
        max_retries: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        auto_offset_reset: str = "earliest",
        extra_config: dict[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """``expected_records`` maps topics outside the catalogue (tests) to the record type they carry."""
        self.settings = settings
        self.group_id = group_id
        self.handlers = dict(handlers)
        self.dlq = dlq_producer
        self.serde = serde or dlq_producer.serde
        self.catalogue = catalogue or load_catalogue()
        self.expected: dict[str, str | None] = {}
        for topic in self.handlers:
            if expected_records and topic in expected_records:
                self.expected[topic] = expected_records[topic]
            else:
                self.expected[topic] = self.catalogue.record_of(topic)
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        conf = {
            **settings.librdkafka(),
            "group.id": group_id,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,  # store only after the side effects succeeded
            "auto.commit.interval.ms": 1000,
            "auto.offset.reset": auto_offset_reset,
            "isolation.level": "read_committed",
            "fetch.max.bytes": max(settings.max_message_bytes * 2, 52428800),
        }
        conf.update(extra_config or {})
        self._consumer = Consumer(conf)
        self._consumer.subscribe(list(self.handlers))
        self._stop = threading.Event()
        self.processed = 0
        self.dead_lettered = 0

    @property
    def raw(self) -> Consumer:
        """The underlying confluent-kafka consumer."""
        return self._consumer

    def stop(self) -> None:
        """Ask the loop to finish the current record and return."""
        self._stop.set()

    def run(self, *, max_messages: int | None = None, idle_timeout_s: float | None = None) -> int:
        """Poll and handle until stop(), ``max_messages`` handled, or ``idle_timeout_s`` without a message."""
        handled = 0
        idle_since = time.monotonic()
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is None:
                if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                    break
                continue
            idle_since = time.monotonic()
            if msg.error():
                self._on_consumer_error(msg.error())
                continue
            self.handle_message(msg)
            handled += 1
            if max_messages is not None and handled >= max_messages:
                break
        return handled

    def _on_consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        e = translate_kafka_error(err, "consume")
        if err.fatal() or not isinstance(e, RetryableError) and err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.error("consumer error", extra={"error": str(e)})
            if err.fatal():
                raise e
        else:
            log.warning("transient consumer error", extra={"error": str(e)})

    def handle_message(self, msg: Message) -> str:
        """Decode and dispatch one message; returns the outcome (handled | dead_lettered)."""
        topic = msg.topic()
        try:
            decoded = self.serde.decode(msg.value(), expected=self.expected.get(topic))
            record = decoded.record
        except PermanentError as e:
            return self._dead_letter(msg, str(e), e, attempts=0)
        ctx = MessageContext(
            topic=topic,
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            headers={k: v for k, v in (msg.headers() or [])},
            timestamp_ms=msg.timestamp()[1],
        )
        handler = self.handlers[topic]
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                handler(record, ctx)
            except RetryableError as e:
                if attempt > self.max_retries:
                    return self._dead_letter(msg, f"retries exhausted after {attempt} attempts: {e}", e, attempt)
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
                log.warning("retryable handler error", extra={"topic": topic, "attempt": attempt, "error": str(e)})
                self._sleep(delay)
                continue
            except PilothouseError as e:
                return self._dead_letter(msg, str(e), e, attempt)
            except Exception as e:  # noqa: BLE001 - a bug in a handler must not stop the service
                log.exception("handler crashed", extra={"topic": topic, "offset": msg.offset()})
                return self._dead_letter(msg, f"handler crashed: {type(e).__name__}: {e}", e, attempt)
            finally:
                HANDLER_SECONDS.labels(topic).observe(time.perf_counter() - started)
            self._consumer.store_offsets(message=msg)
            self.processed += 1
            CONSUMED.labels(topic, "handled").inc()
            return "handled"

    def _dead_letter(self, msg: Message, reason: str, error: Exception, attempts: int) -> str:
        topic = msg.topic()
        headers = dlq_headers(msg, reason, error, self.group_id, attempts)
        original = {k: v for k, v in (msg.headers() or [])}
        for k, v in original.items():
            if not k.startswith(DLQ_HEADER_PREFIX):
                headers.setdefault(k, v)
        # The DLQ write must be acknowledged before the offset moves on: a dead letter is never lost.
        d = self.dlq.produce_bytes(topic + DLQ_SUFFIX, msg.value(), key=msg.key(), headers=headers)
        self.dlq.wait([d])
        self._consumer.store_offsets(message=msg)
        self.dead_lettered += 1
        CONSUMED.labels(topic, "dead_lettered").inc()
        log.warning("dead-lettered", extra={"topic": topic, "offset": msg.offset(), "reason": reason[:300]})
        return "dead_lettered"

    def close(self) -> None:
        """Commit stored offsets and leave the group (call on SIGTERM, after stop())."""
        try:
            self._consumer.commit(asynchronous=False)
        except Exception as e:  # noqa: BLE001 - nothing stored yet is not an error on close
            if "NO_OFFSET" not in str(e):
                log.warning("final commit failed", extra={"error": str(e)})
        self._consumer.close()
