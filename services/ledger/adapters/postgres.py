"""Postgres mirror of the ledger topic (psycopg 3): append-only tables, batched idempotent writes, replay tracking.

* ``ledger_entries`` — one row per entry, columns in :class:`LedgerEntry` order plus where it was read from.
  Append-only: ``migrate(writer_role=...)`` revokes UPDATE/DELETE/TRUNCATE from the writer role and PUBLIC, and BEFORE
  UPDATE/DELETE/TRUNCATE statement triggers raise; they are ``ENABLE ALWAYS`` so they also fire with
  ``session_replication_role = replica``. Only someone who can ``ALTER TABLE ... DISABLE TRIGGER`` (the owner or a
  superuser) can change rows — and :func:`pilothouse.ledger.domain.verify` with the signed checkpoints catches that.
* ``ledger_tracking`` — per (consumer group, topic, partition) the next Kafka offset to mirror, written in the *same
  transaction* as the entries (as eventsourcing's tracking records do): a crash loses or repeats nothing, and a
  restart resumes from :meth:`PostgresLedgerMirror.next_offsets`.
* ``ledger_checkpoints`` — the signed checkpoints, append-only too (they also go to a file outside Postgres).

Writes are batched: one transaction per batch, rows sent with COPY (never a commit per entry). Before writing, each
batch is checked against the stored chain heads (:func:`check_batch`): a gap, tombstone, broken link or bad hash stops
the batch there — the valid prefix is committed with its offsets, then :class:`LedgerIntegrityError` says what and
where, so the bad record is neither written nor skipped (a restart meets it again). Entries the table already holds
(a replay) are compared by hash and skipped; a different entry under an existing (chain, sequence) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.ledger.domain import (
    ChainHead,
    Checkpoint,
    KafkaTombstone,
    LedgerEntry,
    LedgerIntegrityError,
    Problem,
    ProblemKind,
    check_batch,
)

ENTRY_COLUMNS = LedgerEntry._fields
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_COL_TYPES = {
    "chain": "text NOT NULL", "sequence": "bigint NOT NULL CHECK (sequence >= 0)", "entry_key": "text NOT NULL",
    "prev_hash": "text NOT NULL", "event_id": "text NOT NULL", "incident_id": "text", "correlation_id": "text NOT NULL",
    "causation_id": "text", "occurred_at": "bigint NOT NULL", "producer": "text NOT NULL",
    "recorded_event_id": "text NOT NULL", "recorded_topic": "text NOT NULL", "recorded_partition": "integer NOT NULL",
    "recorded_offset": "bigint NOT NULL", "recorded_type": "text NOT NULL", "payload_sha256": "text NOT NULL",
    "payload_json": "text NOT NULL", "entry_hash": "text NOT NULL",
}
assert tuple(_COL_TYPES) == ENTRY_COLUMNS


class LedgerStoreUnavailable(RetryableError):
    """Postgres cannot be reached or the connection broke; nothing of the batch was committed. Try again."""


class LedgerStoreError(PermanentError):
    """Postgres refused the operation (privileges, constraint, conflicting entry); retrying cannot help."""


class MirrorRecord(NamedTuple):
    """One record read from the ledger topic: its partition and offset, and the entry (or a tombstone)."""

    partition: int
    offset: int
    value: LedgerEntry | KafkaTombstone | None


def _as_entry(value: Any) -> Any:
    # Rows built elsewhere as plain tuples are accepted; anything else is left for check_batch to report.
    if isinstance(value, tuple) and not isinstance(value, LedgerEntry | KafkaTombstone) and len(value) == len(
            ENTRY_COLUMNS):
        return LedgerEntry._make(value)
    return value


class MirrorResult(NamedTuple):
    written: int        # new entries inserted
    replayed: int       # entries already in the table (identical), skipped
    already_mirrored: int  # records below the stored offset, skipped
    next_offsets: dict[int, int]  # partition -> next offset to read


def _migration(schema: str) -> list[sql.Composable]:
    s = sql.Identifier(schema)
    cols = sql.SQL(",\n  ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in _COL_TYPES.items())
    refuse = sql.SQL("""CREATE OR REPLACE FUNCTION {s}.ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'pilothouse ledger table %.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$f$""").format(s=s)
    stmts: list[sql.Composable] = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s),
        sql.SQL("""CREATE TABLE IF NOT EXISTS {s}.ledger_entries (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  {cols},
  mirrored_topic text NOT NULL,
  mirrored_partition integer NOT NULL,
  mirrored_offset bigint NOT NULL,
  mirrored_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT ledger_entries_chain_sequence UNIQUE (chain, sequence)
)""").format(s=s, cols=cols),
        sql.SQL("""CREATE TABLE IF NOT EXISTS {s}.ledger_tracking (
  consumer_group text NOT NULL,
  topic text NOT NULL,
  partition integer NOT NULL,
  next_offset bigint NOT NULL CHECK (next_offset >= 0),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer_group, topic, partition)
)""").format(s=s),
        sql.SQL("""CREATE TABLE IF NOT EXISTS {s}.ledger_checkpoints (
  chain text NOT NULL,
  tree_size bigint NOT NULL CHECK (tree_size >= 0),
  root_hash text NOT NULL,
  signed_at bigint NOT NULL,
  key_id text NOT NULL,
  signature text NOT NULL,
  head_hash text NOT NULL DEFAULT '',
  stored_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (chain, tree_size, key_id)
)""").format(s=s),
        refuse,
    ]
    for table in ("ledger_entries", "ledger_checkpoints"):
        t = sql.Identifier(table)
        for name, event in ((f"{table}_no_update_delete", "UPDATE OR DELETE"), (f"{table}_no_truncate", "TRUNCATE")):
            stmts.append(sql.SQL("CREATE OR REPLACE TRIGGER {n} BEFORE {e} ON {s}.{t} FOR EACH STATEMENT "
                                 "EXECUTE FUNCTION {s}.ledger_refuse_change()").format(
                n=sql.Identifier(name), e=sql.SQL(event), s=s, t=t))
            stmts.append(sql.SQL("ALTER TABLE {s}.{t} ENABLE ALWAYS TRIGGER {n}").format(
                s=s, t=t, n=sql.Identifier(name)))
        stmts.append(sql.SQL("REVOKE UPDATE, DELETE, TRUNCATE ON {s}.{t} FROM PUBLIC").format(s=s, t=t))
    return stmts


class PostgresLedgerMirror:
    """Mirror of the ledger topic into ``<schema>.ledger_entries``. Not thread-safe: one per consumer."""

    def __init__(self, conninfo: str, *, schema: str = "pilothouse_ledger",
                 consumer_group: str = "pilothouse.ledger.mirror", connect_timeout_s: int = 10) -> None:
        if not _SCHEMA_RE.fullmatch(schema):
            raise LedgerStoreError(f"schema name {schema!r} must match {_SCHEMA_RE.pattern}")
        self._conninfo = conninfo
        self.schema = schema
        self.consumer_group = consumer_group
        self._timeout = connect_timeout_s
        self._conn: psycopg.Connection | None = None
        s = sql.Identifier(schema)
        self._q_lock_init = sql.SQL(
            "INSERT INTO {s}.ledger_tracking (consumer_group, topic, partition, next_offset) "
            "SELECT %s, %s, p, 0 FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING").format(s=s)
        self._q_lock = sql.SQL(
            "SELECT partition, next_offset FROM {s}.ledger_tracking WHERE consumer_group = %s AND topic = %s "
            "AND partition = ANY(%s::int[]) ORDER BY partition FOR UPDATE").format(s=s)
        # Backward index scan on (chain, sequence) per chain: O(log n), whatever the table size.
        self._q_heads = sql.SQL(
            "SELECT c.chain, h.sequence, h.entry_hash FROM unnest(%s::text[]) AS c(chain) "
            "LEFT JOIN LATERAL (SELECT sequence, entry_hash FROM {s}.ledger_entries e WHERE e.chain = c.chain "
            "ORDER BY sequence DESC LIMIT 1) h ON true").format(s=s)
        self._q_stored_hashes = sql.SQL(
            "SELECT sequence, entry_hash FROM {s}.ledger_entries WHERE chain = %s AND sequence = ANY(%s::bigint[])"
        ).format(s=s)
        self._q_copy = sql.SQL("COPY {s}.ledger_entries ({cols}) FROM STDIN").format(
            s=s, cols=sql.SQL(", ").join(map(sql.Identifier, (*ENTRY_COLUMNS, "mirrored_topic", "mirrored_partition",
                                                                "mirrored_offset"))))
        self._q_track = sql.SQL(
            "UPDATE {s}.ledger_tracking SET next_offset = %s, updated_at = now() "
            "WHERE consumer_group = %s AND topic = %s AND partition = %s").format(s=s)
        self._q_read = sql.SQL("SELECT {cols} FROM {s}.ledger_entries {where} ORDER BY id")
        self._cols = sql.SQL(", ").join(map(sql.Identifier, ENTRY_COLUMNS))

    # ---- connection -----------------------------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                # autocommit: every unit of work is an explicit `with conn.transaction()` block (BEGIN ... COMMIT)
                self._conn = psycopg.connect(self._conninfo, connect_timeout=self._timeout, autocommit=True,
                                             application_name="pilothouse-ledger-mirror")
            except psycopg.OperationalError as e:
                raise LedgerStoreUnavailable(f"cannot connect to Postgres: {e}") from e
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> PostgresLedgerMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _translate(self, e: psycopg.Error, what: str) -> PermanentError | RetryableError:
        if isinstance(e, psycopg.OperationalError) and not isinstance(e, psycopg.errors.InsufficientPrivilege):
            return LedgerStoreUnavailable(f"{what}: {e}")
        return LedgerStoreError(f"{what}: {type(e).__name__}: {e}")

    # ---- schema -----------------------------------------------------------------------------------------------------
    def migrate(self, *, writer_role: str | None = None) -> None:
        """Create or update the tables, triggers and grants (idempotent; serialised by an advisory lock).

        Run as the schema owner. ``writer_role`` (the mirror's login role, if different) gets SELECT/INSERT only on
        the append-only tables and SELECT/INSERT/UPDATE on the tracking table.
        """
        conn = self._connection()
        s = sql.Identifier(self.schema)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pilothouse.ledger:{self.schema}",))
                for stmt in _migration(self.schema):
                    conn.execute(stmt)
                if writer_role is not None:
                    r = sql.Identifier(writer_role)
                    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {s} TO {r}").format(s=s, r=r))
                    for table in ("ledger_entries", "ledger_checkpoints"):
                        t = sql.Identifier(table)
                        conn.execute(sql.SQL("GRANT SELECT, INSERT ON {s}.{t} TO {r}").format(s=s, t=t, r=r))
                        conn.execute(sql.SQL("REVOKE UPDATE, DELETE, TRUNCATE ON {s}.{t} FROM {r}").format(
                            s=s, t=t, r=r))
                    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON {s}.ledger_tracking TO {r}").format(
                        s=s, r=r))
        except psycopg.Error as e:
            raise self._translate(e, f"migration of schema {self.schema!r} failed") from e

    # ---- writing ----------------------------------------------------------------------------------------------------
    def next_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to read: where a restarted mirror seeks to."""
        conn = self._connection()
        try:
            with conn.transaction():
                rows = conn.execute(sql.SQL(
                    "SELECT partition, next_offset FROM {s}.ledger_tracking WHERE consumer_group = %s AND topic = %s"
                ).format(s=sql.Identifier(self.schema)), (self.consumer_group, topic)).fetchall()
        except psycopg.Error as e:
            raise self._translate(e, "reading stored offsets failed") from e
        return dict(rows)

    def write_batch(self, topic: str, records: Sequence[MirrorRecord]) -> MirrorResult:
        """Mirror ``records`` (in the order consumed) in one transaction; see the module docstring.

        Raises :class:`LedgerIntegrityError` after committing the valid prefix when a record is tamper evidence,
        :class:`LedgerStoreUnavailable` (retry) when Postgres is unreachable, :class:`LedgerStoreError` otherwise.
        """
        if not records:
            return MirrorResult(0, 0, 0, {})
        conn = self._connection()
        partitions = sorted({r.partition for r in records})
        problem: Problem | None = None
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(self._q_lock_init, (self.consumer_group, topic, partitions))
                stored = dict(cur.execute(self._q_lock, (self.consumer_group, topic, partitions)).fetchall())
                fresh = [r for r in records if r.offset >= stored[r.partition]]
                already = len(records) - len(fresh)
                values = [_as_entry(r.value) for r in fresh]
                heads = self._heads(cur, values)
                fresh, values, replayed = self._drop_replays(cur, fresh, values, heads)
                accepted, problem, _ = check_batch(heads, values)
                if accepted:
                    with cur.copy(self._q_copy) as copy:
                        for r in fresh[:accepted]:
                            copy.write_row((*r.value, topic, r.partition, r.offset))
                next_offsets = dict(stored)
                for r in fresh[:accepted]:
                    next_offsets[r.partition] = max(next_offsets[r.partition], r.offset + 1)
                for r in replayed:
                    next_offsets[r.partition] = max(next_offsets[r.partition], r.offset + 1)
                for p in partitions:
                    if next_offsets[p] != stored[p]:
                        cur.execute(self._q_track, (next_offsets[p], self.consumer_group, topic, p))
        except psycopg.Error as e:
            raise self._translate(e, f"mirroring {len(records)} records of {topic} failed") from e
        if problem is not None:
            bad = fresh[accepted]
            raise LedgerIntegrityError(
                Problem(problem.kind, problem.chain, problem.sequence, "kafka",
                        f"{problem.detail} [topic {topic}, partition {bad.partition}, offset {bad.offset}; "
                        f"{accepted} earlier records mirrored, this one and later ones not]"),
                accepted=accepted)
        return MirrorResult(accepted, len(replayed), already, next_offsets)

    def _heads(self, cur: psycopg.Cursor, values: Sequence[Any]) -> dict[str, ChainHead]:
        chains = sorted({v.chain for v in values if isinstance(v, LedgerEntry) and isinstance(v.chain, str)})
        if not chains:
            return {}
        heads: dict[str, ChainHead] = {}
        for chain, seq, h in cur.execute(self._q_heads, (chains,), prepare=False).fetchall():
            if seq is not None:
                heads[chain] = ChainHead(chain, seq + 1, h)
        return heads

    def _drop_replays(self, cur: psycopg.Cursor, fresh: list[MirrorRecord], values: list[Any],
                      heads: dict[str, ChainHead]) -> tuple[list[MirrorRecord], list[Any], list[MirrorRecord]]:
        """Leading entries the table already holds (sequence below the stored head): skip them if identical."""
        replayed: list[MirrorRecord] = []
        i = 0
        while i < len(values):
            v = values[i]
            head = heads.get(v[0]) if isinstance(v, LedgerEntry) else None
            if head is None or not isinstance(v.sequence, int) or v.sequence >= head.next_sequence:
                break
            i += 1
        if i == 0:
            return fresh, values, replayed
        by_chain: dict[str, list[int]] = {}
        for v in values[:i]:
            by_chain.setdefault(v.chain, []).append(v.sequence)
        stored: dict[tuple[str, int], str] = {}
        for chain, seqs in by_chain.items():
            for seq, h in cur.execute(self._q_stored_hashes, (chain, seqs)).fetchall():
                stored[(chain, seq)] = h
        for r, v in zip(fresh[:i], values[:i], strict=True):
            if stored.get((v.chain, v.sequence)) != v.entry_hash:
                raise LedgerIntegrityError(Problem(
                    ProblemKind.DUPLICATE, v.chain, v.sequence, "kafka",
                    f"offset {r.offset} carries sequence {v.sequence}, which Postgres already holds with a different "
                    "hash (a fork); nothing of this batch was written"))
            replayed.append(r)
        return fresh[i:], values[i:], replayed

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def append_checkpoints(self, checkpoints: Iterable[Checkpoint]) -> int:
        """Store signed checkpoints (idempotent). A different checkpoint for the same (chain, size, key) is refused."""
        cps = list(checkpoints)
        if not cps:
            return 0
        conn = self._connection()
        s = sql.Identifier(self.schema)
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql.SQL(
                    "INSERT INTO {s}.ledger_checkpoints (chain, tree_size, root_hash, signed_at, key_id, signature, "
                    "head_hash) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING").format(s=s),
                    [(c.chain, c.tree_size, c.root_hash, c.signed_at, c.key_id, c.signature, c.head_hash)
                     for c in cps])
                for c in cps:
                    row = cur.execute(sql.SQL(
                        "SELECT root_hash, head_hash FROM {s}.ledger_checkpoints "
                        "WHERE chain = %s AND tree_size = %s AND key_id = %s").format(s=s),
                        (c.chain, c.tree_size, c.key_id)).fetchone()
                    if row != (c.root_hash, c.head_hash):
                        raise LedgerStoreError(
                            f"a different checkpoint for chain {c.chain!r} at size {c.tree_size} by {c.key_id!r} is "
                            "already stored (a split view); refusing to store this one")
        except psycopg.Error as e:
            raise self._translate(e, "storing checkpoints failed") from e
        return len(cps)

    def read_checkpoints(self, chain: str | None = None) -> list[Checkpoint]:
        conn = self._connection()
        where, params = (sql.SQL("WHERE chain = %s"), (chain,)) if chain is not None else (sql.SQL(""), ())
        try:
            with conn.transaction():
                rows = conn.execute(sql.SQL(
                    "SELECT chain, tree_size, root_hash, signed_at, key_id, signature, head_hash "
                    "FROM {s}.ledger_checkpoints {w} ORDER BY chain, tree_size").format(
                    s=sql.Identifier(self.schema), w=where), params).fetchall()
        except psycopg.Error as e:
            raise self._translate(e, "reading checkpoints failed") from e
        return [Checkpoint(*r) for r in rows]

    # ---- reading ----------------------------------------------------------------------------------------------------
    def iter_entries(self, batch: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        """Rows in insertion order, ``batch`` at a time, from one snapshot (a server-side cursor): bounded memory.

        The snapshot is taken when the first batch is asked for; read what must be older (Kafka) after that.
        """
        conn = self._connection()
        query = self._q_read.format(cols=self._cols, s=sql.Identifier(self.schema), where=sql.SQL(""))
        try:
            with conn.transaction(), conn.cursor(name=f"ledger_read_{id(self):x}") as cur:
                cur.itersize = batch
                cur.execute(query)
                while True:
                    rows = cur.fetchmany(batch)
                    if not rows:
                        return
                    yield rows
        except psycopg.Error as e:
            raise self._translate(e, "reading ledger entries failed") from e

    def read_entries(self, chain: str | None = None) -> list[tuple[Any, ...]]:
        """Rows in insertion order, columns in :class:`LedgerEntry` order: the Postgres rows :func:`verify` takes."""
        conn = self._connection()
        where, params = (sql.SQL("WHERE chain = %s"), (chain,)) if chain is not None else (sql.SQL(""), ())
        try:
            with conn.transaction():
                return conn.execute(self._q_read.format(cols=self._cols, s=sql.Identifier(self.schema), where=where),
                                    params).fetchall()
        except psycopg.Error as e:
            raise self._translate(e, "reading ledger entries failed") from e
