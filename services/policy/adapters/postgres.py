"""The policy service's Postgres state (psycopg 3): proposals, validations, approvals, risk budgets, kill switches.

Tables, in one schema (``Settings.postgres_schema``; tests use a uuid-named one):

* ``processed`` — one row per handled input event id, holding the output records the handler produced. It is written
  in the *same transaction* as the state change, so a record redelivered after a crash (the Kafka transaction that
  should have published the outputs aborted) re-emits exactly the stored outputs, with the same event ids.
* ``proposals`` — every proposed action, its status (``held_gate1`` → ``pending_approval`` → ``authorized`` →
  ``executing`` → ``done``, or ``denied`` / ``rejected`` / ``failed``) and the decision that set it.
* ``validations`` / ``approvals`` — Gate 1 verdicts and Gate 2 approvals/rejections as the console recorded them.
* ``budget`` — one row per authorized action: its risk cost, ``reserved`` until the actuator reports it executed
  (then ``consumed``) or refused (``released``). A reservation whose authorization expired unexecuted stops counting.
* ``incidents`` — severity and primary service per incident; ``kill_switches`` — scope → engaged.

Concurrency: a decision that may authorize takes a transaction-scoped advisory lock on its budget scope first
(:meth:`Tx.lock_scope`), then reads the budget, asks OPA and writes the reservation before commit. Two approvals that
race for the last of a budget are therefore serialised: the second sees the first's reservation.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pilothouse.bus.errors import PermanentError, RetryableError

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

STATUSES = ("held_gate1", "pending_approval", "authorized", "executing", "done", "denied", "rejected", "failed")


class StoreUnavailable(RetryableError):
    """Postgres cannot be reached, the connection broke or a serialization failure: the transaction rolled back."""


class StoreError(PermanentError):
    """Postgres refused a statement (privileges, schema); retrying cannot help."""


DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.processed (
    event_id text PRIMARY KEY, topic text NOT NULL, outputs jsonb NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {s}.incidents (
    incident_id text PRIMARY KEY, severity text NOT NULL, primary_service text NOT NULL, version bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {s}.proposals (
    action_id text PRIMARY KEY, incident_id text NOT NULL, hypothesis_id text NOT NULL, event_id text NOT NULL,
    record jsonb NOT NULL, service text NOT NULL, environment text NOT NULL, target_key text NOT NULL,
    status text NOT NULL CHECK (status IN ('held_gate1', 'pending_approval', 'authorized', 'executing', 'done',
                                           'denied', 'rejected', 'failed')),
    decision_id text NOT NULL DEFAULT '', authorization_id text NOT NULL DEFAULT '',
    authorization_expires_at timestamptz, request_expires_at timestamptz, request_event_id text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS proposals_held ON {s}.proposals (hypothesis_id) WHERE status = 'held_gate1';
CREATE INDEX IF NOT EXISTS proposals_in_flight ON {s}.proposals (target_key)
    WHERE status IN ('authorized', 'executing');
CREATE TABLE IF NOT EXISTS {s}.validations (
    hypothesis_id text NOT NULL, event_id text NOT NULL, validator_id text NOT NULL, validator_display text NOT NULL,
    roles jsonb NOT NULL, verdict text NOT NULL, validated_at timestamptz NOT NULL,
    PRIMARY KEY (hypothesis_id, event_id));
CREATE TABLE IF NOT EXISTS {s}.approvals (
    approval_id text PRIMARY KEY, action_id text NOT NULL, event_id text NOT NULL,
    decision text NOT NULL CHECK (decision IN ('approve', 'reject')), approver_id text NOT NULL,
    approver_display text NOT NULL, roles jsonb NOT NULL, action_hash text NOT NULL, granted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL, comment text NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS approvals_action ON {s}.approvals (action_id);
CREATE TABLE IF NOT EXISTS {s}.budget (
    action_id text PRIMARY KEY, scope text NOT NULL, cost double precision NOT NULL CHECK (cost >= 0),
    state text NOT NULL CHECK (state IN ('reserved', 'consumed', 'released')), window_start timestamptz NOT NULL,
    expires_at timestamptz NOT NULL, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS budget_scope ON {s}.budget (scope, window_start);
CREATE TABLE IF NOT EXISTS {s}.kill_switches (
    scope text PRIMARY KEY, engaged boolean NOT NULL, changed_by text NOT NULL, reason text NOT NULL DEFAULT '',
    event_id text NOT NULL, changed_at timestamptz NOT NULL);
"""


class Tx:
    """One open transaction (use :meth:`Store.transaction`)."""

    def __init__(self, conn: psycopg.Connection, schema: str):
        self.c = conn
        self.s = schema

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

    # ---- idempotency ----
    def processed(self, event_id: str) -> list[dict[str, Any]] | None:
        """The outputs stored for an already-handled event id, or None if it is new."""
        row = self._one("SELECT outputs FROM {s}.processed WHERE event_id = %s", (event_id,))
        return None if row is None else list(row["outputs"])

    def mark_processed(self, event_id: str, topic: str, outputs: list[dict[str, Any]]) -> None:
        # No ON CONFLICT: two workers handling the same event id concurrently must not both commit; the loser's
        # unique violation rolls its transaction back.
        self._exec("INSERT INTO {s}.processed (event_id, topic, outputs) VALUES (%s, %s, %s)",
                   (event_id, topic, Jsonb(outputs)))

    # ---- locks ----
    def lock_scope(self, scope: str) -> None:
        """Serialise every decision that may spend the budget of ``scope`` (or, for ``target:<kind>:<name>``,
        change what is in flight on that target) until this transaction ends. Always budget scope first, then
        target; a deadlock between multi-proposal transactions is reported by Postgres and retried."""
        self._exec("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("policy-budget:" + scope,))

    # ---- incidents ----
    def upsert_incident(self, incident_id: str, severity: str, primary_service: str, version: int) -> None:
        self._exec("INSERT INTO {s}.incidents (incident_id, severity, primary_service, version) VALUES (%s,%s,%s,%s) "
                   "ON CONFLICT (incident_id) DO UPDATE SET severity = EXCLUDED.severity, "
                   "primary_service = EXCLUDED.primary_service, version = EXCLUDED.version, "
                   "updated_at = clock_timestamp() WHERE {s}.incidents.version <= EXCLUDED.version",
                   (incident_id, severity, primary_service, version))

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM {s}.incidents WHERE incident_id = %s", (incident_id,))

    # ---- proposals ----
    def insert_proposal(self, row: dict[str, Any]) -> bool:
        """False if this action id is already known (a re-proposal of the same action id is not decided twice)."""
        cols = ("action_id", "incident_id", "hypothesis_id", "event_id", "record", "service", "environment",
                "target_key", "status")
        vals = tuple(Jsonb(row[c]) if c == "record" else row[c] for c in cols)
        return self._exec(f"INSERT INTO {{s}}.proposals ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                          "ON CONFLICT (action_id) DO NOTHING", vals) == 1

    def proposal(self, action_id: str, *, lock: bool = False) -> dict[str, Any] | None:
        return self._one("SELECT * FROM {s}.proposals WHERE action_id = %s" + (" FOR UPDATE" if lock else ""),
                         (action_id,))

    def update_proposal(self, action_id: str, **fields: Any) -> None:
        if not fields:
            return
        if "status" in fields and fields["status"] not in STATUSES:
            raise StoreError(f"unknown proposal status {fields['status']!r}")
        sets = ", ".join(f"{k} = %s" for k in fields)
        self._exec(f"UPDATE {{s}}.proposals SET {sets}, updated_at = clock_timestamp() WHERE action_id = %s",
                   (*fields.values(), action_id))

    def held_for_hypothesis(self, hypothesis_id: str) -> list[str]:
        rows = self._all("SELECT action_id FROM {s}.proposals WHERE hypothesis_id = %s AND status = 'held_gate1' "
                         "ORDER BY created_at, action_id", (hypothesis_id,))
        return [r["action_id"] for r in rows]

    def in_flight(self, target_key: str, exclude_action_id: str, now: datetime) -> int:
        """Other state-changing actions on the same target authorized (and not expired) or executing but not yet
        verified. Read-only diagnostics never count: looking does not compete with changing."""
        row = self._one("SELECT count(*) AS n FROM {s}.proposals WHERE target_key = %s AND action_id <> %s AND "
                        "NOT (record ->> 'read_only')::boolean AND "
                        "(status = 'executing' OR (status = 'authorized' AND authorization_expires_at > %s))",
                        (target_key, exclude_action_id, now))
        return int(row["n"]) if row else 0

    # ---- validations / approvals ----
    def add_validation(self, hypothesis_id: str, event_id: str, validator_id: str, display: str, roles: list[str],
                       verdict: str, validated_at: datetime) -> None:
        self._exec("INSERT INTO {s}.validations (hypothesis_id, event_id, validator_id, validator_display, roles, "
                   "verdict, validated_at) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                   (hypothesis_id, event_id, validator_id, display, Jsonb(roles), verdict, validated_at))

    def validations(self, hypothesis_id: str) -> list[dict[str, Any]]:
        """Each validator's latest verdict on the hypothesis (a later rejection withdraws a validation)."""
        return self._all("SELECT DISTINCT ON (validator_id) * FROM {s}.validations WHERE hypothesis_id = %s "
                         "ORDER BY validator_id, validated_at DESC, event_id DESC", (hypothesis_id,))

    def add_approval(self, row: dict[str, Any]) -> bool:
        cols = ("approval_id", "action_id", "event_id", "decision", "approver_id", "approver_display", "roles",
                "action_hash", "granted_at", "expires_at", "comment")
        vals = tuple(Jsonb(row[c]) if c == "roles" else row[c] for c in cols)
        return self._exec(f"INSERT INTO {{s}}.approvals ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                          "ON CONFLICT (approval_id) DO NOTHING", vals) == 1

    def approvals(self, action_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM {s}.approvals WHERE action_id = %s ORDER BY granted_at, approval_id",
                         (action_id,))

    # ---- budgets ----
    def budget_consumed(self, scope: str, window_start: datetime, now: datetime) -> float:
        """Executed plus reserved (authorized, unexpired, not yet executed) cost in the scope's current window."""
        row = self._one("SELECT COALESCE(sum(cost), 0) AS c FROM {s}.budget WHERE scope = %s AND window_start = %s "
                        "AND (state = 'consumed' OR (state = 'reserved' AND expires_at > %s))",
                        (scope, window_start, now))
        return float(row["c"]) if row else 0.0

    def reserve(self, action_id: str, scope: str, cost: float, window_start: datetime, expires_at: datetime) -> None:
        self._exec("INSERT INTO {s}.budget (action_id, scope, cost, state, window_start, expires_at) "
                   "VALUES (%s, %s, %s, 'reserved', %s, %s)", (action_id, scope, cost, window_start, expires_at))

    def settle(self, action_id: str, state: str) -> bool:
        """Move a reservation to ``consumed`` or ``released``; False if the action had none."""
        if state not in ("consumed", "released"):
            raise StoreError(f"cannot settle a reservation as {state!r}")
        return self._exec("UPDATE {s}.budget SET state = %s, updated_at = clock_timestamp() WHERE action_id = %s",
                          (state, action_id)) == 1

    def budget_rows(self, scope: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM {s}.budget WHERE scope = %s ORDER BY action_id", (scope,))

    # ---- kill switches ----
    def set_kill_switch(self, scope: str, engaged: bool, changed_by: str, reason: str, event_id: str,
                        changed_at: datetime) -> None:
        """Keep the latest change per scope (an older record arriving late does not undo a newer one)."""
        self._exec("INSERT INTO {s}.kill_switches (scope, engaged, changed_by, reason, event_id, changed_at) "
                   "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (scope) DO UPDATE SET engaged = EXCLUDED.engaged, "
                   "changed_by = EXCLUDED.changed_by, reason = EXCLUDED.reason, event_id = EXCLUDED.event_id, "
                   "changed_at = EXCLUDED.changed_at WHERE {s}.kill_switches.changed_at <= EXCLUDED.changed_at",
                   (scope, engaged, changed_by, reason, event_id, changed_at))

    def engaged_scopes(self) -> frozenset[str]:
        return frozenset(r["scope"] for r in self._all("SELECT scope FROM {s}.kill_switches WHERE engaged"))


class Store:
    """Connections to the policy schema: one connection per thread, one transaction per unit of work."""

    def __init__(self, dsn: str, schema: str = "policy", *, connect_timeout_s: int = 5):
        if not _SCHEMA_RE.match(schema):
            raise StoreError(f"invalid schema name {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._all_conns: list[psycopg.Connection] = []
        self._lock = threading.Lock()

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
                yield Tx(conn, self.schema)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"Postgres: {e}") from e
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as e:
            raise StoreUnavailable(f"Postgres concurrency conflict (retry): {e}") from e
        except psycopg.errors.UniqueViolation as e:
            # Another worker committed the same event id first: retrying finds it processed and re-emits its outputs.
            raise StoreUnavailable(f"Postgres: concurrent duplicate (retry): {e}") from e
        except psycopg.Error as e:
            raise StoreError(f"Postgres refused: {type(e).__name__}: {e}") from e

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


def recorded_decisions(dsn: str, schema: str, *, ledger: bool = False, limit: int = 100_000) -> list[dict[str, Any]]:
    """PolicyDecided records (as JSON objects) from Postgres, oldest first, for ``pilothouse policy replay``.

    ``ledger=False``: the policy service's own outputs (``<schema>.processed``). ``ledger=True``: the ledger's
    Postgres mirror (``<schema>.ledger_entries``, payload of the recorded PolicyDecided events)."""
    if not _SCHEMA_RE.match(schema):
        raise StoreError(f"invalid schema name {schema!r}")
    if ledger:
        q = (f"SELECT payload_json::jsonb AS d FROM {schema}.ledger_entries "
             "WHERE recorded_type = 'pilothouse.policy.PolicyDecided' ORDER BY id LIMIT %s")
    else:
        q = (f"SELECT o.value -> 'record' AS d FROM {schema}.processed p, jsonb_array_elements(p.outputs) o "
             "WHERE o.value ->> 'type' = 'pilothouse.policy.PolicyDecided' ORDER BY p.processed_at LIMIT %s")
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(q, (limit,))
            rows = [r["d"] for r in cur.fetchall()]
    except psycopg.OperationalError as e:
        raise StoreUnavailable(f"cannot read decisions from Postgres: {e}") from e
    except psycopg.Error as e:
        raise StoreError(f"cannot read decisions from {schema}: {type(e).__name__}: {e}") from e
    return rows
