"""The ledger's handlers: a decision event in, the next ledger entry out; a ledger entry in, the chain followed.

* :class:`Appender` — the single writer of the chain. One handler for every decision record type (the whole event is
  recorded, so evidence hashes, redaction manifests, prompt-template/model versions, policy decision ids, bundle
  revisions and input hashes are in the entry because they are in the event). It keeps the chain head and the
  recorded event ids of the last ``window`` entries (recovered from the ledger topic's tail at start-up): a
  redelivered event gets no second entry. It runs inside a Kafka transaction (:mod:`.adapters.kafka`): a batch's
  entries and its input offsets commit together, and :meth:`Appender.begin_batch` / :meth:`commit` /
  :meth:`rollback` keep the in-memory head in step with what Kafka committed, so a crash never makes a gap or a
  duplicate sequence.
* :class:`ChainFollower` — for the checkpointer: follows the committed ledger topic, checks every entry against the
  head (a tombstone, gap or broken link stops it: tamper evidence is never signed over), and keeps the right edge of
  the Merkle tree (O(log n) memory) to sign tree heads.

No I/O here: clocks are injected, Kafka types come from the bus package.
"""

from __future__ import annotations

import time
import uuid
from hashlib import sha256
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pilothouse.bus.catalogue import DLQ_SUFFIX
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import AvroRecord
from pilothouse.bus.records import CheckpointSigned as CheckpointRecord
from pilothouse.bus.records import LedgerEntry as EntryRecord
from pilothouse.bus.transactions import Output
from pilothouse.ledger.domain import (
    ChainHead,
    Checkpoint,
    CheckpointSigner,
    KafkaTombstone,
    LedgerEntry,
    LedgerIntegrityError,
    advance,
    build_entry,
    check_entry,
)
from pilothouse.ledger.merkle import CompactRange

PRODUCER = "ledger"
DEAD_LETTERED = "pilothouse.ledger.DeadLettered"  # recorded_type of the entry for a record sent to a .dlq topic
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Entry event ids are derived, not random: the same recorded event at the same place in the same chain always gets
# the same id, so a retried transaction produces byte-identical entries.
_ENTRY_NS = uuid.UUID("5b0f2a52-6c1e-4a53-9d7e-3f1c2b8e4a10")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def from_millis(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)  # exact (a float timestamp would round)


def to_entry_record(entry: LedgerEntry) -> EntryRecord:
    """The bus (Avro) twin of a domain entry."""
    d = entry.to_record()
    d["occurred_at"] = from_millis(entry.occurred_at)
    return EntryRecord(**d)


def to_checkpoint_record(cp: Checkpoint, *, event_id: str | None = None) -> CheckpointRecord:
    eid = event_id or str(uuid.uuid5(_ENTRY_NS, f"checkpoint:{cp.chain}:{cp.tree_size}:{cp.key_id}:{cp.signed_at}"))
    return CheckpointRecord(
        event_id=eid, correlation_id=f"ledger:{cp.chain}", occurred_at=from_millis(cp.signed_at), producer=PRODUCER,
        chain=cp.chain, tree_size=cp.tree_size, root_hash=cp.root_hash, signed_at=from_millis(cp.signed_at),
        key_id=cp.key_id, signature=cp.signature, note=cp.note(), head_hash=cp.head_hash)


class Appender:
    """The chain's single writer. Not thread-safe: it belongs to the one appender loop."""

    def __init__(self, head: ChainHead, *, topic_entries: str, recent: Iterable[tuple[str, int]] = (),
                 window: int = 100_000, clock: Callable[[], int] = now_ms) -> None:
        """``recent``: (recorded_event_id, sequence) of the latest entries, oldest first (from the topic's tail)."""
        self.head = head
        self.topic_entries = topic_entries
        self.window = window
        self._clock = clock
        self._recorded: dict[str, int] = {}
        for rid, seq in recent:
            self._recorded[rid] = seq
        self._trim()
        self._batch_start: ChainHead | None = None
        self._batch_ids: list[str] = []
        self._batch_outputs: dict[tuple[str, int, int], list[Output]] = {}
        self.duplicates_skipped = 0

    @classmethod
    def recover(cls, chain: str, tail: Iterable[Any], *, from_start: bool, **kwargs: Any) -> Appender:
        """From the last records read back from the ledger topic (oldest first): the head is the last entry.

        ``from_start``: the records begin at the topic's first offset (so the first entry must be sequence 0);
        otherwise they are a window of the tail and the first entry is taken on its own hash. Refuses to start on
        tamper evidence (a tombstone, a gap, a broken link, a bad hash): the chain would be continued from a head
        nobody can vouch for.
        """
        head: ChainHead | None = ChainHead.genesis(chain) if from_start else None
        recent: list[tuple[str, int]] = []
        for e in tail:
            if isinstance(e, LedgerEntry) and e.chain != chain:
                continue  # another chain sharing the topic (tests): not ours to extend
            if head is None:
                head = ChainHead(chain, e.sequence, e.prev_hash) if isinstance(e, LedgerEntry) else \
                    ChainHead.genesis(chain)
            problem = check_entry(e, head)
            if problem is not None:
                raise LedgerIntegrityError(problem)
            head = advance(head, e)
            recent.append((e.recorded_event_id, e.sequence))
        return cls(head or ChainHead.genesis(chain), recent=recent, **kwargs)

    def _trim(self) -> None:
        extra = len(self._recorded) - self.window
        if extra > 0:
            for rid in list(self._recorded)[:extra]:
                del self._recorded[rid]

    # ---- batch bookkeeping (the transaction around the handler calls) ------------------------------------------------
    def begin_batch(self) -> None:
        self._batch_start = self.head
        self._batch_ids = []
        self._batch_outputs = {}

    def commit(self) -> None:
        """The batch's transaction committed: its entries are the chain now."""
        self._batch_start = None
        self._batch_ids = []
        self._batch_outputs = {}
        self._trim()

    def rollback(self) -> None:
        """The batch's transaction was aborted for good: forget its entries (their sequences will be reused)."""
        if self._batch_start is not None:
            self.head = self._batch_start
        for rid in self._batch_ids:
            self._recorded.pop(rid, None)
        self._batch_start = None
        self._batch_ids = []
        self._batch_outputs = {}

    # ---- the handler ----------------------------------------------------------------------------------------------
    def seen(self, recorded_event_id: str) -> int | None:
        """The sequence that recorded this event, if it is within the window."""
        return self._recorded.get(recorded_event_id)

    def on_event(self, record: AvroRecord, ctx: MessageContext) -> list[Output]:
        """One decision event -> its ledger entry (none if the event was recorded already)."""
        where = (ctx.topic, ctx.partition, ctx.offset)
        cached = self._batch_outputs.get(where)
        if cached is not None:  # the same batch again, after an aborted attempt: produce exactly the same entries
            return cached
        if record.event_id in self._recorded:
            self.duplicates_skipped += 1
            self._batch_outputs[where] = []
            return []
        entry = self.build(record, ctx)
        out = [Output(record=to_entry_record(entry), key=entry.entry_key, topic=self.topic_entries)]
        self.head = advance(self.head, entry)
        self._recorded[record.event_id] = entry.sequence
        self._batch_ids.append(record.event_id)
        self._batch_outputs[where] = out
        return out

    def on_dead_letter(self, ctx: MessageContext, *, reason: str, value: bytes | None) -> list[Output]:
        """A decision-topic record that went to its dead-letter topic instead: recorded too, so the audit trail has no
        silent hole (which record, where it went, why, and the SHA-256 of its bytes — not the bytes themselves)."""
        where = (ctx.topic, ctx.partition, ctx.offset)
        cached = self._batch_outputs.get(where)
        if cached is not None:
            return cached
        event_id = f"dead-letter:{ctx.topic}:{ctx.partition}:{ctx.offset}"
        if event_id in self._recorded:
            self._batch_outputs[where] = []
            return []
        event = {"event_id": event_id, "dead_lettered_to": ctx.topic + DLQ_SUFFIX, "reason": reason[:2000],
                 "value_sha256": None if value is None else sha256(value).hexdigest(),
                 "value_bytes": None if value is None else len(value),
                 "key": None if ctx.key is None else ctx.key.decode("utf-8", "replace")}
        entry = build_entry(
            self.head, event, event_id=str(uuid.uuid5(_ENTRY_NS, f"{self.head.chain}:{self.head.next_sequence}:"
                                                                 f"{event_id}")),
            occurred_at=self._clock(), producer=PRODUCER, recorded_topic=ctx.topic, recorded_type=DEAD_LETTERED,
            recorded_partition=ctx.partition, recorded_offset=ctx.offset)
        out = [Output(record=to_entry_record(entry), key=entry.entry_key, topic=self.topic_entries)]
        self.head = advance(self.head, entry)
        self._recorded[event_id] = entry.sequence
        self._batch_ids.append(event_id)
        self._batch_outputs[where] = out
        return out

    def build(self, record: AvroRecord, ctx: MessageContext) -> LedgerEntry:
        event = record.model_dump(mode="json")  # datetimes as ISO-8601 strings: plain JSON, hashed as stored
        return build_entry(
            self.head, event,
            event_id=str(uuid.uuid5(_ENTRY_NS, f"{self.head.chain}:{self.head.next_sequence}:{record.event_id}")),
            occurred_at=self._clock(), producer=PRODUCER, recorded_topic=ctx.topic,
            recorded_type=type(record).AVRO_NAME, recorded_partition=ctx.partition, recorded_offset=ctx.offset)


class ChainFollower:
    """Follows one chain entry by entry (for the checkpointer); raises LedgerIntegrityError on tamper evidence."""

    def __init__(self, chain: str) -> None:
        self.head = ChainHead.genesis(chain)
        self._range = CompactRange()
        self.signed_size = 0  # the largest tree size already signed (from the checkpoint file)

    @property
    def size(self) -> int:
        return self._range.size

    def follow(self, item: LedgerEntry | KafkaTombstone | Any) -> bool:
        """Accept the next record of the ledger topic. Entries of other chains are ignored (False)."""
        if isinstance(item, LedgerEntry) and item.chain != self.head.chain:
            return False
        if isinstance(item, KafkaTombstone) and item.key.rpartition(":")[0] != self.head.chain:
            return False
        problem = check_entry(item, self.head)
        if problem is not None:
            raise LedgerIntegrityError(problem)
        self._range.append(bytes.fromhex(item.entry_hash))
        self.head = advance(self.head, item)
        return True

    def due(self, *, every: int, last_signed_at_ms: int, now: int, interval_ms: int) -> bool:
        """A checkpoint is due after ``every`` new entries, or ``interval_ms`` after the last one if any are new."""
        new = self.size - self.signed_size
        return new >= every or (new > 0 and now - last_signed_at_ms >= interval_ms)

    def sign(self, signer: CheckpointSigner, signed_at: int) -> Checkpoint:
        cp = signer.sign(self.head.chain, self.size, self._range.root().hex(), signed_at,
                         self.head.last_hash if self.size else "")
        return cp

