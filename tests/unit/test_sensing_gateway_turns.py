"""The gateway's worker threads take turns at the CPU-bound part of a request (normalise, redact, encode, queue) and
wait for the broker's acknowledgements side by side. Fakes stand in for the handler and the producer; the real
gateway against the real broker is in tests/integration/test_sensing_gateway.py."""

from __future__ import annotations

import threading
import time

from pilothouse.sensing.gateway import Gateway
from pilothouse.sensing.handlers import IngestResult, Message


class _Handler:
    alerts_topic = "alerts"
    mapping_rules: dict = {}

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    def _enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)

    def _leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def handle(self, source, body, *, received_at_ms, mapping):
        self._enter()
        time.sleep(0.02)  # releases the GIL: without turns, the other requests' work would run meanwhile
        self._leave()
        return IngestResult(kind="alert", records=[], findings={})

    def messages(self, result, *, partitions):
        self._enter()
        time.sleep(0.005)
        self._leave()
        return [Message("alerts", b"x", "k", 0)]


class _Producer:
    """Acknowledges nothing until ``expected`` requests are waiting at once: waits that ran in turn never finish."""

    def __init__(self, expected: int) -> None:
        self.all_waiting = threading.Barrier(expected, timeout=5)
        self.produced = 0

    def partitions(self, topic):
        return 3

    def produce_bytes(self, topic, value, *, key, partition):
        self.produced += 1
        return object()

    def wait(self, deliveries, timeout):
        self.all_waiting.wait()


def _gateway(handler, producer) -> Gateway:
    return Gateway(handler, producer, token_digests={}, max_body_bytes=1000, max_in_flight=8, ack_timeout_s=5,
                   retry_after_s=1)


def test_requests_take_turns_at_their_work_and_wait_for_acks_together():
    handler, producer = _Handler(), _Producer(expected=4)
    gateway = _gateway(handler, producer)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            gateway._process("alertmanager", b"{}", 0, None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors  # a BrokenBarrierError: the acks were awaited one request at a time
    assert handler.most_inside == 1  # never two requests' work at once
    assert producer.produced == 4

