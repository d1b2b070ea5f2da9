"""Postgres-only audit (kept for scripts that call it): the Postgres rows, the checkpoint file and table, optionally a
dump of the ledger topic (``--kafka-jsonl``: one decoded entry per line, ``null`` for a tombstone).

``pilothouse ledger verify`` (:mod:`pilothouse.ledger.cli`) supersedes it: it reads the ledger and checkpoints topics
from the broker as well, streams in bounded memory, and reuses :func:`load_public_key` and the dump reader from here.

Exit status: 0 verified, 1 tamper evidence found (the report says the first bad sequence and what), 2 cannot audit.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from pilothouse.bus.errors import PilothouseError
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.adapters.postgres import PostgresLedgerMirror
from pilothouse.ledger.domain import Checkpoint, EntryInvalid, KafkaTombstone, LedgerEntry, key_id_for, verify


def load_public_key(spec: str) -> tuple[str, Ed25519PublicKey]:
    """``NAME=PATH`` (PEM) or ``NAME=BASE64`` (the raw 32-byte key) -> (key id, key)."""
    name, sep, value = spec.partition("=")
    if not sep:
        raise EntryInvalid(f"--public-key {spec!r}: expected NAME=PEMFILE or NAME=BASE64")
    path = Path(value)
    if path.is_file():
        key = load_pem_public_key(path.read_bytes())
    else:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(value, validate=True))
    if not isinstance(key, Ed25519PublicKey):
        raise EntryInvalid(f"--public-key {name}: not an Ed25519 public key")
    return key_id_for(name, key), key


def _kafka_dump(path: Path) -> list[Any]:
    entries: list[Any] = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        record = orjson.loads(line)
        if record is None:
            entries.append(KafkaTombstone(f"?:{number}"))
        else:
            try:
                entries.append(LedgerEntry.from_record(record))
            except (EntryInvalid, TypeError, AttributeError) as e:
                raise EntryInvalid(f"{path}:{number}: not a ledger entry: {e}") from e
    return entries


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse ledger verify --public-key NAME=KEY [--dsn DSN] [--schema S] [--checkpoint-dir DIR]``."""
    ap = argparse.ArgumentParser(prog="pilothouse ledger verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PILOTHOUSE_POSTGRES_DSN"),
                    help="libpq DSN (default: env PILOTHOUSE_POSTGRES_DSN)")
    ap.add_argument("--schema", default="pilothouse_ledger")
    ap.add_argument("--checkpoint-dir", type=Path, help="directory of the append-only checkpoints.jsonl")
    ap.add_argument("--public-key", action="append", default=[], required=True,
                    help="trusted signer, NAME=PEMFILE or NAME=BASE64 (repeatable)")
    ap.add_argument("--kafka-jsonl", type=Path, help="optional dump of the ledger topic to compare with")
    ap.add_argument("--mirror-may-lag", action="store_true", help="Postgres behind the Kafka dump is not an error")
    ap.add_argument("--no-roots", action="store_true", help="check signed head hashes only (faster)")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {}
    try:
        if not args.dsn:
            raise EntryInvalid("no Postgres DSN: pass --dsn or set PILOTHOUSE_POSTGRES_DSN")
        keys = dict(load_public_key(s) for s in args.public_key)
        checkpoints: list[Checkpoint] = []
        if args.checkpoint_dir is not None:
            loaded = CheckpointFile(args.checkpoint_dir).load()
            checkpoints += loaded.checkpoints
            report["checkpoint_file_rejected_lines"] = loaded.rejected
        with PostgresLedgerMirror(args.dsn, schema=args.schema) as mirror:
            rows = mirror.read_entries()
            checkpoints += mirror.read_checkpoints()
        kafka = _kafka_dump(args.kafka_jsonl) if args.kafka_jsonl else None
    except (PilothouseError, OSError, ValueError) as e:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), file=sys.stderr)
        return 2
    result = verify(kafka, rows, set(checkpoints), keys, mirror_may_lag=args.mirror_may_lag,
                    recompute_roots=not args.no_roots)
    report.update({
        "ok": result.ok,
        "entries": result.entries,
        "checkpoints_verified": result.checkpoints_verified,
        "first": None if result.first is None else {
            "kind": result.first.kind.value, "chain": result.first.chain, "sequence": result.first.sequence,
            "source": result.first.source, "detail": result.first.detail},
        "problems": [str(p) for p in result.problems],
    })
    print(json.dumps(report, indent=2))
    return 0 if result.ok and not report.get("checkpoint_file_rejected_lines") else 1
