"""The ledger's pure core: hash-chained entries, signed Merkle checkpoints, and the verifier. No I/O here.

Entry hash (what the chain links and what the Merkle tree commits to)
--------------------------------------------------------------------
``canonical entry bytes`` = ``pilothouse.ledger.entry.v1`` || 0x0A || *header* || 0x0A || *payload*, where

* *header* is the canonical JSON (UTF-8, no whitespace, as ``orjson`` writes it) of the **array** of the first 16
  :class:`LedgerEntry` fields in their declared order: chain, sequence, entry_key, prev_hash, event_id, incident_id,
  correlation_id, causation_id, occurred_at (ms), producer, recorded_event_id, recorded_topic, recorded_partition,
  recorded_offset, recorded_type, payload_sha256. An array, not an object: a fixed, documented order is as canonical
  as sorted keys and lets the verifier hash a slice of the stored tuple without building a dict. It includes
  ``prev_hash``, so entries form a hash chain (the first entry of a chain links to 64 zeros);
* *payload* is ``payload_json`` (the canonical JSON of the recorded event: sorted keys, no whitespace) as UTF-8.

The header never contains a raw line feed (JSON escapes it inside strings) and is self-delimiting, so header and
payload split unambiguously — without having to trust that a stored payload is valid JSON.

``entry_hash`` = hex(SHA-256(0x00 || canonical entry bytes)): exactly the RFC 9162 *leaf hash* of the canonical entry
bytes. The same 32 bytes link the chain and are the Merkle leaves of the signed checkpoints, and one SHA-256 call
per entry covers header and payload. ``payload_sha256`` = hex(SHA-256(payload bytes)) is kept for consumers and is
checked whenever an entry is built, mirrored or diagnosed.

Verification recomputes the hash from the *stored* strings (no re-serialisation of the recorded event), so a verifier
never depends on how a JSON library orders or escapes the payload.

Checkpoints
-----------
A checkpoint signs a C2SP "signed note"-style text (origin line, tree size, base64 root, one extension line)::

    pilothouse.ledger/<chain>
    <tree_size>
    <base64 root hash>
    signed_at <ms since epoch>

with Ed25519. ``key_id`` = ``<name>+<8 hex>`` where the hex is the first 4 bytes of
SHA-256(name || 0x0A || 0x01 || raw public key) (the C2SP key hash for Ed25519). The verifier never parses the note:
it rebuilds the text from the fields and checks the signature over that.

What each check catches (see :func:`verify`): chain break, hash mismatch, gap, duplicate, tombstone, reorder,
Kafka/Postgres disagreement, a Postgres row rewritten with a valid re-computed hash (re-hashed suffix), checkpoint root
mismatch, bad/unknown signature, and a source shorter than a signed checkpoint (tail truncation, TRUNCATE).
Without a checkpoint, a cut-off tail or a fully re-hashed suffix in the only source is undetectable by any hash chain:
keep checkpoints outside Postgres.
"""

from __future__ import annotations

import base64
import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from operator import itemgetter
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pilothouse.bus.errors import PermanentError, RecordInvalid
from pilothouse.ledger.merkle import MerkleTree

ENTRY_FORMAT = "pilothouse.ledger.entry.v1"
GENESIS_PREV_HASH = "0" * 64
CHECKPOINT_ORIGIN_PREFIX = "pilothouse.ledger/"
# Chain and key names appear in Kafka keys ("<chain>:<seq>") and in signed notes (one per line): keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------------------------------- errors ---
class EntryInvalid(RecordInvalid):
    """An entry (or the event to record) cannot be hashed or stored as given; nothing was recorded."""


class LedgerIntegrityError(PermanentError):
    """Tamper evidence met while mirroring (gap, tombstone, broken link, bad hash). ``problem`` says what and where."""

    def __init__(self, problem: Problem, *, accepted: int = 0) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.accepted = accepted  # how many records before the bad one were accepted (and written) first


# ------------------------------------------------------------------------------------------------------ entries ---
class LedgerEntry(NamedTuple):
    """One ledger entry: the fields of the Avro record ``pilothouse.ledger.LedgerEntry`` (mapped by name), in the
    order of the hashed header (the first 16 fields), then ``payload_json`` and ``entry_hash``; the Postgres columns
    are read in this order too. A NamedTuple so that a Postgres row (a tuple) and a Kafka entry compare with ``==``
    at C speed and the verifier can hash ``entry[:16]`` without building anything.
    ``occurred_at`` is milliseconds since the epoch (UTC), exactly as Avro's timestamp-millis stores it.
    """

    chain: str
    sequence: int
    entry_key: str
    prev_hash: str
    event_id: str
    incident_id: str | None
    correlation_id: str
    causation_id: str | None
    occurred_at: int
    producer: str
    recorded_event_id: str
    recorded_topic: str
    recorded_partition: int
    recorded_offset: int
    recorded_type: str
    payload_sha256: str
    payload_json: str
    entry_hash: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LedgerEntry:
        """From a decoded Avro record (fastavro gives ``occurred_at`` as an aware datetime)."""
        try:  # the common case in one C call (verify decodes every entry of the topic)
            values = list(_ALL_FIELDS(record))
            values[8] = to_millis(values[8])
            return cls._make(values)
        except (KeyError, TypeError):
            pass  # an optional field left out, or not a mapping: the careful path says what
        try:
            optional = ("recorded_partition", "recorded_offset", "producer")
            values = {f: record[f] for f in cls._fields if f not in optional}
        except KeyError as e:
            raise EntryInvalid(f"ledger entry record lacks field {e.args[0]!r}") from e
        values["producer"] = record.get("producer", "")
        values["recorded_partition"] = record.get("recorded_partition", 0)
        values["recorded_offset"] = record.get("recorded_offset", 0)
        values["occurred_at"] = to_millis(values["occurred_at"])
        return cls(**values)

    def to_record(self) -> dict[str, Any]:
        """Dict for the Avro encoder (timestamp-millis accepts an int of milliseconds)."""
        return self._asdict()


_ALL_FIELDS = itemgetter(*LedgerEntry._fields)


class KafkaTombstone(NamedTuple):
    """A record with a key and a null value read from the ledger topic: tamper evidence, never an entry."""

    key: str
    offset: int | None = None


def to_millis(value: int | datetime) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise EntryInvalid("occurred_at must be timezone-aware (UTC)")
        return (value - _EPOCH) // timedelta(milliseconds=1)  # exact; float timestamps round
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EntryInvalid(f"occurred_at must be ms since the epoch or a datetime, got {type(value).__name__}")


def entry_key(chain: str, sequence: int) -> str:
    return f"{chain}:{sequence:020d}"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace, UTF-8). Refuses what JSON cannot carry without loss."""
    _refuse_lossy(value, "$")
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as e:  # orjson raises JSONEncodeError, a TypeError
        raise EntryInvalid(f"event cannot be written as canonical JSON: {e}") from e


def _refuse_lossy(value: Any, path: str) -> None:
    # orjson writes NaN/Infinity as null and would silently change the recorded event.
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EntryInvalid(f"{path} is {value!r}; JSON cannot carry it, refusing to record a changed event")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise EntryInvalid(f"{path} has a non-string key {k!r}")
            _refuse_lossy(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _refuse_lossy(v, f"{path}[{i}]")


def canonical_entry_bytes(e: Sequence[Any]) -> bytes:
    """The hashed pre-image of an entry: format line, header JSON array, LF, payload (see the module docstring)."""
    return _FORMAT_LINE + orjson.dumps(tuple(e[:_HEADER_FIELDS]), None, _NL) + e[_PAYLOAD].encode("utf-8")


def compute_entry_hash(e: Sequence[Any]) -> str:
    return sha256(b"\x00" + canonical_entry_bytes(e)).hexdigest()


# Positions in a LedgerEntry (and in a Postgres row read by the mirror adapter).
_CHAIN, _SEQ, _KEY, _PREV, _PAYLOAD_SHA, _PAYLOAD, _HASH = 0, 1, 2, 3, 15, 16, 17
_HEADER_FIELDS = 16
_N_FIELDS = 18
_FORMAT_LINE = (ENTRY_FORMAT + "\n").encode()
_NL = orjson.OPT_APPEND_NEWLINE


class ChainHead(NamedTuple):
    """Where a chain stands: the next sequence number and the hash the next entry must link to."""

    chain: str
    next_sequence: int
    last_hash: str

    @classmethod
    def genesis(cls, chain: str) -> ChainHead:
        check_name("chain", chain)
        return cls(chain, 0, GENESIS_PREV_HASH)


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise EntryInvalid(f"{what} {name!r} must match {_NAME_RE.pattern} (it is used in Kafka keys and signed notes)")


def build_entry(
    head: ChainHead,
    recorded_event: Mapping[str, Any],
    *,
    event_id: str,
    occurred_at: int | datetime,
    producer: str,
    recorded_topic: str,
    recorded_type: str,
    recorded_partition: int = 0,
    recorded_offset: int = 0,
) -> LedgerEntry:
    """The next entry of ``head``'s chain, recording ``recorded_event`` (a decoded event with the envelope fields).

    The envelope comes from the recorded event: its ``event_id`` becomes ``recorded_event_id`` and this entry's
    ``causation_id``; ``incident_id`` and ``correlation_id`` are copied (``correlation_id`` falls back to the event id).
    """
    check_name("chain", head.chain)
    recorded_event_id = recorded_event.get("event_id")
    if not isinstance(recorded_event_id, str) or not recorded_event_id:
        raise EntryInvalid("the recorded event has no event_id; refusing to record an event that cannot be traced")
    for name, value in (("event_id", event_id), ("producer", producer), ("recorded_topic", recorded_topic),
                        ("recorded_type", recorded_type)):
        if not isinstance(value, str) or (name != "producer" and not value):
            raise EntryInvalid(f"{name} must be a non-empty string")
    incident_id = recorded_event.get("incident_id")
    correlation_id = recorded_event.get("correlation_id") or recorded_event_id
    if incident_id is not None and not isinstance(incident_id, str):
        raise EntryInvalid("incident_id of the recorded event must be a string or null")
    if not isinstance(correlation_id, str):
        raise EntryInvalid("correlation_id of the recorded event must be a string")
    payload = canonical_json(dict(recorded_event)).decode("utf-8")
    partial = LedgerEntry(
        event_id=event_id, incident_id=incident_id, correlation_id=correlation_id, causation_id=recorded_event_id,
        occurred_at=to_millis(occurred_at), producer=producer, chain=head.chain, sequence=head.next_sequence,
        entry_key=entry_key(head.chain, head.next_sequence), prev_hash=head.last_hash, entry_hash="",
        recorded_event_id=recorded_event_id, recorded_topic=recorded_topic, recorded_partition=int(recorded_partition),
        recorded_offset=int(recorded_offset), recorded_type=recorded_type, payload_json=payload,
        payload_sha256=sha256(payload.encode("utf-8")).hexdigest(),
    )
    return partial._replace(entry_hash=compute_entry_hash(partial))


def advance(head: ChainHead, entry: LedgerEntry) -> ChainHead:
    return ChainHead(head.chain, entry.sequence + 1, entry.entry_hash)


# -------------------------------------------------------------------------------------------------- checkpoints ---
def key_id_for(name: str, public_key: Ed25519PublicKey) -> str:
    check_name("key name", name)
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    keyhash = sha256(name.encode() + b"\n\x01" + raw).digest()[:4]
    return f"{name}+{keyhash.hex()}"


def checkpoint_body(chain: str, tree_size: int, root_hash: str, signed_at: int, head_hash: str = "") -> str:
    """The signed text (C2SP checkpoint body: origin, size, base64 root, then extension lines)."""
    head = f"head {head_hash}\n" if head_hash else ""
    return (f"{CHECKPOINT_ORIGIN_PREFIX}{chain}\n{tree_size}\n"
            f"{base64.b64encode(bytes.fromhex(root_hash)).decode()}\nsigned_at {signed_at}\n{head}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed Merkle tree head over entries [0, tree_size) of ``chain`` (root_hash in hex, signature in base64).

    ``head_hash`` (signed too, as the extension line ``head <hex>``) is the entry_hash of entry tree_size - 1. The
    hash chain makes it commit to every earlier entry, so a verifier can confirm a checkpoint against a verified
    chain in O(1); recomputing the Merkle root additionally proves the root (which proofs are checked against).
    """

    chain: str
    tree_size: int
    root_hash: str
    signed_at: int
    key_id: str
    signature: str
    head_hash: str = ""

    def body(self) -> str:
        return checkpoint_body(self.chain, self.tree_size, self.root_hash, self.signed_at, self.head_hash)

    def note(self) -> str:
        """The whole signed note: body, blank line, signature line ``— <name> base64(keyhash4 || signature)``."""
        name, _, keyhash = self.key_id.rpartition("+")
        sig = base64.b64encode(bytes.fromhex(keyhash) + base64.b64decode(self.signature)).decode()
        return f"{self.body()}\n\u2014 {name} {sig}\n"

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "tree_size": self.tree_size, "root_hash": self.root_hash,
                "signed_at": self.signed_at, "key_id": self.key_id, "signature": self.signature,
                "head_hash": self.head_hash}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Checkpoint:
        """From a stored/decoded mapping; refuses wrong types and malformed hashes with a clear error."""
        try:
            cp = cls(chain=d["chain"], tree_size=d["tree_size"], root_hash=d["root_hash"],
                     signed_at=to_millis(d["signed_at"]), key_id=d["key_id"], signature=d["signature"],
                     head_hash=d.get("head_hash", ""))
        except KeyError as e:
            raise EntryInvalid(f"checkpoint lacks field {e.args[0]!r}") from e
        if not (isinstance(cp.chain, str) and isinstance(cp.key_id, str) and isinstance(cp.signature, str)):
            raise EntryInvalid("checkpoint chain, key_id and signature must be strings")
        if not isinstance(cp.tree_size, int) or isinstance(cp.tree_size, bool) or cp.tree_size < 0:
            raise EntryInvalid(f"checkpoint tree_size must be a non-negative integer, got {cp.tree_size!r}")
        if not isinstance(cp.root_hash, str) or not _HEX64_RE.fullmatch(cp.root_hash):
            raise EntryInvalid("checkpoint root_hash must be 64 lowercase hex characters")
        if not isinstance(cp.head_hash, str) or (cp.head_hash and not _HEX64_RE.fullmatch(cp.head_hash)):
            raise EntryInvalid("checkpoint head_hash must be empty or 64 lowercase hex characters")
        return cp


class CheckpointSigner:
    """Signs tree heads with an Ed25519 private key (key material comes from settings, never from code)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_for(name, self.public_key)

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> CheckpointSigner:
        if len(seed) != 32:
            raise EntryInvalid("an Ed25519 private key seed is 32 bytes")
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, chain: str, tree_size: int, root_hash: str, signed_at: int, head_hash: str = "") -> Checkpoint:
        check_name("chain", chain)
        body = checkpoint_body(chain, tree_size, root_hash, signed_at, head_hash).encode()
        sig = base64.b64encode(self._key.sign(body)).decode()
        return Checkpoint(chain, tree_size, root_hash, signed_at, self.key_id, sig, head_hash)


def check_checkpoint_signature(cp: Checkpoint, public_keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """None when ``cp`` carries a valid signature by a trusted key; otherwise the reason."""
    key = public_keys.get(cp.key_id)
    if key is None:
        return f"checkpoint is signed by key {cp.key_id!r}, which is not a trusted key"
    try:
        body = cp.body().encode()
        sig = base64.b64decode(cp.signature, validate=True)
        key.verify(sig, body)
    except (InvalidSignature, ValueError) as e:  # binascii.Error is a ValueError
        return f"checkpoint signature does not verify with key {cp.key_id!r} ({type(e).__name__})"
    return None


class LedgerChain:
    """One chain being written: its head and its Merkle tree, for checkpoints and proofs. Pure, in memory."""

    def __init__(self, chain: str, entries: Iterable[LedgerEntry] = ()) -> None:
        self.head = ChainHead.genesis(chain)
        self.tree = MerkleTree()
        for e in entries:
            self.append(e)

    def append(self, entry: LedgerEntry) -> None:
        problem = check_entry(entry, self.head)
        if problem is not None:
            raise LedgerIntegrityError(problem)
        self.tree.append(bytes.fromhex(entry.entry_hash))
        self.head = advance(self.head, entry)

    def record(self, recorded_event: Mapping[str, Any], **kwargs: Any) -> LedgerEntry:
        entry = build_entry(self.head, recorded_event, **kwargs)
        self.append(entry)
        return entry

    def root_hash(self, size: int | None = None) -> str:
        return self.tree.root(size).hex()

    def checkpoint(self, signer: CheckpointSigner, signed_at: int) -> Checkpoint:
        head = self.head.last_hash if self.tree.size else ""
        return signer.sign(self.head.chain, self.tree.size, self.root_hash(), signed_at, head)


# ------------------------------------------------------------------------------------------------- verification ---
class ProblemKind(enum.StrEnum):
    CHAIN_BREAK = "chain_break"            # prev_hash does not link to the previous entry's hash
    HASH_MISMATCH = "hash_mismatch"        # entry_hash or payload_sha256 does not match the stored content
    GAP = "gap"                            # a sequence number is missing
    DUPLICATE = "duplicate"                # a sequence number appears again (same or different content)
    TOMBSTONE = "tombstone"                # a null value on the ledger topic
    REORDER = "reorder"                    # entries out of sequence order (the missing one appears later)
    MALFORMED = "malformed"                # not an entry (wrong shape/types), wrong entry_key or chain
    SOURCE_MISMATCH = "source_mismatch"    # Kafka and Postgres disagree
    REHASHED_SUFFIX = "rehashed_suffix"    # a Postgres row differs from Kafka yet carries a valid re-computed hash
    CHECKPOINT_ROOT_MISMATCH = "checkpoint_root_mismatch"  # entries [0, tree_size) do not hash to the signed root
    BAD_SIGNATURE = "bad_signature"        # a checkpoint's signature is invalid or by an untrusted key
    TRUNCATED = "truncated"                # fewer entries than a signed checkpoint covers (tail truncation)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    chain: str
    sequence: int | None  # first bad sequence number; None when the problem is not tied to one (bad signature)
    source: str           # "kafka", "postgres", "checkpoint" or "entry"
    detail: str

    def __str__(self) -> str:
        at = "" if self.sequence is None else f" at sequence {self.sequence}"
        return f"{self.kind.value} in chain {self.chain!r}{at} ({self.source}): {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``ok`` or the problems found, first bad one first (one per chain and source at most, plus checkpoint ones)."""

    problems: tuple[Problem, ...]
    entries: dict[str, int] = field(default_factory=dict)  # chain -> entries verified (valid prefix length)
    checkpoints_verified: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def check_entry(e: Any, head: ChainHead) -> Problem | None:
    """Check one entry against the head it must extend: shape, key, sequence, link, payload hash, entry hash.

    Sequence problems are reported as GAP/DUPLICATE here; :func:`verify`, which sees the whole list, refines them
    (REORDER when the missing entry appears later).
    """
    chain, expected = head.chain, head.next_sequence
    if e is None or isinstance(e, KafkaTombstone):
        return Problem(ProblemKind.TOMBSTONE, chain, _tombstone_seq(e, expected), "entry",
                       "null value (tombstone) on the ledger topic: an entry was deleted or compacted away")
    if not isinstance(e, tuple) or len(e) != _N_FIELDS:
        return Problem(ProblemKind.MALFORMED, chain, expected, "entry",
                       f"not a ledger entry ({type(e).__name__} of length {len(e) if hasattr(e, '__len__') else '?'})")
    ent = LedgerEntry._make(e)
    if ent.chain != chain:
        return Problem(ProblemKind.MALFORMED, chain, expected, "entry", f"entry belongs to chain {ent.chain!r}")
    seq = ent.sequence
    if not isinstance(seq, int) or isinstance(seq, bool):
        return Problem(ProblemKind.MALFORMED, chain, expected, "entry", f"sequence is {type(seq).__name__}")
    if seq > expected:
        return Problem(ProblemKind.GAP, chain, expected, "entry",
                       f"expected sequence {expected}, got {seq}: {seq - expected} missing")
    if seq < expected:
        return Problem(ProblemKind.DUPLICATE, chain, seq, "entry",
                       f"sequence {seq} again after {expected - 1}")
    if ent.entry_key != entry_key(chain, seq):
        return Problem(ProblemKind.MALFORMED, chain, seq, "entry",
                       f"entry_key {ent.entry_key!r} should be {entry_key(chain, seq)!r}")
    if ent.prev_hash != head.last_hash:
        return Problem(ProblemKind.CHAIN_BREAK, chain, seq, "entry",
                       f"prev_hash {_short(ent.prev_hash)} does not link to entry {seq - 1}'s hash "
                       f"{_short(head.last_hash)}"
                       f" (entry {seq - 1} or {seq} was altered)")
    try:
        payload_ok = sha256(ent.payload_json.encode("utf-8")).hexdigest() == ent.payload_sha256
        recomputed = compute_entry_hash(ent)
    except (AttributeError, TypeError, UnicodeEncodeError) as exc:
        return Problem(ProblemKind.MALFORMED, chain, seq, "entry", f"fields of the wrong type: {exc}")
    if not payload_ok:
        return Problem(ProblemKind.HASH_MISMATCH, chain, seq, "entry", "payload_json does not match payload_sha256")
    if recomputed != ent.entry_hash:
        return Problem(ProblemKind.HASH_MISMATCH, chain, seq, "entry",
                       f"entry_hash {_short(ent.entry_hash)} does not match the entry's content ({_short(recomputed)})")
    return None


def _short(h: Any) -> str:
    return f"{h[:12]}…" if isinstance(h, str) and len(h) > 12 else repr(h)


def _tombstone_seq(e: Any, default: int) -> int:
    if isinstance(e, KafkaTombstone):
        _, _, seq = e.key.rpartition(":")
        if seq.isdigit():
            return int(seq)
    return default


def check_batch(
    heads: Mapping[str, ChainHead], entries: Sequence[Any]
) -> tuple[int, Problem | None, dict[str, ChainHead]]:
    """For the mirror: how many leading entries extend their chains' heads, the first problem, and the new heads.

    A chain not in ``heads`` starts at genesis. Never skips: everything after the first problem is left unaccepted.
    """
    new_heads = dict(heads)
    for i, e in enumerate(entries):
        if isinstance(e, tuple) and len(e) == _N_FIELDS:
            chain = e[_CHAIN]
        elif isinstance(e, KafkaTombstone):
            chain = e.key.rpartition(":")[0]
        else:
            chain = "?"
        head = new_heads.get(chain)
        if head is None:
            head = ChainHead(chain, 0, GENESIS_PREV_HASH)
        problem = check_entry(e, head)
        if problem is not None:
            return i, problem, new_heads
        new_heads[chain] = ChainHead(chain, e[_SEQ] + 1, e[_HASH])
    return len(entries), None, new_heads


class ScanResult(NamedTuple):
    """What a scan of a range of one chain found: the valid prefix and what the Merkle tree needs from it."""

    valid: int                 # length of the valid prefix of the range
    last_hash: str             # entry hash of its last entry (the hash it started from when the prefix is empty)
    leaves: bytes = b""        # the prefix's leaf hashes, 32 bytes each (empty unless asked for)
    levels: tuple[bytes, ...] = ()  # Merkle levels 1.. over ``leaves`` (see merkle.subtree_levels); may be empty
    agree: int | None = None   # leading entries where the secondary source equals this one (None: not compared)

    def same_as(self, other: ScanResult) -> bool:
        """Same verdict and leaves (``levels`` are a cache, ``agree`` a separate question)."""
        return (self.valid, self.last_hash, self.leaves) == (other.valid, other.last_hash, other.leaves)


_HASH_COL = itemgetter(_HASH)
_CHAIN_COL = itemgetter(_CHAIN)


def scan_range(items: Sequence[Any], chain: str, lo: int, hi: int, prev: str,
               want_leaves: bool = True, first_seq: int | None = None) -> ScanResult:
    """Hot loop: check ``items[lo:hi]`` in order as sequences lo, lo+1, ... linked from ``prev``; return the length of
    the valid prefix (which says where the first failure is), its last entry hash and (``want_leaves``) its leaf
    hashes. ``first_seq``: the sequence number of ``items[lo]`` when the list is a chunk of the chain (default lo).

    This is the **reference**: what verifies is defined here. ``ledger verify`` runs the compiled scanner
    (:mod:`pilothouse.ledger.native`, ``_chainscan.c``), which must give exactly this result and hands every entry it
    cannot write byte for byte as orjson does back to this function. Kept flat: per entry three comparisons, one
    orjson call for the header, and one SHA-256 that continues a hasher which has already taken
    ``0x00 || format line`` (copying it avoids concatenating, i.e. copying, the ~1 KB payload twice). The computed
    hex digest must equal the stored ``entry_hash``; the leaf hashes are then the stored hashes decoded in one call
    after the loop. The payload is bound by the entry hash directly; the redundant ``payload_sha256`` (inside the
    hash too) is compared with the payload by :func:`check_entry` — when an entry is built, mirrored, appended or
    diagnosed — not here. Exposed so that ranges can run in parallel (see :mod:`pilothouse.ledger.parallel`) and be
    stitched: range k must start from range k-1's last hash.
    """
    dumps = orjson.dumps
    base = sha256(b"\x00" + _FORMAT_LINE)
    nl = _NL
    start = expected = lo if first_seq is None else first_seq
    part = items[lo:hi] if (lo or hi != len(items)) else items
    for e in part:
        try:
            if e[1] != expected or e[3] != prev or e[0] != chain:  # _SEQ, _PREV, _CHAIN (literals: hot loop)
                break
            h = base.copy()
            h.update(dumps(e[:16], None, nl))
            h.update(e[16].encode())
            ehash = e[17]
            if h.hexdigest() != ehash or len(e) != 18:
                break
        except Exception:  # wrong shape or types: the slow path says precisely what is wrong
            break
        prev = ehash
        expected += 1
    valid = expected - start
    if not want_leaves or not valid:
        return ScanResult(valid, prev)
    # Every stored hash of the prefix equals a computed hexdigest: 64 lowercase hex digits, so this cannot fail.
    return ScanResult(valid, prev, bytes.fromhex("".join(map(_HASH_COL, part[:valid] if valid < len(part) else part))))


Scanner = Callable[..., ScanResult]
"""``scanner(items, chain, first_seq=0, prev=GENESIS_PREV_HASH, want_leaves=True, secondary=None)``: a
:func:`serial_scan` replacement (e.g. :func:`pilothouse.ledger.parallel.scanner`) that must return the same result."""


def serial_scan(items: Sequence[Any], chain: str, first_seq: int = 0, prev: str = GENESIS_PREV_HASH,
                want_leaves: bool = True, secondary: Sequence[Any] | None = None) -> ScanResult:
    """Scan ``items`` (a chain from ``first_seq``, linked from ``prev``) on this thread; with ``secondary`` also how
    many leading entries of it equal ``items`` (``agree``)."""
    got = scan_range(items, chain, 0, len(items), prev, want_leaves, first_seq)
    if secondary is None:
        return got
    return got._replace(agree=agreeing_prefix(items, secondary, 0, len(items)))


def agreeing_prefix(primary: Sequence[Any], secondary: Sequence[Any], lo: int, hi: int) -> int:
    """How many entries from ``lo`` (up to ``hi`` and the secondary's end) are equal in both sources."""
    k = min(hi, len(secondary), len(primary))
    if k <= lo:
        return 0
    if lo == 0 and k == len(primary) == len(secondary) and isinstance(primary, list) and isinstance(secondary, list):
        same = secondary == primary  # element-wise tuple == tuple, all in C, no copies
    else:
        same = list(secondary[lo:k]) == list(primary[lo:k])
    if same:
        return k - lo
    return next(j for j in range(lo, k) if secondary[j] != primary[j]) - lo


def _scan(items: Sequence[Any], chain: str, source: str, scanner: Scanner | None = None, want_leaves: bool = True,
          secondary: Sequence[Any] | None = None) -> tuple[ScanResult, Problem | None]:
    """Verify one chain's entries in order: the scan of the valid prefix (leaf hashes only if wanted) and the first
    problem (diagnosed serially and precisely)."""
    got = (scanner or serial_scan)(items, chain, 0, GENESIS_PREV_HASH, want_leaves, secondary)
    n = got.valid
    if n == len(items):
        return got, None
    prev = items[n - 1][_HASH] if n else GENESIS_PREV_HASH
    return got, _diagnose(items, n, chain, prev, source)


def _diagnose(items: Sequence[Any], i: int, chain: str, prev: str, source: str) -> Problem:
    """Say precisely what is wrong with ``items[i]`` (the first entry that failed the hot loop)."""
    problem = check_entry(items[i], ChainHead(chain, i, prev))
    if problem is None:  # the hot loop and check_entry disagree: treat as malformed rather than pass it
        problem = Problem(ProblemKind.MALFORMED, chain, i, "entry", "entry failed verification")
    kind, seq, detail = problem.kind, problem.sequence, problem.detail
    if kind is ProblemKind.GAP:
        later = _position_of(items, i + 1, i)
        if later is not None:
            kind = ProblemKind.REORDER
            detail = f"sequence {i} appears at position {later}, after sequence {items[i][_SEQ]}"
        else:
            detail = f"sequence {i} is missing ({detail})"
    elif kind is ProblemKind.DUPLICATE and seq is not None and seq < i:
        original = items[seq]
        same = original == items[i]
        detail = (f"sequence {seq} appears again at position {i}, "
                  + ("an exact duplicate" if same else "with different content (a fork)"))
    return Problem(kind, chain, seq, source, detail)


def _position_of(items: Sequence[Any], start: int, seq: int) -> int | None:
    for j in range(start, len(items)):
        e = items[j]
        if isinstance(e, tuple) and len(e) == _N_FIELDS and e[_SEQ] == seq:
            return j
    return None


def _compare(primary: Sequence[Any], secondary: Sequence[Any], chain: str, valid: int, source: str,
             primary_source: str, agree: int | None = None) -> Problem | None:
    """First index < ``valid`` where the secondary source differs from the (verified) primary, classified.
    ``agree``: the length of the agreeing prefix when a scanner has already compared them."""
    n = min(valid, len(secondary))
    if agree is None:
        agree = agreeing_prefix(primary, secondary, 0, n)
    if agree >= n:
        return None
    i = agree
    head = ChainHead(chain, i, primary[i - 1][_HASH] if i else GENESIS_PREV_HASH)
    problem = check_entry(secondary[i], head)
    if problem is not None:
        refined = _diagnose(secondary, i, chain, head.last_hash, source)
        return Problem(refined.kind, chain, refined.sequence, source,
                       f"{refined.detail}; {primary_source} has the original")
    if secondary[i][_HASH] != primary[i][_HASH]:
        return Problem(ProblemKind.REHASHED_SUFFIX, chain, i, source,
                       f"{source} entry {i} differs from {primary_source} yet carries a valid re-computed hash: "
                       "rewritten from here with re-hashed entries")
    return Problem(ProblemKind.SOURCE_MISMATCH, chain, i, source,
                   f"{source} entry {i} differs from {primary_source} in a field outside the hashes")


def _tree(scan: ScanResult) -> MerkleTree:
    tree = MerkleTree()
    tree.extend_hashes(scan.leaves, scan.levels)
    return tree


def _group(items: Sequence[Any] | None) -> dict[str, list[Any]]:
    if not items:
        return {}
    try:
        chains = set(map(_CHAIN_COL, items))
        if len(chains) == 1:
            chain = chains.pop()
            if isinstance(chain, str) and ":" not in chain:  # not a tombstone's key (chain names have no ':')
                return {chain: list(items)}
    except (TypeError, IndexError, KeyError):
        pass
    groups: dict[str, list[Any]] = {}
    last = None
    for e in items:
        if isinstance(e, KafkaTombstone):
            ch = e.key.rpartition(":")[0]
        elif isinstance(e, tuple) and len(e) == _N_FIELDS and isinstance(e[_CHAIN], str):
            ch = e[_CHAIN]
        else:  # no way to tell its chain: keep it where it stands (the previous item's chain)
            ch = last if last is not None else "?"
        groups.setdefault(ch, []).append(e)
        last = ch
    return groups


def verify(
    kafka_entries: Sequence[Any] | None,
    postgres_rows: Sequence[Sequence[Any]] | None,
    checkpoints: Iterable[Checkpoint] = (),
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    *,
    mirror_may_lag: bool = False,
    recompute_roots: bool = True,
    scanner: Scanner | None = None,
) -> VerifyResult:
    """Verify the ledger as read from Kafka (in offset order) and from Postgres (in insertion order), against trusted
    signed checkpoints. Either source may be None (not available); pass both for the strongest check.

    Kafka is the primary source when given; Postgres rows are compared with it entry by entry and only a differing
    row is examined on its own (so the common case costs one tuple comparison per row). ``mirror_may_lag``: a Postgres
    tail shorter than Kafka is normal mirror lag rather than tampering — unless a checkpoint covers the missing tail.
    Read Postgres *before* Kafka so that Kafka holds everything Postgres does.

    Every signed checkpoint's ``head_hash`` is compared with the chain (O(1) each: the hash chain binds all earlier
    entries). ``recompute_roots`` (default) also rebuilds the Merkle tree (n - 1 more hashes, about a fifth of the
    time) and compares the signed roots — needed for checkpoints without a head hash, and to vouch for the roots that
    inclusion/consistency proofs are checked against.

    ``scanner`` replaces the single-threaded hash-chain scan (e.g. :func:`pilothouse.ledger.parallel.scanner`);
    whatever it returns, a failure is diagnosed here, serially and precisely.

    Returns every chain's first problem (per source) and checkpoint problems; ``result.first`` is the earliest.
    """
    keys = public_keys or {}
    kafka = _group(kafka_entries) if kafka_entries is not None else None
    pg = _group(postgres_rows) if postgres_rows is not None else None
    cps: dict[str, list[Checkpoint]] = {}
    for cp in checkpoints:
        cps.setdefault(cp.chain, []).append(cp)
    chains = set(kafka or ()) | set(pg or ()) | set(cps)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    verified_cps = 0
    for chain in sorted(chains):
        k_items = kafka.get(chain, []) if kafka is not None else None
        p_items = pg.get(chain, []) if pg is not None else None
        if k_items is not None:
            primary, primary_source, secondary, secondary_source = k_items, "kafka", p_items, "postgres"
        else:
            primary, primary_source, secondary, secondary_source = p_items or [], "postgres", None, ""
        signed: list[Checkpoint] = []
        for cp in sorted(cps.get(chain, ()), key=lambda c: c.tree_size):
            reason = check_checkpoint_signature(cp, keys)
            if reason is None:
                signed.append(cp)
            else:
                problems.append(Problem(ProblemKind.BAD_SIGNATURE, chain, None, "checkpoint",
                                        f"{reason} (tree_size {cp.tree_size}, signed_at {cp.signed_at})"))
        need_roots = recompute_roots or any(not cp.head_hash for cp in signed)
        scan, problem = _scan(primary, chain, primary_source, scanner, need_roots, secondary)
        valid = scan.valid
        counts[chain] = valid
        if problem is not None:
            problems.append(problem)
        largest = max((cp.tree_size for cp in signed), default=0)
        if secondary is not None:
            mismatch = _compare(primary, secondary, chain, valid, secondary_source, primary_source, scan.agree)
            if mismatch is not None:
                problems.append(mismatch)
            elif len(secondary) < valid:
                if largest > len(secondary):
                    problems.append(Problem(ProblemKind.TRUNCATED, chain, len(secondary), secondary_source,
                                            f"{secondary_source} has {len(secondary)} entries but a signed "
                                            f"checkpoint covers {largest} (tail truncation or TRUNCATE)"))
                elif not mirror_may_lag:
                    problems.append(Problem(ProblemKind.SOURCE_MISMATCH, chain, len(secondary), secondary_source,
                                            f"{secondary_source} has {len(secondary)} entries, {primary_source} "
                                            f"has {len(primary)}: mirror lag or tail truncation"))
            elif len(secondary) > len(primary) and problem is None:
                problems.append(Problem(ProblemKind.SOURCE_MISMATCH, chain, len(primary), primary_source,
                                        f"{primary_source} has {len(primary)} entries but {secondary_source} has "
                                        f"{len(secondary)}: {primary_source} lost its tail (or was read first)"))
        tree = _tree(scan) if need_roots else None
        roots = {cp.tree_size: tree.root(cp.tree_size) for cp in signed if cp.tree_size <= valid} if tree else {}
        good_upto = 0
        for cp in signed:
            if cp.tree_size > len(primary):
                problems.append(Problem(ProblemKind.TRUNCATED, chain, len(primary), primary_source,
                                        f"{primary_source} has {len(primary)} entries but a checkpoint signed at "
                                        f"{cp.signed_at} covers {cp.tree_size} (tail truncation or TRUNCATE)"))
                break
            if cp.tree_size > valid:
                break  # an earlier problem already explains it
            head_ok = not cp.head_hash or (cp.tree_size > 0 and primary[cp.tree_size - 1][_HASH] == cp.head_hash)
            root = roots.get(cp.tree_size)
            if not head_ok or (root is not None and root.hex() != cp.root_hash):
                what = "head hash" if not head_ok else "Merkle root"
                problems.append(Problem(ProblemKind.CHECKPOINT_ROOT_MISMATCH, chain, good_upto, primary_source,
                                        f"entries [0, {cp.tree_size}) do not match the {what} signed at "
                                        f"{cp.signed_at}; the chain itself is consistent, so entries in "
                                        f"[{good_upto}, {cp.tree_size}) were rewritten with re-computed hashes "
                                        "(re-hashed suffix)"))
                break
            good_upto = cp.tree_size
            verified_cps += 1
    problems.sort(key=lambda p: (-1 if p.sequence is None else p.sequence, p.chain))
    return VerifyResult(tuple(problems), counts, verified_cps)


class StreamingVerifier:
    """Verify one chain chunk by chunk in bounded memory: the fast path for a large, healthy ledger.

    Feed the primary source (Kafka) in order, each chunk with the secondary source's (Postgres) rows at the same
    positions; memory is one chunk plus ~64 bytes per entry when Merkle roots are rebuilt (nothing per entry with
    ``recompute_roots=False``). It only ever says "verified" — with exactly what :func:`verify` would report for a
    healthy ledger — or that it cannot (``finish()`` returns None, ``failed`` says why): then run :func:`verify` over
    the full data, which names the first bad sequence and what is wrong. Tamper evidence is rare; its diagnosis may
    cost memory, a clean audit must not.
    """

    def __init__(self, chain: str, checkpoints: Iterable[Checkpoint] = (),
                 public_keys: Mapping[str, Ed25519PublicKey] | None = None, *, recompute_roots: bool = True,
                 mirror_may_lag: bool = False, scanner: Scanner | None = None) -> None:
        self.chain = chain
        self.failed: str | None = None
        self.count = 0
        self.secondary_count = 0
        self._secondary_seen = False
        self._secondary_ended = False
        self._mirror_may_lag = mirror_may_lag
        self._prev = GENESIS_PREV_HASH
        keys = public_keys or {}
        self._signed: list[Checkpoint] = []
        for cp in checkpoints:
            if cp.chain != chain:
                continue
            if check_checkpoint_signature(cp, keys) is not None:
                self.failed = f"checkpoint {cp.tree_size} signed at {cp.signed_at} has a bad or untrusted signature"
            self._signed.append(cp)
        self._signed.sort(key=lambda c: c.tree_size)
        self._sizes = sorted({cp.tree_size for cp in self._signed})
        self._need_roots = recompute_roots or any(not cp.head_hash for cp in self._signed)
        self._tree = MerkleTree()
        self._heads: dict[int, str] = {}
        self._scanner = scanner or serial_scan

    def feed(self, primary: Sequence[Any], secondary: Sequence[Any] | None = None) -> bool:
        """Check the next chunk; False once anything did not check out (stop reading, fall back to verify())."""
        if self.failed is not None:
            return False
        if secondary is not None and not isinstance(secondary, list):
            secondary = list(secondary)
        got = self._scanner(primary, self.chain, self.count, self._prev, self._need_roots, secondary)
        n = got.valid
        if n != len(primary):
            self.failed = f"entry at sequence {self.count + n} did not verify"
            return False
        lo, hi = self.count, self.count + n
        for size in self._sizes:
            if lo < size <= hi:
                self._heads[size] = primary[size - lo - 1][_HASH]
        if self._need_roots:
            self._tree.extend_hashes(got.leaves, got.levels)
        if secondary is not None:
            self._secondary_seen = True
            k = len(secondary)
            if (self._secondary_ended and k) or k > n or got.agree != k:
                self.failed = f"the secondary source differs from the primary near sequence {self.count}"
                return False
            self._secondary_ended = k < n
            self.secondary_count += k
        self.count = hi
        self._prev = got.last_hash
        return True

    def finish(self, secondary_has_more: bool = False) -> VerifyResult | None:
        """The result if the whole ledger verified on the fast path, else None (see ``failed``)."""
        if self.failed is None and secondary_has_more:
            self.failed = "the secondary source has entries beyond the primary's end"
        if self.failed is None and self._secondary_seen and self.secondary_count < self.count:
            largest = self._sizes[-1] if self._sizes else 0
            if not self._mirror_may_lag or largest > self.secondary_count:
                self.failed = f"the secondary source has {self.secondary_count} entries, the primary {self.count}"
        if self.failed is None and self._sizes and self._sizes[-1] > self.count:
            self.failed = f"a checkpoint covers {self._sizes[-1]} entries, the source has {self.count}"
        if self.failed is not None:
            return None
        roots = {size: self._tree.root(size) for size in self._sizes} if self._need_roots else {}
        for cp in self._signed:
            root = roots.get(cp.tree_size)
            if (cp.head_hash and (cp.tree_size == 0 or self._heads.get(cp.tree_size) != cp.head_hash)) or (
                    root is not None and root.hex() != cp.root_hash):
                self.failed = f"checkpoint {cp.tree_size} does not match the chain"
                return None
        return VerifyResult((), {self.chain: self.count} if self.count or self._signed else {}, len(self._signed))
