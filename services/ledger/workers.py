"""The ledger process's three workers (each on its own thread under :class:`pilothouse.bus.service.ServiceRuntime`).

* **appender** — :class:`AppenderWorker`: decision topics → ledger entries, exactly once (Kafka transactions).
* **mirror** — :class:`MirrorWorker`: ledger topic → Postgres, resuming from the offsets stored with the rows.
* **checkpointer** — :class:`CheckpointWorker`: follows the committed ledger topic, checks every entry, and every N
  entries or T seconds signs the Merkle tree head; the checkpoint goes to the append-only file outside Postgres
  first, then to the checkpoints topic, then to Postgres.

Tamper evidence (a tombstone, a gap, a broken link, a bad hash) stops the mirror and the checkpointer with
:class:`LedgerIntegrityError` — the process exits non-zero and says where — rather than being mirrored or signed
over. Transient failures (Kafka, Postgres, disk) are retried with bounded backoff; nothing is skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from pilothouse.bus.errors import RetryableError
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.adapters.kafka import AppenderProcessor, CheckpointPublisher, TopicReader
from pilothouse.ledger.adapters.postgres import LedgerStoreUnavailable, MirrorRecord, PostgresLedgerMirror
from pilothouse.ledger.domain import Checkpoint, CheckpointSigner, LedgerIntegrityError, Problem, ProblemKind
from pilothouse.ledger.handlers import ChainFollower, now_ms

log = logging.getLogger("pilothouse.ledger")

MIRRORED = Counter("pilothouse_ledger_entries_mirrored_total", "Ledger entries written to Postgres by the mirror")
SIGNED = Counter("pilothouse_ledger_checkpoints_signed_total", "Checkpoints signed (file, topic, Postgres)")
FOLLOWED = Gauge("pilothouse_ledger_checkpointer_tree_size", "Entries the checkpointer has checked so far")
SIGNED_SIZE = Gauge("pilothouse_ledger_signed_tree_size", "Tree size of the latest signed checkpoint")
TAMPER = Counter("pilothouse_ledger_tamper_evidence_total", "Tamper evidence met (tombstone, gap, broken link, ...)",
                 ["worker", "kind"])


class _Stoppable:
    def __init__(self) -> None:
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _backoff(self, attempt: int, base: float = 0.2, cap: float = 5.0) -> None:
        self._stop.wait(min(cap, base * 2 ** min(attempt, 10)))


class AppenderWorker(_Stoppable):
    """Runs the transactional appender; a batch that failed for good was rolled back and rewound: just go on."""

    def __init__(self, processor: AppenderProcessor) -> None:
        super().__init__()
        self.processor = processor

    def stop(self) -> None:
        super().stop()
        self.processor.stop()

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.processor.run()
                return
            except RetryableError as e:
                attempt += 1
                log.warning("appender batch gave up, retrying from the committed offsets",
                            extra={"error": str(e), "attempt": attempt})
                self._backoff(attempt)

    def close(self) -> None:
        self.processor.close()


class MirrorWorker(_Stoppable):
    """Ledger topic → Postgres in batches (rows + next offset in one transaction)."""

    def __init__(self, make_reader: Callable[[dict[int, int]], TopicReader], mirror: PostgresLedgerMirror, *,
                 topic: str, batch: int = 500) -> None:
        super().__init__()
        self._make_reader = make_reader
        self.mirror = mirror
        self.topic = topic
        self.batch = batch
        self.written = 0
        self._reader: TopicReader | None = None

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                offsets = self.mirror.next_offsets(self.topic)
                break
            except LedgerStoreUnavailable as e:
                attempt += 1
                log.warning("mirror cannot reach Postgres", extra={"error": str(e), "attempt": attempt})
                self._backoff(attempt)
        else:
            return
        # Where a restarted mirror resumes: exactly after the last offset committed with the rows.
        self._reader = reader = self._make_reader(offsets)
        pending: list[MirrorRecord] = []
        attempt = 0
        while not self._stop.is_set():
            if not pending:
                try:
                    pending = [MirrorRecord(r.partition, r.offset, reader.entry(r))
                               for r in reader.poll(self.batch, 0.5)]
                except RetryableError as e:
                    attempt += 1
                    log.warning("mirror cannot read the ledger topic", extra={"error": str(e), "attempt": attempt})
                    self._backoff(attempt)
                    continue
                if not pending:
                    continue
            try:
                result = self.mirror.write_batch(self.topic, pending)
            except LedgerStoreUnavailable as e:
                attempt += 1
                log.warning("mirror cannot reach Postgres; retrying the same batch",
                            extra={"error": str(e), "attempt": attempt})
                self._backoff(attempt)
                continue
            except LedgerIntegrityError as e:
                self.written += e.accepted
                MIRRORED.inc(e.accepted)
                TAMPER.labels("mirror", e.problem.kind.value).inc()
                log.critical("tamper evidence on the ledger topic: mirroring stopped", extra={
                    "problem": str(e.problem), "first_bad_sequence": e.problem.sequence})
                raise
            attempt = 0
            self.written += result.written
            MIRRORED.inc(result.written)
            pending = []

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.mirror.close()


class CheckpointWorker(_Stoppable):
    """Follows the committed chain and signs its tree head every ``every`` entries or ``interval_s`` seconds."""

    def __init__(self, reader: TopicReader, follower: ChainFollower, signer: CheckpointSigner, *,
                 file: CheckpointFile, publisher: CheckpointPublisher, mirror: PostgresLedgerMirror | None,
                 every: int, interval_s: float, clock: Callable[[], int] = now_ms) -> None:
        super().__init__()
        self.reader = reader
        self.follower = follower
        self.signer = signer
        self.file = file
        self.publisher = publisher
        self.mirror = mirror
        self.every = every
        self.interval_ms = int(interval_s * 1000)
        self._clock = clock
        self.last: Checkpoint | None = None
        self.signed = 0
        self._unsent: list[Checkpoint] = []  # in the file, not yet on the topic / in Postgres

    def _resume(self) -> None:
        """The last checkpoint this key signed for this chain (from the file: it is outside Postgres and Kafka)."""
        loaded = self.file.load()
        for number, reason in loaded.rejected:
            log.warning("unreadable line in the checkpoint file", extra={"line": number, "reason": reason})
        mine = [cp for cp in loaded.checkpoints
                if cp.chain == self.follower.head.chain and cp.key_id == self.signer.key_id]
        if mine:
            self.last = max(mine, key=lambda c: (c.tree_size, c.signed_at))
            self.follower.signed_size = self.last.tree_size

    def run(self) -> None:
        self._resume()
        caught_up = False
        attempt = 0
        while not self._stop.is_set():
            try:
                for r in self.reader.poll(1000, 0.5):
                    self.follower.follow(self.reader.entry(r))
                    self._check_against_last()
                FOLLOWED.set(self.follower.size)
                if not caught_up and self.reader.at_end:
                    caught_up = True
                    if self.last is not None and self.follower.size < self.last.tree_size:
                        problem = Problem(ProblemKind.TRUNCATED, self.follower.head.chain, self.follower.size,
                                          "kafka", f"the ledger topic holds {self.follower.size} entries but "
                                          f"checkpoint {self.last.tree_size} was signed: tail truncation")
                        raise LedgerIntegrityError(problem)
                if caught_up and self.follower.due(every=self.every, now=self._clock(),
                                                   last_signed_at_ms=self.last.signed_at if self.last else 0,
                                                   interval_ms=self.interval_ms):
                    self._checkpoint()
                self._flush()
                attempt = 0
            except LedgerIntegrityError as e:
                TAMPER.labels("checkpointer", e.problem.kind.value).inc()
                log.critical("tamper evidence on the ledger topic: no more checkpoints are signed",
                             extra={"problem": str(e.problem), "first_bad_sequence": e.problem.sequence})
                raise
            except RetryableError as e:
                attempt += 1
                log.warning("checkpointer retrying", extra={"error": str(e), "attempt": attempt})
                self._backoff(attempt)

    def _check_against_last(self) -> None:
        last = self.last
        if last is not None and self.follower.size == last.tree_size and last.head_hash \
                and self.follower.head.last_hash != last.head_hash:
            raise LedgerIntegrityError(Problem(
                ProblemKind.CHECKPOINT_ROOT_MISMATCH, last.chain, last.tree_size - 1, "kafka",
                f"entry {last.tree_size - 1} on the ledger topic does not match the head hash signed at "
                f"{last.signed_at}: entries were rewritten"))

    def _checkpoint(self) -> None:
        cp = self.follower.sign(self.signer, self._clock())
        self.file.append([cp])  # outside Postgres and Kafka, fsync-ed: the durable copy comes first
        self.last = cp
        self.follower.signed_size = cp.tree_size
        self.signed += 1
        SIGNED.inc()
        SIGNED_SIZE.set(cp.tree_size)
        self._unsent.append(cp)
        log.info("checkpoint signed", extra={"chain": cp.chain, "tree_size": cp.tree_size, "root": cp.root_hash})

    def _flush(self) -> None:
        while self._unsent:
            cp = self._unsent[0]
            self.publisher.publish(cp)
            if self.mirror is not None:
                self.mirror.append_checkpoints([cp])
            self._unsent.pop(0)

    def close(self) -> None:
        self.reader.close()
        if self.mirror is not None:
            self.mirror.close()
