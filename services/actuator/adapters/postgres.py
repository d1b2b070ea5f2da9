"""The actuator's Postgres state (psycopg 3): idempotency records, outbox, consumer offsets, kill switches.

Tables, in one schema (``Settings.postgres_schema``; tests use a uuid-named one):

* ``consumed`` — per (topic, partition) the next Kafka offset already handled. It is written in the *same
  transaction* as whatever the handler decided (idempotency record, outbox rows), so a record redelivered after a
  crash is recognised and skipped (the Kafka-committed offset is only an optimisation).
* ``authorizations`` — every authorization seen (by ``authorization_id``), accepted or refused: a second arrival of
  the same id is a replay.
* ``executions`` — the idempotency record: at most one row per ``action_id`` (primary key). It is inserted as
  ``started`` *before* the target is called; the call carries ``Idempotency-Key = action_id``; the answer moves it to
  ``executed``/``failed`` in the transaction that also writes the outbox row. A ``started`` row left by a crash is
  driven again by the recovery worker with the same key, and the target answers from its journal.
* ``shadow_runs`` — one shadow run per action id.
* ``kill_switches`` — the current scope → engaged state (from the compacted kill-switch topic).
* ``outbox`` — records to publish (ActionExecuted, ActionVerified, ShadowRunCompleted); the relay marks them sent.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pilothouse.bus.errors import PermanentError, RetryableError

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StoreUnavailable(RetryableError):
    """Postgres cannot be reached or the connection broke; the transaction was rolled back."""


class StoreError(PermanentError):
    """Postgres refused a statement (privileges, schema); retrying cannot help."""


DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.consumed (
    topic text NOT NULL, partition integer NOT NULL, next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS {s}.authorizations (
    authorization_id text PRIMARY KEY, action_id text NOT NULL, event_id text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('accepted', 'refused')), reason text NOT NULL DEFAULT '',
    seen_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {s}.executions (
    action_id text PRIMARY KEY, execution_id text NOT NULL UNIQUE, authorization_id text NOT NULL,
    event_id text NOT NULL, incident_id text NOT NULL, correlation_id text NOT NULL,
    action_hash text NOT NULL, action_type text NOT NULL, target_kind text NOT NULL, target text NOT NULL,
    params jsonb NOT NULL, executor text NOT NULL, owner text NOT NULL,
    status text NOT NULL DEFAULT 'started' CHECK (status IN ('started', 'executed', 'failed')),
    attempts integer NOT NULL DEFAULT 0, last_error text NOT NULL DEFAULT '',
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(), finished_at timestamptz,
    authorized_at timestamptz, response jsonb, target_time_s double precision,
    verify_status text CHECK (verify_status IN ('pending', 'rolling_back', 'done')),
    verify_checks jsonb, rollback jsonb);
ALTER TABLE {s}.executions ADD COLUMN IF NOT EXISTS verify_samples jsonb NOT NULL DEFAULT '[]';
CREATE INDEX IF NOT EXISTS executions_open ON {s}.executions (status) WHERE status = 'started';
CREATE INDEX IF NOT EXISTS executions_verify ON {s}.executions (verify_status)
    WHERE verify_status IN ('pending', 'rolling_back');
CREATE TABLE IF NOT EXISTS {s}.shadow_runs (
    action_id text PRIMARY KEY, event_id text NOT NULL, outcome text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {s}.kill_switches (
    scope text PRIMARY KEY, engaged boolean NOT NULL, changed_by text NOT NULL, reason text NOT NULL DEFAULT '',
    event_id text NOT NULL, changed_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    id bigserial PRIMARY KEY, topic text NOT NULL, key text NOT NULL, record_type text NOT NULL,
    event_id text NOT NULL UNIQUE, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(), sent_at timestamptz, error text);
CREATE INDEX IF NOT EXISTS outbox_unsent ON {s}.outbox (id) WHERE sent_at IS NULL AND error IS NULL;
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    key: str
    record_type: str
    payload: dict[str, Any]


class Tx:
    """One open transaction (use :meth:`Store.transaction`)."""

    def __init__(self, conn: psycopg.Connection, schema: str, local: threading.local | None = None):
        self.c = conn
        self.s = schema
        self._local = local

    def _one(self, q: str, args: tuple = ()) -> dict[str, Any] | None:
        with self.c.cursor(row_factory=dict_row) as cur:
            cur.execute(q.replace("{s}", self.s), args)
            return cur.fetchone()

    def _all(self, q: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self.c.cursor(row_factory=dict_row) as cur:
            cur.execute(q.replace("{s}", self.s), args)
            return cur.fetchall()

    def _exec(self, q: str, args: tuple = ()) -> int:
        with self.c.cursor() as cur:
            cur.execute(q.replace("{s}", self.s), args)
            return cur.rowcount

    # ---- time ----
    def db_now(self) -> datetime:
        """The database's clock (clock_timestamp(), not the transaction start)."""
        row = self._one("SELECT clock_timestamp() AS now")
        assert row is not None
        return row["now"]

    # ---- consumer offsets ----
    def consumed(self, topic: str, partition: int, offset: int) -> bool:
        """True if the record at ``offset`` was already handled (its effects are committed)."""
        row = self._one("SELECT next_offset FROM {s}.consumed WHERE topic = %s AND partition = %s FOR UPDATE",
                        (topic, partition))
        return row is not None and offset < row["next_offset"]

    def consumed_offsets(self, topic: str) -> dict[int, int]:
        """partition -> next offset to handle, for one topic."""
        return {r["partition"]: r["next_offset"] for r in
                self._all("SELECT partition, next_offset FROM {s}.consumed WHERE topic = %s", (topic,))}

    def mark_consumed(self, topic: str, partition: int, offset: int) -> None:
        self._exec("INSERT INTO {s}.consumed (topic, partition, next_offset) VALUES (%s, %s, %s) "
                   "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = "
                   "GREATEST({s}.consumed.next_offset, EXCLUDED.next_offset)", (topic, partition, offset + 1))

    # ---- authorizations / executions ----
    def authorization(self, authorization_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM {s}.authorizations WHERE authorization_id = %s", (authorization_id,))

    def record_authorization(self, authorization_id: str, action_id: str, event_id: str, outcome: str,
                             reason: str = "") -> bool:
        """False if this authorization id was already recorded (a replay)."""
        return self._exec("INSERT INTO {s}.authorizations (authorization_id, action_id, event_id, outcome, reason) "
                          "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                          (authorization_id, action_id, event_id, outcome, reason[:2000])) == 1

    def execution(self, action_id: str, *, lock: bool = False) -> dict[str, Any] | None:
        return self._one("SELECT * FROM {s}.executions WHERE action_id = %s" + (" FOR UPDATE" if lock else ""),
                         (action_id,))

    def insert_intent(self, row: dict[str, Any]) -> bool:
        """Insert the ``started`` idempotency record; False if the action id already has one."""
        cols = ("action_id", "execution_id", "authorization_id", "event_id", "incident_id", "correlation_id",
                "action_hash", "action_type", "target_kind", "target", "params", "executor", "owner",
                "authorized_at")
        vals = tuple(Jsonb(row[c]) if c == "params" else row[c] for c in cols)
        return self._exec(f"INSERT INTO {{s}}.executions ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                          "ON CONFLICT (action_id) DO NOTHING", vals) == 1

    def claim_open_executions(self, owner: str, stale_s: float, limit: int = 50) -> list[dict[str, Any]]:
        """``started`` rows another (dead) run left, or ours that have been open longer than ``stale_s``; locked."""
        return self._all("SELECT * FROM {s}.executions WHERE status = 'started' AND (owner <> %s OR started_at < "
                         "clock_timestamp() - make_interval(secs => %s)) ORDER BY started_at LIMIT %s "
                         "FOR UPDATE SKIP LOCKED", (owner, stale_s, limit))

    def note_attempt(self, action_id: str, error: str) -> None:
        self._exec("UPDATE {s}.executions SET attempts = attempts + 1, last_error = %s WHERE action_id = %s",
                   (error[:2000], action_id))

    def finish_execution(self, action_id: str, status: str, response: dict[str, Any], target_time_s: float,
                         verify: bool) -> bool:
        """Move a ``started`` row to its final status; False if it was already finished (by another worker)."""
        return self._exec("UPDATE {s}.executions SET status = %s, response = %s, target_time_s = %s, "
                          "finished_at = clock_timestamp(), attempts = attempts + 1, verify_status = %s "
                          "WHERE action_id = %s AND status = 'started'",
                          (status, Jsonb(response), target_time_s, "pending" if verify else None, action_id)) == 1

    def claim_verifications(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM {s}.executions WHERE verify_status IN ('pending', 'rolling_back') "
                         "ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))

    def add_verify_sample(self, action_id: str, sample: dict[str, Any], keep: int = 120) -> None:
        """Append one observation taken during the verification window (bounded: the latest ``keep``)."""
        self._exec("UPDATE {s}.executions SET verify_samples = (SELECT COALESCE(jsonb_agg(x ORDER BY n), '[]') FROM "
                   "(SELECT x, n FROM jsonb_array_elements(verify_samples || %s) WITH ORDINALITY AS t(x, n) "
                   "ORDER BY n DESC LIMIT %s) AS last) WHERE action_id = %s", (Jsonb([sample]), keep, action_id))

    def start_rollback(self, action_id: str, checks: list[dict[str, Any]], plan: dict[str, Any]) -> None:
        self._exec("UPDATE {s}.executions SET verify_status = 'rolling_back', verify_checks = %s, rollback = %s "
                   "WHERE action_id = %s", (Jsonb(checks), Jsonb(plan), action_id))

    def finish_verification(self, action_id: str, checks: list[dict[str, Any]], rollback: dict[str, Any] | None
                            ) -> bool:
        return self._exec("UPDATE {s}.executions SET verify_status = 'done', verify_checks = %s, "
                          "rollback = COALESCE(%s, rollback) WHERE action_id = %s AND verify_status <> 'done'",
                          (Jsonb(checks), Jsonb(rollback) if rollback is not None else None, action_id)) == 1

    # ---- shadow runs ----
    def shadow_done(self, action_id: str) -> bool:
        return self._one("SELECT 1 AS x FROM {s}.shadow_runs WHERE action_id = %s", (action_id,)) is not None

    def record_shadow(self, action_id: str, event_id: str, outcome: str) -> bool:
        return self._exec("INSERT INTO {s}.shadow_runs (action_id, event_id, outcome) VALUES (%s, %s, %s) "
                          "ON CONFLICT DO NOTHING", (action_id, event_id, outcome)) == 1

    # ---- kill switches ----
    def set_kill_switch(self, scope: str, engaged: bool, changed_by: str, reason: str, event_id: str,
                        changed_at: datetime) -> None:
        self._exec("INSERT INTO {s}.kill_switches (scope, engaged, changed_by, reason, event_id, changed_at) "
                   "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (scope) DO UPDATE SET engaged = EXCLUDED.engaged, "
                   "changed_by = EXCLUDED.changed_by, reason = EXCLUDED.reason, event_id = EXCLUDED.event_id, "
                   "changed_at = EXCLUDED.changed_at", (scope, engaged, changed_by, reason, event_id, changed_at))

    def engaged_scopes(self) -> frozenset[str]:
        return frozenset(r["scope"] for r in self._all("SELECT scope FROM {s}.kill_switches WHERE engaged"))

    # ---- outbox ----
    def enqueue(self, topic: str, key: str, record_type: str, event_id: str, payload: dict[str, Any]) -> None:
        self._exec("INSERT INTO {s}.outbox (topic, key, record_type, event_id, payload) VALUES (%s, %s, %s, %s, %s)",
                   (topic, key, record_type, event_id, Jsonb(payload)))
        if self._local is not None:
            self._local.enqueued = True  # wake the relay once the outermost transaction has committed

    def unsent(self, limit: int) -> list[OutboxRow]:
        rows = self._all("SELECT id, topic, key, record_type, payload FROM {s}.outbox WHERE sent_at IS NULL "
                         "AND error IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
        return [OutboxRow(r["id"], r["topic"], r["key"], r["record_type"], r["payload"]) for r in rows]

    def mark_unpublishable(self, row_id: int, error: str) -> None:
        """Set a row aside (kept, with the reason) so that it does not block the rows behind it."""
        self._exec("UPDATE {s}.outbox SET error = %s WHERE id = %s", (error[:2000], row_id))

    def mark_sent(self, ids: list[int]) -> None:
        self._exec("UPDATE {s}.outbox SET sent_at = clock_timestamp() WHERE id = ANY(%s)", (ids,))


class Store:
    """Connections to the actuator's schema: one connection per thread, one transaction per unit of work."""

    def __init__(self, dsn: str, schema: str = "actuator", *, connect_timeout_s: int = 5):
        if not _SCHEMA_RE.match(schema):
            raise StoreError(f"invalid schema name {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._all_conns: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self.on_outbox_commit: list = []  # callables run after a commit that added outbox rows (wake the relay)

    def _conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s)
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"cannot connect to Postgres: {e}") from e
            self._local.conn = conn
            with self._lock:
                self._all_conns.append(conn)
        return conn

    def migrate(self) -> None:
        """Create the schema and tables if missing (idempotent)."""
        with self.transaction() as tx:
            tx.c.execute(DDL.replace("{s}", self.schema))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A transaction: committed if the block returns, rolled back if it raises; SDK errors translated."""
        conn = self._conn()
        try:
            with conn.transaction():
                yield Tx(conn, self.schema, self._local)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"Postgres: {e}") from e
        except psycopg.errors.SerializationFailure as e:
            raise StoreUnavailable(f"Postgres serialization failure: {e}") from e
        except psycopg.Error as e:
            raise StoreError(f"Postgres refused: {type(e).__name__}: {e}") from e
        finally:
            outermost = conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            enqueued = getattr(self._local, "enqueued", False)
            if outermost:
                self._local.enqueued = False
        if outermost and enqueued:  # only after a successful commit (an exception skips this line)
            for notify in self.on_outbox_commit:
                notify()

    def drop(self) -> None:
        """Drop the whole schema (tests)."""
        with self.transaction() as tx:
            tx.c.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def close(self) -> None:
        with self._lock:
            for c in self._all_conns:
                with contextlib.suppress(Exception):
                    c.close()
            self._all_conns.clear()


def utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
