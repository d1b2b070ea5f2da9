"""One handler per consumed record type: each folds its record into the read model (idempotent on ``event_id``).

A record of the wrong type on a topic is a permanent error (the consumer loop dead-letters it with the reason).
"""

from __future__ import annotations

from collections.abc import Callable

from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.records import (
    ActionAuthorized,
    ActionExecuted,
    ActionProposed,
    ActionVerified,
    AlertsReceived,
    ApprovalRequested,
    AvroRecord,
    CheckpointSigned,
    HypothesesProposed,
    IncidentUpdated,
    LedgerEntry,
    PolicyDecided,
    ShadowRunCompleted,
)

from pilothouse.console.domain import ReadModel

# topic role (ConsoleSettings.topics) -> the record type carried there
RECORD_OF_ROLE: dict[str, type[AvroRecord]] = {
    "alerts": AlertsReceived,
    "incidents": IncidentUpdated,
    "hypotheses": HypothesesProposed,
    "proposals": ActionProposed,
    "decisions": PolicyDecided,
    "pending": ApprovalRequested,
    "shadow": ShadowRunCompleted,
    "authorized": ActionAuthorized,
    "executions": ActionExecuted,
    "verifications": ActionVerified,
    "ledger_entries": LedgerEntry,
    "ledger_checkpoints": CheckpointSigned,
}


class WrongRecord(PermanentError):
    """A topic carried a record type the console does not expect there."""


def _handler_for(model: ReadModel, expected: type[AvroRecord]) -> Callable[[AvroRecord, MessageContext], None]:
    def handle(record: AvroRecord, ctx: MessageContext) -> None:
        if not isinstance(record, expected):
            raise WrongRecord(f"{ctx.topic} carries {expected.AVRO_NAME}, got {type(record).AVRO_NAME}")
        model.apply(record)

    handle.__name__ = f"on_{expected.__name__}"
    return handle


def build_handlers(model: ReadModel, topics: dict[str, str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """(topic -> handler, topic -> expected Avro name) for the consumer loop, from the role -> topic map."""
    handlers: dict[str, Callable] = {}
    expected: dict[str, str] = {}
    for role, record in RECORD_OF_ROLE.items():
        topic = topics[role]
        handlers[topic] = _handler_for(model, record)
        expected[topic] = record.AVRO_NAME
    return handlers, expected
