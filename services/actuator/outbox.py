"""The outbox relay: publishes what the handlers recorded in Postgres, in order, then marks it sent.

A record is marked sent only after the broker acknowledged it (idempotent producer, ``acks=all``). A crash or a
broker outage between the acknowledgement and the mark re-sends it: consumers deduplicate on ``event_id``, which is
stored with the row and so identical in every copy. Nothing recorded is ever lost.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ActionExecuted, ActionVerified, AvroRecord, ShadowRunCompleted

log = logging.getLogger("pilothouse.actuator.outbox")

RECORD_TYPES: dict[str, type[AvroRecord]] = {c.AVRO_NAME: c for c in (ActionExecuted, ActionVerified,
                                                                         ShadowRunCompleted)}
RELAYED = Counter("pilothouse_actuator_outbox_relayed_total", "Outbox records published")
RELAY_ERRORS = Counter("pilothouse_actuator_outbox_errors_total", "Failed relay passes", ["kind"])
BACKLOG = Gauge("pilothouse_actuator_outbox_backlog", "Unsent records seen by the last pass")


class OutboxRelay:
    """Poll unsent rows, produce them, wait for the acknowledgements, mark them sent (one transaction per batch)."""

    def __init__(self, store: Store, producer: BusProducer, *, batch_size: int = 500, poll_s: float = 0.2,
                 max_backoff_s: float = 5.0):
        self.store = store
        self.producer = producer
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.sent = 0
        store.on_outbox_commit.append(self._wake.set)  # in-process writers wake the relay at once

    def run_once(self) -> int:
        """One batch; returns how many records were published (0: nothing to do)."""
        with self.store.transaction() as tx:
            rows = tx.unsent(self.batch_size)
            BACKLOG.set(len(rows))
            if not rows:
                return 0
            deliveries, sent = [], []
            for r in rows:
                try:
                    record = RECORD_TYPES[r.record_type].model_validate(r.payload)
                    deliveries.append(self.producer.produce(record, key=r.key, topic=r.topic))
                    sent.append(r.id)
                except (KeyError, ValueError, PermanentError) as e:
                    # Only the handlers write the outbox, from validated records, so this is a bug or a topic
                    # misconfiguration: the row is kept with its reason (nothing lost) and stops blocking the rest.
                    RELAY_ERRORS.labels("unpublishable").inc()
                    log.error("outbox row set aside", extra={"row": r.id, "topic": r.topic, "error": str(e)[:500]})
                    tx.mark_unpublishable(r.id, f"{type(e).__name__}: {e}")
            self.producer.wait(deliveries, timeout=30.0)
            tx.mark_sent(sent)
        self.sent += len(sent)
        RELAYED.inc(len(sent))
        return len(rows)

    def run(self) -> None:
        """Relay until stop(); broker and database outages are waited out with bounded backoff."""
        backoff = self.poll_s
        while not self._stop.is_set():
            try:
                n = self.run_once()
                backoff = self.poll_s
            except RetryableError as e:
                RELAY_ERRORS.labels("retryable").inc()
                log.warning("outbox relay waiting", extra={"error": str(e)[:300], "retry_in_s": backoff})
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            except PermanentError as e:
                RELAY_ERRORS.labels("permanent").inc()
                log.error("outbox relay blocked", extra={"error": str(e)[:500]})
                self._stop.wait(self.max_backoff_s)
                continue
            if n == 0:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self.producer.flush(10.0)
