"""Reading a test topic back, for integration tests (the bus's consumers commit; tests only look)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer


def read_all(settings, topic: str, expect: int, timeout_s: float = 30.0, linger_s: float = 1.0) -> list:
    """Every committed message of ``topic`` from the start: wait for ``expect``, then linger (more is a bug too)."""
    c = Consumer({**settings.librdkafka(), "group.id": f"test.{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            out.append(m)
    end = time.monotonic() + linger_s
    while time.monotonic() < end:
        m = c.poll(0.2)
        if m is not None and not m.error():
            out.append(m)
    c.close()
    return out
