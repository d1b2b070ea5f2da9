"""TransactionalProcessor's abort path, with a fake producer (the real broker runs it in tests/integration)."""

from __future__ import annotations

from pilothouse.bus.errors import RetryableError
from pilothouse.bus.transactions import TransactionalProcessor


class _Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        return 0

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")


def test_an_abort_waits_for_what_the_transaction_produced_first():
    """librdkafka#4849: an abort sent before the transaction's partitions were added is refused with a fatal
    INVALID_TXN_STATE. A delivered message proves its partition was added, so the processor flushes first."""
    processor = object.__new__(TransactionalProcessor)  # no broker: only the abort path is under test
    processor._producer = _Producer()
    processor._abort(RetryableError("transient"))
    assert processor._producer.calls == ["flush", "abort"]
