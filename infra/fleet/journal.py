"""Idempotency journal of fleet actions: one record per Idempotency-Key.

Pure bookkeeping (no I/O). The server asks `lookup` before applying an action and calls `record` after; a key seen
before returns the first response and is never applied again. `executions` counts how often the action behind a key
was really applied (at most 1 by construction) so exactly-once delivery can be checked from outside through
GET /actions/log. Dry runs change nothing and are not journaled, so a key used for a dry run stays free for the
real call.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field

from pilothouse.fleet.errors import InvalidRequest, MissingIdempotencyKey

MAX_KEY_LEN = 200
MAX_RECORDS = 50_000  # oldest records are dropped beyond this (said in GET /actions/log as `evicted`)


class ActionRecord(BaseModel):
    key: str
    fingerprint: str
    action: str
    params: dict[str, Any]
    status: int
    body: dict[str, Any]
    executions: int  # times the action was applied under this key (0 for a refused precondition)
    requests: int = 1  # times the key was presented (first call + replays)
    first_tick: int
    last_tick: int


class Journal(BaseModel):
    records: dict[str, ActionRecord] = Field(default_factory=dict)
    evicted: int = 0

    @staticmethod
    def check_key(key: str | None) -> str:
        if key is None or key == "":
            raise MissingIdempotencyKey("the Idempotency-Key header is required on every action call")
        if len(key) > MAX_KEY_LEN or not key.isascii() or not key.isprintable():
            raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY_LEN} printable ASCII characters")
        return key

    @staticmethod
    def fingerprint(action: str, params: dict[str, Any]) -> str:
        canonical = json.dumps({"action": action, "params": params}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def lookup(self, key: str, action: str, params: dict[str, Any], tick: int) -> ActionRecord | None:
        """The earlier record for this key (counting the replay), or None. A key reused for a different request
        is refused: answering it with the first result would hide a caller bug."""
        rec = self.records.get(key)
        if rec is None:
            return None
        if rec.fingerprint != self.fingerprint(action, params):
            raise InvalidRequest("Idempotency-Key was already used for a different request",
                                 first_action=rec.action, first_params=rec.params)
        rec.requests += 1
        rec.last_tick = tick
        return rec

    def record(self, key: str, action: str, params: dict[str, Any], status: int, body: dict[str, Any],
               applied: bool, tick: int) -> ActionRecord:
        rec = ActionRecord(key=key, fingerprint=self.fingerprint(action, params), action=action, params=params,
                           status=status, body=body, executions=1 if applied else 0, first_tick=tick, last_tick=tick)
        self.records[key] = rec
        while len(self.records) > MAX_RECORDS:
            del self.records[next(iter(self.records))]
            self.evicted += 1
        return rec

    def view(self, key: str | None = None) -> dict[str, Any]:
        recs = [self.records[key]] if key is not None and key in self.records else (
            [] if key is not None else list(self.records.values()))
        return {
            "entries": [{"key": r.key, "action": r.action, "params": r.params, "status": r.status,
                         "executions": r.executions, "requests": r.requests, "first_tick": r.first_tick,
                         "last_tick": r.last_tick} for r in recs],
            "total_executions": sum(r.executions for r in self.records.values()),
            "evicted": self.evicted,
        }
