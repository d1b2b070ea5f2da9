"""The typed producer: idempotent, delivery reports checked, flush on shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from pilothouse.bus.catalogue import Catalogue, load_catalogue
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import (
    DeliveryFailed,
    NotAuthorized,
    OversizedMessage,
    PermanentError,
    RecordInvalid,
)
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde

_AUTH_ERRORS = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
}


def translate_kafka_error(err: KafkaError, what: str) -> Exception:
    """A librdkafka error as a pilothouse error (retryable or permanent)."""
    code = err.code()
    if code in _AUTH_ERRORS:
        return NotAuthorized(f"{what}: {err.name()}: {err.str()}")
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return OversizedMessage(f"{what}: {err.str()}")
    if err.fatal() or not err.retriable() and code not in (KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT,
                                                            KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
        return PermanentError(f"{what}: {err.name()}: {err.str()}")
    return DeliveryFailed(f"{what}: {err.name()}: {err.str()}")


class Delivery:
    """The broker's answer for one produced message (set by the delivery report)."""

    __slots__ = ("_event", "error", "topic", "partition", "offset")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: Exception | None = None
        self.topic: str | None = None
        self.partition: int | None = None
        self.offset: int | None = None

    def _report(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.error = translate_kafka_error(err, f"delivery to {msg.topic()}")
        else:
            self.topic, self.partition, self.offset = msg.topic(), msg.partition(), msg.offset()
        self._event.set()

    @property
    def done(self) -> bool:
        """True once the broker acknowledged or the client gave up."""
        return self._event.is_set()


class BusProducer:
    """Produces pydantic records to the topic the catalogue assigns them, as Avro with the schema fingerprint.

    The broker acknowledges with ``acks=all`` and idempotence on; every delivery report is checked.
    """

    def __init__(
        self,
        settings: BusSettings,
        *,
        serde: Serde | None = None,
        catalogue: Catalogue | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue or load_catalogue()
        self.serde = serde or Serde(max_message_bytes=settings.max_message_bytes, registry=_registry(settings))
        conf = {
            **settings.librdkafka(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": max(settings.max_message_bytes + 4096, 1_000_000),
            "delivery.timeout.ms": 30000,
        }
        conf.update(extra_config or {})
        self._producer = Producer(conf)
        self._partitions: dict[str, tuple[int, float]] = {}  # topic -> (partition count, when read)

    @property
    def raw(self) -> Producer:
        """The underlying confluent-kafka producer (for transactions inside the bus package)."""
        return self._producer

    def topic_of(self, record: AvroRecord) -> str:
        """The catalogue topic of this record type."""
        return self.catalogue.topic_for_record(type(record).AVRO_NAME).name

    def produce(
        self,
        record: AvroRecord,
        *,
        key: str | bytes | None,
        topic: str | None = None,
        headers: dict[str, str | bytes] | None = None,
    ) -> Delivery:
        """Queue ``record`` for sending; returns a Delivery to wait on. Raises RecordInvalid/OversizedMessage.

        ``topic`` defaults to the catalogue's topic for the record type; tests may pass a uuid-named topic, which
        must still be declared for that record in the catalogue unless it starts with ``test.``.
        """
        name = type(record).AVRO_NAME
        target = topic or self.topic_of(record)
        if not target.startswith("test.") and self.catalogue.topic(target).record != name:
            raise RecordInvalid(f"{name} does not belong on {target} (it carries {self.catalogue.topic(target).record})")
        value = self.serde.encode(record, topic=target)
        return self.produce_bytes(target, value, key=key, headers=headers)

    def produce_bytes(
        self, topic: str, value: bytes | None, *, key: str | bytes | None,
        headers: dict[str, str | bytes] | None = None, partition: int | None = None,
    ) -> Delivery:
        """Queue already-encoded bytes (dead letters, batched records, benchmarks); ``partition`` None: the
        partitioner's choice by key. Waits for queue space if the queue is full."""
        delivery = Delivery()
        hdrs = list(headers.items()) if headers else None
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=hdrs, on_delivery=delivery._report,
                                       **extra)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve delivery reports, then try again
            except KafkaException as e:
                raise translate_kafka_error(e.args[0], f"produce to {topic}") from e
        self._producer.poll(0)
        return delivery

    def partitions(self, topic: str, *, max_age_s: float = 60.0, timeout: float = 5.0) -> int:
        """The partition count of ``topic`` from the broker's metadata, cached for ``max_age_s`` (a topic can gain
        partitions). Raises DeliveryFailed (retryable) when the broker does not answer, PermanentError for an
        unknown topic."""
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is not None and now - cached[1] < max_age_s:
            return cached[0]
        try:
            meta = self._producer.list_topics(topic, timeout=timeout)
        except KafkaException as e:
            raise translate_kafka_error(e.args[0], f"metadata of {topic}") from e
        t = meta.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            if t is not None and t.error is not None:
                raise translate_kafka_error(t.error, f"metadata of {topic}")
            raise DeliveryFailed(f"no partitions known for {topic}")
        self._partitions[topic] = (len(t.partitions), now)
        return len(t.partitions)

    def wait(self, deliveries: Iterable[Delivery], timeout: float = 30.0) -> None:
        """Block until every delivery is acknowledged; raise the first delivery error (after all finished)."""
        pending = list(deliveries)
        deadline = time.monotonic() + timeout
        for d in pending:
            while not d.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeliveryFailed(f"no delivery report within {timeout}s")
                self._producer.poll(min(remaining, 0.1))
        for d in pending:
            if d.error is not None:
                raise d.error

    def send(self, record: AvroRecord, *, key: str | bytes | None, topic: str | None = None,
             headers: dict[str, str | bytes] | None = None, timeout: float = 30.0) -> Delivery:
        """Produce and wait for the broker's acknowledgement (what an HTTP gateway needs before answering 2xx)."""
        d = self.produce(record, key=key, topic=topic, headers=headers)
        self.wait([d], timeout)
        return d

    def poll(self, timeout: float = 0) -> int:
        """Serve delivery reports."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued message; returns how many are still queued (0 on success)."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush on shutdown; raise DeliveryFailed if messages are left undelivered."""
        left = self.flush(timeout)
        if left:
            raise DeliveryFailed(f"{left} messages still queued after {timeout}s flush")


def _registry(settings: BusSettings) -> Any | None:
    if not settings.schema_registry_url:
        return None
    from confluent_kafka.schema_registry import SchemaRegistryClient

    # new_client() returns the in-process mock registry for mock:// URLs (tests), a real client otherwise.
    return SchemaRegistryClient.new_client({"url": settings.schema_registry_url})


class AsyncBatchProducer:
    """Pre-encoded messages from an asyncio service, a batch at a time, each batch awaitable until the broker
    acknowledged all of it (``acks=all``, idempotent: a batch lands in order, after the batches before it).

    librdkafka does the sending in its own threads; its delivery reports are served on the event loop (``poll(0)``
    every ``poll_interval_s`` while any message is outstanding, nothing while idle), so no callback runs on another
    thread. For services whose stream library has a Python Kafka client of its own (the Faust correlator): a
    message costs a C call here instead of a few dozen Python frames there."""

    def __init__(self, producer: BusProducer, *, poll_interval_s: float = 0.0005) -> None:
        self.producer = producer
        self._raw = producer.raw
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._server: Any = None

    def produce_batch(self, topic: str, records: Iterable[tuple[bytes | None, bytes | None]], *,
                      partition: int | None = None) -> Any:
        """Queue ``(key, value)`` records (value None: a tombstone); returns an asyncio future that resolves once
        every one is acknowledged, or fails with the first delivery error (translated) once all are reported."""
        loop = asyncio.get_running_loop()
        if self._server is None or self._server.done():
            self._server = loop.create_task(self._serve())
        fut = loop.create_future()
        state: list[Any] = [0, None]  # reports outstanding, first error

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None and state[1] is None:
                state[1] = translate_kafka_error(err, f"produce to {topic}")
            state[0] -= 1
            if state[0] == 0 and not fut.done():
                fut.set_exception(state[1]) if state[1] is not None else fut.set_result(None)

        extra = {} if partition is None else {"partition": partition}
        for key, value in records:
            state[0] += 1
            while True:
                try:
                    self._raw.produce(topic, value=value, key=key, on_delivery=report, **extra)
                    break
                except BufferError:
                    self._raw.poll(0.005)  # local queue full: serve delivery reports, then try again
                except KafkaException as e:
                    raise translate_kafka_error(e.args[0], f"produce to {topic}") from e
        if state[0] == 0:
            fut.set_result(None)
        self._wake.set()
        return fut

    async def _serve(self) -> None:
        while True:
            if len(self._raw) == 0:  # nothing queued, in flight or reported but unserved
                self._wake.clear()
                await self._wake.wait()
                continue
            self._raw.poll(0)
            await asyncio.sleep(self._poll_interval_s)

    async def close(self, timeout: float = 30.0) -> None:
        """Wait (without blocking the loop) for every outstanding message, then stop serving reports."""
        deadline = time.monotonic() + timeout
        while len(self._raw) and time.monotonic() < deadline:
            self._raw.poll(0)
            await asyncio.sleep(0.01)
        if self._server is not None:
            self._server.cancel()
        if len(self._raw):
            raise DeliveryFailed(f"{len(self._raw)} messages still queued after {timeout}s")
