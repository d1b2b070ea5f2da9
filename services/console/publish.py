"""Where the console's decisions go: a port (:class:`DecisionSink`) and its Kafka implementation.

``send`` returns only after the broker acknowledged the record, so a person is told "recorded" only when it is.
"""

from __future__ import annotations

from typing import Protocol

from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated, KillSwitchChanged

ConsoleRecord = ApprovalRecorded | HypothesisValidated | KillSwitchChanged


class DecisionSink(Protocol):
    def send(self, record: ConsoleRecord) -> None:
        """Deliver the record durably or raise a PilothouseError (RetryableError: nothing was recorded, try again)."""
        ...


class BusDecisionSink:
    """Sends decisions as the console principal; the broker's ACLs allow it only the console's own topics."""

    def __init__(self, producer: BusProducer, output_topics: dict[str, str], *, timeout_s: float = 15.0):
        self._producer = producer
        self._topics = output_topics
        self._timeout = timeout_s

    def send(self, record: ConsoleRecord) -> None:
        if isinstance(record, ApprovalRecorded):
            topic, key = self._topics["approvals"], record.action_id
        elif isinstance(record, HypothesisValidated):
            topic, key = self._topics["validations"], record.incident_id
        else:
            topic, key = self._topics["kill_switch"], record.scope
        self._producer.send(record, key=key, topic=topic, timeout=self._timeout)
