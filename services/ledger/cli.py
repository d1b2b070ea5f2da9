"""``pilothouse ledger ...``: run the service, verify the ledger, prove an entry's inclusion, make a signing key.

* ``pilothouse ledger run [--workers appender,mirror,checkpointer]`` — the service (same as ``python -m
  pilothouse.ledger``).
* ``pilothouse ledger verify`` — reads Postgres (rows and checkpoints table) first, then the Kafka ledger topic and
  checkpoints topic (read_committed, tombstones included), and the checkpoint file outside both; checks the hash chain
  on Kafka, that Postgres agrees with it entry by entry, every checkpoint's signature (trusted keys only) and that
  each one matches the chain. Exit 0 verified, 1 tamper evidence (the first bad sequence number and what is wrong are
  printed), 2 cannot audit (unreachable, bad arguments).
* ``pilothouse ledger prove ENTRY`` — ENTRY is an entry's event id, its entry key, the recorded event's id or a
  sequence number. Verifies the ledger, then prints the RFC 9162 inclusion proof of the entry against the latest
  signed checkpoint that covers it, checked against that checkpoint's signed root. Exit codes as for verify.
* ``pilothouse ledger keygen [--name NAME]`` — a new Ed25519 signing seed and its public key (for settings).

Settings come from ``PILOTHOUSE_LEDGER_*`` and ``PILOTHOUSE_KAFKA_*``; options override them.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PilothouseError, RetryableError
from pilothouse.ledger.adapters.audit import _kafka_dump, load_public_key
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.adapters.postgres import PostgresLedgerMirror
from pilothouse.ledger.config import Settings
from pilothouse.ledger.domain import (
    Checkpoint,
    LedgerEntry,
    Problem,
    StreamingVerifier,
    VerifyResult,
    key_id_for,
    verify,
)
from pilothouse.ledger.merkle import MerkleTree, verify_inclusion
from pilothouse.ledger.native import DEFAULT_THREADS
from pilothouse.ledger.native import load as load_native
from pilothouse.ledger.native import scanner as native_scanner
from pilothouse.ledger.parallel import scanner as parallel_scanner


class _Cannot(Exception):
    """Cannot audit (exit 2)."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for opt, field in (("dsn", "postgres_dsn"), ("schema", "postgres_schema"), ("checkpoint_dir", "checkpoint_dir"),
                       ("topic_entries", "topic_entries"), ("topic_checkpoints", "topic_checkpoints"),
                       ("chain", "chain")):
        value = getattr(args, opt, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def trusted_keys(settings: Settings, specs: list[str]) -> dict[str, Ed25519PublicKey]:
    """Keys given on the command line and in settings (PILOTHOUSE_LEDGER_TRUSTED_KEYS), plus the configured signer's."""
    keys = dict(load_public_key(s) for s in specs)
    for name, b64 in settings.trusted_keys.items():
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))
        keys[key_id_for(name, key)] = key
    if settings.signing_key is not None:
        seed = base64.b64decode(settings.signing_key.get_secret_value())
        pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        keys[key_id_for(settings.signing_key_name, pub)] = pub
    return keys


class Sources:
    """Everything read for an audit, Postgres before Kafka (so Kafka holds at least what Postgres does)."""

    def __init__(self) -> None:
        self.postgres_rows: list[tuple[Any, ...]] | None = None
        self.kafka_entries: list[Any] | None = None
        self.checkpoints: set[Checkpoint] = set()
        self.rejected: list[str] = []  # checkpoint-file lines / checkpoint-topic records that are not checkpoints
        self.read: dict[str, Any] = {}


def read_sources(settings: Settings, args: argparse.Namespace) -> Sources:
    src = Sources()
    loaded = CheckpointFile(settings.checkpoint_dir).load()
    src.checkpoints.update(loaded.checkpoints)
    src.rejected += [f"checkpoint file line {n}: {why}" for n, why in loaded.rejected]
    src.read["checkpoint_file"] = {"path": str(CheckpointFile(settings.checkpoint_dir).path),
                                   "checkpoints": len(loaded.checkpoints)}
    if not args.no_postgres:
        if settings.postgres_dsn is None:
            raise _Cannot("no Postgres DSN: pass --dsn, set PILOTHOUSE_LEDGER_POSTGRES_DSN, or use --no-postgres")
        with PostgresLedgerMirror(settings.postgres_dsn.get_secret_value(), schema=settings.postgres_schema) as m:
            src.postgres_rows = m.read_entries()
            table_cps = m.read_checkpoints()
        src.checkpoints.update(table_cps)
        src.read["postgres"] = {"rows": len(src.postgres_rows), "checkpoints": len(table_cps)}
    if args.kafka_jsonl is not None:
        src.kafka_entries = _kafka_dump(args.kafka_jsonl)
        src.read["kafka_jsonl"] = {"records": len(src.kafka_entries)}
    elif not args.no_kafka:
        from pilothouse.bus.producer import BusProducer  # noqa: PLC0415 - only when Kafka is read
        from pilothouse.ledger.adapters.kafka import read_all  # noqa: PLC0415

        bus = BusSettings(client_id="pilothouse-ledger-verify")
        producer = BusProducer(bus)
        raw, reader = read_all(bus, settings.topic_entries, producer, group_prefix=settings.group_prefix,
                               timeout_s=args.timeout)
        src.kafka_entries = [reader.entry(r) for r in raw]
        raw_cps, cp_reader = read_all(bus, settings.topic_checkpoints, producer, group_prefix=settings.group_prefix,
                                      timeout_s=args.timeout)
        topic_cps = 0
        for r in raw_cps:
            cp = cp_reader.checkpoint(r)
            if isinstance(cp, Checkpoint):
                src.checkpoints.add(cp)
                topic_cps += 1
            else:
                src.rejected.append(f"checkpoints topic {cp.reason}")
        src.read["kafka"] = {"entries_topic": settings.topic_entries, "records": len(raw),
                             "checkpoints_topic": settings.topic_checkpoints, "checkpoints": topic_cps}
    if src.postgres_rows is None and src.kafka_entries is None:
        raise _Cannot("nothing to verify: both Kafka and Postgres were left out")
    return src


STREAM_CHUNK = 10_000
COMPILED_CHUNK = 1 << 14  # the compiled scanner: chunks on Merkle subtree boundaries (it hashes their levels itself)
PARALLEL_CHUNK = 1 << 16  # with --processes: fewer forks, and chunks on Merkle subtree boundaries
PARALLEL_MIN_ENTRIES = 20_000  # below this a chunk is checked in this process (a fork costs more)
PARALLEL_ALIGN = 4096  # range boundaries, in chain positions (each range hashes its Merkle subtrees up to this size)


def _scanner(args: argparse.Namespace) -> tuple[Any, int, dict[str, Any]]:
    """The hash-chain scanner (None: the pure-Python reference, in this process), its chunk size, and what to report.

    Default (``--verifier auto``): the compiled scanner on ``--threads`` threads (default 1, see native.py) when it
    is installed or can be built, else the reference. ``--processes N`` (N >= 2): the reference in N forked
    processes. ``--verifier python``: the reference only; ``--verifier compiled``: refuse to run without it.
    """
    processes = getattr(args, "processes", 1)
    choice = getattr(args, "verifier", "auto")
    if processes >= 2:
        return (parallel_scanner(processes, min_entries=PARALLEL_MIN_ENTRIES, align=PARALLEL_ALIGN), PARALLEL_CHUNK,
                {"engine": "python", "processes": processes})
    if choice == "python":
        return None, STREAM_CHUNK, {"engine": "python", "threads": 1}
    native = load_native()
    threads = getattr(args, "threads", None) or DEFAULT_THREADS
    scan = native_scanner(threads, native) if native.available else None
    if scan is None:
        if choice == "compiled":
            raise _Cannot(f"--verifier compiled: {native.origin}")
        return None, STREAM_CHUNK, {"engine": "python", "threads": 1, "compiled": native.origin}
    return scan, COMPILED_CHUNK, {"engine": "compiled", "threads": threads, "sha256": native.module.sha_engine(),
                                  "compiled": native.origin}


def _kafka_chunks(reader: Any, size: int, timeout_s: float) -> Iterator[list[Any]]:
    """Decoded ledger-topic records (tombstones and undecodable ones included) in chunks of ``size``, to the end."""
    deadline = time.monotonic() + timeout_s
    buf: list[Any] = []
    while not reader.at_end:
        if time.monotonic() > deadline:
            raise RetryableError(f"could not read {reader.topic} to its end within {timeout_s:.0f}s")
        buf += [reader.entry(r) for r in reader.poll(min(size, 5000), 0.5)]
        while len(buf) >= size:
            yield buf[:size]
            del buf[:size]
    if buf:
        yield buf


def stream_verify(settings: Settings, args: argparse.Namespace,
                  keys: dict[str, Ed25519PublicKey]) -> tuple[VerifyResult | None, str | None, Sources]:
    """The bounded-memory fast path: chunks of Kafka entries with the Postgres rows at the same positions.

    Returns (result, None) when everything verified, or (None, why) when something did not check out — then the
    full verifier must run to name the first bad sequence. Checkpoints are read first (they are small).
    """
    from pilothouse.bus.producer import BusProducer  # noqa: PLC0415 - only when Kafka is read
    from pilothouse.ledger.adapters.kafka import TopicReader, read_all  # noqa: PLC0415

    src = Sources()
    loaded = CheckpointFile(settings.checkpoint_dir).load()
    src.checkpoints.update(loaded.checkpoints)
    src.rejected += [f"checkpoint file line {n}: {why}" for n, why in loaded.rejected]
    src.read["checkpoint_file"] = {"path": str(CheckpointFile(settings.checkpoint_dir).path),
                                   "checkpoints": len(loaded.checkpoints)}
    mirror: PostgresLedgerMirror | None = None
    rows_iter: Iterator[list[tuple[Any, ...]]] | None = None
    pending: list[tuple[Any, ...]] = []
    reader = None
    try:
        if not args.no_postgres:
            if settings.postgres_dsn is None:
                raise _Cannot("no Postgres DSN: pass --dsn, set PILOTHOUSE_LEDGER_POSTGRES_DSN, or use --no-postgres")
            mirror = PostgresLedgerMirror(settings.postgres_dsn.get_secret_value(), schema=settings.postgres_schema)
            table_cps = mirror.read_checkpoints()
            src.checkpoints.update(table_cps)
            rows_iter = mirror.iter_entries(STREAM_CHUNK)
            pending = next(rows_iter, [])  # the snapshot is taken now: Kafka, read after, holds at least as much
            src.read["postgres"] = {"rows": 0, "checkpoints": len(table_cps)}
        if not args.no_kafka:
            bus = BusSettings(client_id="pilothouse-ledger-verify")
            producer = BusProducer(bus)
            raw_cps, cp_reader = read_all(bus, settings.topic_checkpoints, producer,
                                          group_prefix=settings.group_prefix, timeout_s=args.timeout)
            topic_cps = 0
            for r in raw_cps:
                cp = cp_reader.checkpoint(r)
                if isinstance(cp, Checkpoint):
                    src.checkpoints.add(cp)
                    topic_cps += 1
                else:
                    src.rejected.append(f"checkpoints topic {cp.reason}")
            reader = TopicReader(bus, settings.topic_entries, producer=producer, start=lambda p, low, high: low,
                                 group_id=f"{settings.group_prefix}.read.{uuid.uuid4().hex[:12]}")
            src.read["kafka"] = {"entries_topic": settings.topic_entries, "records": 0,
                                 "checkpoints_topic": settings.topic_checkpoints, "checkpoints": topic_cps}
        scan, chunk_size, src.read["verifier"] = _scanner(args)
        sv = StreamingVerifier(settings.chain, src.checkpoints, keys, recompute_roots=not args.no_roots,
                               mirror_may_lag=args.mirror_may_lag, scanner=scan)

        def take(k: int) -> list[tuple[Any, ...]]:
            nonlocal pending
            while rows_iter is not None and len(pending) < k:
                more = next(rows_iter, None)
                if more is None:
                    break
                pending += more
            out, pending = pending[:k], pending[k:]
            src.read["postgres"]["rows"] += len(out)
            return out

        more_rows = False
        if reader is not None:
            for chunk in _kafka_chunks(reader, chunk_size, args.timeout):
                src.read["kafka"]["records"] += len(chunk)
                if not sv.feed(chunk, take(len(chunk)) if rows_iter is not None else None):
                    break
            more_rows = rows_iter is not None and sv.failed is None and bool(take(1))
        elif rows_iter is not None:
            while rows := take(chunk_size):
                if not sv.feed(rows):
                    break
        return sv.finish(secondary_has_more=more_rows), sv.failed, src
    finally:
        if reader is not None:
            reader.close()
        if mirror is not None:
            mirror.close()


def _problem(p: Problem | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"kind": p.kind.value, "chain": p.chain, "sequence": p.sequence, "source": p.source, "detail": p.detail}


def run_verify(settings: Settings, args: argparse.Namespace) -> tuple[VerifyResult, Sources]:
    keys = trusted_keys(settings, args.public_key)
    if not keys:
        raise _Cannot("no trusted public key: pass --public-key NAME=KEY or set PILOTHOUSE_LEDGER_TRUSTED_KEYS")
    src = read_sources(settings, args)
    scan, _, src.read["verifier"] = _scanner(args)
    result = verify(src.kafka_entries, src.postgres_rows, src.checkpoints, keys,
                    mirror_may_lag=args.mirror_may_lag, recompute_roots=not args.no_roots, scanner=scan)
    return result, src


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.no_postgres and (args.no_kafka and args.kafka_jsonl is None):
        raise _Cannot("nothing to verify: both Kafka and Postgres were left out")
    mode = "full"
    result: VerifyResult | None = None
    if not args.full and args.kafka_jsonl is None:
        keys = trusted_keys(settings, args.public_key)
        if not keys:
            raise _Cannot("no trusted public key: pass --public-key NAME=KEY or set PILOTHOUSE_LEDGER_TRUSTED_KEYS")
        result, why, src = stream_verify(settings, args, keys)
        mode = "streaming" if result is not None else f"full (the streaming pass stopped: {why})"
    if result is None:
        result, src = run_verify(settings, args)
    ok = result.ok and not src.rejected
    report = {"ok": ok, "mode": mode, "read": src.read, "entries": result.entries,
              "checkpoints_verified": result.checkpoints_verified, "first": _problem(result.first),
              "problems": [str(p) for p in result.problems], "rejected_checkpoint_records": src.rejected}
    print(json.dumps(report, indent=2))
    if result.first is not None:
        p = result.first
        at = "" if p.sequence is None else f" at sequence {p.sequence}"
        print(f"ledger verify: FAILED{at}: {p.kind.value} ({p.source}): {p.detail}", file=sys.stderr)
    elif src.rejected:
        print(f"ledger verify: FAILED: {src.rejected[0]}", file=sys.stderr)
    return 0 if ok else 1


def _find(entries: list[Any], wanted: str) -> int | None:
    for i, e in enumerate(entries):
        if isinstance(e, tuple) and len(e) == len(LedgerEntry._fields):
            ent = LedgerEntry._make(e)
            if wanted in (ent.event_id, ent.entry_key, ent.recorded_event_id):
                return i
    if wanted.isdigit() and int(wanted) < len(entries):
        return int(wanted)
    return None


def cmd_prove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    result, src = run_verify(settings, args)
    if not result.ok:
        print(json.dumps({"ok": False, "first": _problem(result.first),
                          "problems": [str(p) for p in result.problems]}, indent=2))
        print(f"ledger prove: the ledger does not verify, refusing to prove: {result.first}", file=sys.stderr)
        return 1
    raw = src.kafka_entries if src.kafka_entries is not None else src.postgres_rows or []
    entries = [LedgerEntry._make(e) for e in raw if isinstance(e, tuple) and len(e) == 18
               and e[0] == settings.chain]
    index = _find(entries, args.entry)
    if index is None:
        print(f"ledger prove: no entry {args.entry!r} in chain {settings.chain!r} ({len(entries)} entries)",
              file=sys.stderr)
        return 1
    keys = trusted_keys(settings, args.public_key)
    cps = sorted((cp for cp in src.checkpoints if cp.chain == settings.chain and cp.key_id in keys
                  and cp.tree_size > index), key=lambda c: (c.tree_size, c.signed_at))
    if not cps:
        have = max((cp.tree_size for cp in src.checkpoints if cp.chain == settings.chain), default=0)
        print(f"ledger prove: no signed checkpoint covers sequence {index} yet (the latest covers {have} "
              "entries); wait for the next checkpoint", file=sys.stderr)
        return 1
    cp = cps[-1]  # verify() above checked its signature and that it matches the chain
    tree = MerkleTree()  # verify() above checked every hash: 64 lowercase hex digits each
    tree.extend_hashes(bytes.fromhex("".join(e.entry_hash for e in entries[:cp.tree_size])))
    proof = tree.inclusion_proof(index, cp.tree_size)
    leaf = bytes.fromhex(entries[index].entry_hash)
    ok = verify_inclusion(leaf, index, cp.tree_size, proof, bytes.fromhex(cp.root_hash))
    e = entries[index]
    print(json.dumps({
        "ok": ok, "chain": e.chain, "sequence": e.sequence, "entry_key": e.entry_key, "event_id": e.event_id,
        "recorded_event_id": e.recorded_event_id, "recorded_type": e.recorded_type,
        "recorded_topic": e.recorded_topic, "recorded_partition": e.recorded_partition,
        "recorded_offset": e.recorded_offset, "leaf_hash": e.entry_hash, "leaf_index": index,
        "tree_size": cp.tree_size, "proof": [p.hex() for p in proof],
        "checkpoint": cp.to_dict(), "checkpoint_note": cp.note(),
    }, indent=2))
    if not ok:
        print("ledger prove: the inclusion proof does not verify against the signed root", file=sys.stderr)
    return 0 if ok else 1


def cmd_keygen(args: argparse.Namespace) -> int:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pub = key.public_key()
    print(json.dumps({
        "PILOTHOUSE_LEDGER_SIGNING_KEY": base64.b64encode(seed).decode(),
        "PILOTHOUSE_LEDGER_SIGNING_KEY_NAME": args.name,
        "public_key": base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode(),
        "key_id": key_id_for(args.name, pub),
        "trust_it_with": f"--public-key {args.name}=<public_key>",
    }, indent=2))
    return 0


def _audit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="libpq DSN of the mirror (default: PILOTHOUSE_LEDGER_POSTGRES_DSN)")
    p.add_argument("--schema", help="mirror schema (default: pilothouse_ledger)")
    p.add_argument("--checkpoint-dir", type=Path, help="directory of checkpoints.jsonl")
    p.add_argument("--topic-entries", help="ledger topic (default: pilothouse.ledger.entries.v1)")
    p.add_argument("--topic-checkpoints", help="checkpoints topic (default: pilothouse.ledger.checkpoints.v1)")
    p.add_argument("--chain", help="chain name (prove; default: main)")
    p.add_argument("--public-key", action="append", default=[],
                   help="trusted signer, NAME=PEMFILE or NAME=BASE64 (repeatable)")
    p.add_argument("--no-kafka", action="store_true", help="do not read Kafka (Postgres and checkpoints only)")
    p.add_argument("--no-postgres", action="store_true", help="do not read Postgres (Kafka and checkpoints only)")
    p.add_argument("--kafka-jsonl", type=Path, help="read a dump of the ledger topic instead of the broker")
    p.add_argument("--mirror-may-lag", action="store_true",
                   help="Postgres behind Kafka is mirror lag (unless a checkpoint covers the missing tail)")
    p.add_argument("--no-roots", action="store_true",
                   help="confirm checkpoints by their signed head hash only (skip rebuilding the Merkle tree)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to read each topic to its end")
    p.add_argument("--verifier", choices=("auto", "compiled", "python"), default="auto",
                   help="hash-chain checker: the compiled one (built on first use; auto falls back to the pure-Python "
                        "reference when it cannot be built, compiled refuses to) or the reference")
    p.add_argument("--threads", type=_processes, default=None,
                   help=f"threads of the compiled checker (default {DEFAULT_THREADS}: on a shared machine one is "
                        "faster; `pilothouse bench ledger --threads N` measures both)")
    p.add_argument("--processes", type=_processes, default=1,
                   help="check the hash chain with the pure-Python reference in N forked processes (default 1: "
                        "forking pays only where page faults are cheap; `pilothouse bench ledger` measures it)")
    p.add_argument("--full", action="store_true",
                   help="load everything and diagnose (default: a bounded-memory streaming pass first, the full "
                        "verifier only if it finds something)")


def _processes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    """CLI entry for ``pilothouse ledger {run,verify,prove,keygen}``."""
    ap = argparse.ArgumentParser(prog="pilothouse ledger", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the ledger service", add_help=False)
    v = sub.add_parser("verify", help="verify Kafka, Postgres and the signed checkpoints")
    _audit_options(v)
    p = sub.add_parser("prove", help="inclusion proof of one entry against the latest signed checkpoint")
    p.add_argument("entry", help="entry event id, entry key, recorded event id, or sequence number")
    _audit_options(p)
    k = sub.add_parser("keygen", help="new Ed25519 signing seed for PILOTHOUSE_LEDGER_SIGNING_KEY")
    k.add_argument("--name", default="pilothouse-ledger")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        from pilothouse.ledger.__main__ import main as run_main  # noqa: PLC0415 - the service, only when asked

        return run_main(argv[1:])
    args = ap.parse_args(argv)
    try:
        if args.command == "keygen":
            return cmd_keygen(args)
        return cmd_verify(args) if args.command == "verify" else cmd_prove(args)
    except (_Cannot, PilothouseError, OSError, ValueError) as e:
        kind = "" if isinstance(e, _Cannot) else f"{type(e).__name__}: "
        print(json.dumps({"ok": False, "error": f"{kind}{e}"}), file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. the Kafka client refusing its configuration: cannot audit
        print(json.dumps({"ok": False, "error": f"cannot audit: {type(e).__name__}: {e}"}), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
