"""The compiled scanner (services/ledger/_chainscan.c via pilothouse.ledger.native) against the pure-Python reference:
the same valid prefix, last hash, leaf hashes and agreeing prefix on good data, on every kind of damage, on entries
outside the C code's fast shape (handed back to the reference), and on forged entries whose stored hash was computed
over a header the reference would not write. Also its Merkle pair hashing and its threads."""

from __future__ import annotations

import json
import random
from hashlib import sha256
from pathlib import Path

import orjson
import pytest

from pilothouse.ledger import native
from pilothouse.ledger.domain import (
    _FORMAT_LINE,
    CheckpointSigner,
    KafkaTombstone,
    LedgerChain,
    StreamingVerifier,
    compute_entry_hash,
    serial_scan,
    verify,
)
from pilothouse.ledger.merkle import MerkleTree, _pairs, subtree_levels

NATIVE = native.load()
pytestmark = pytest.mark.skipif(not NATIVE.available, reason=f"no compiled scanner: {NATIVE.origin}")
SHANI = NATIVE.available and NATIVE.module.use_shani(True)


@pytest.fixture(autouse=True, params=["sha-ni", "openssl"])
def sha_engine(request):
    """Every test runs with both SHA-256 engines of the compiled scanner (SHA-NI two at a time, and OpenSSL)."""
    if request.param == "sha-ni" and not SHANI:
        pytest.skip("this CPU has no SHA extensions")
    NATIVE.module.use_shani(request.param == "sha-ni")
    yield request.param
    NATIVE.module.use_shani(True)

WEBHOOK = json.loads((Path(__file__).parent.parent / "fixtures" / "ledger" / "alertmanager_webhook_2_alerts.json")
                     .read_text())
SIGNER = CheckpointSigner.from_seed("pilothouse-ledger", bytes(range(32)))
KEYS = {SIGNER.key_id: SIGNER.public_key}


def _ledger(n: int, *, odd_every: int = 0, checkpoint_every: int = 100):
    """n entries of ~1 KB; with ``odd_every`` every k-th entry has header fields outside the C fast shape."""
    chain = LedgerChain("main")
    entries, cps = [], []
    odd = ["inc-é", 'inc-"q"', "inc-\\b", "inc-\n", "inc-\x7f", "inc-\U0001f525"]
    for i in range(n):
        incident = odd[(i // odd_every) % len(odd)] if odd_every and i % odd_every == odd_every - 1 else f"inc-{i % 7}"
        ev = {"event_id": f"ev-{i}", "incident_id": incident, "webhook": WEBHOOK,
              "note": "naïve ünïcödé payload" if i % 5 == 0 else "ascii"}
        entries.append(chain.record(ev, event_id=f"le-{i}", occurred_at=1_764_000_000_000 + i, producer="ledger",
                                    recorded_topic="pilothouse.sensing.alerts.v1",
                                    recorded_type="pilothouse.sensing.AlertReceived", recorded_offset=i,
                                    recorded_partition=i % 3))
        if (i + 1) % checkpoint_every == 0:
            cps.append(chain.checkpoint(SIGNER, 1_764_000_100_000 + i))
    return entries, cps


ENTRIES, CPS = _ledger(700)
ROWS = [tuple(r) for r in orjson.loads(orjson.dumps([list(e) for e in ENTRIES]))]  # separate objects, as psycopg


def _same(items, secondary=None, first_seq=0, prev="0" * 64, threads=1) -> None:
    scan = native.scanner(threads)
    for want_leaves in (True, False):
        got = scan(items, "main", first_seq, prev, want_leaves, secondary)
        ref = serial_scan(items, "main", first_seq, prev, want_leaves, secondary)
        assert got.same_as(ref), (got.valid, ref.valid)
        assert got.agree == ref.agree
        if want_leaves and got.levels:  # the levels hashed in C are the tree's own nodes
            t1, t2 = MerkleTree(), MerkleTree()
            t1.extend_hashes(got.leaves, got.levels)
            t2.extend_hashes(ref.leaves)
            assert t1.root() == t2.root() and t1.root(got.valid // 2 + 1) == t2.root(got.valid // 2 + 1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_good_ledger_same_as_reference(threads: int) -> None:
    _same(ENTRIES, ROWS, threads=threads)
    got = native.scanner(threads)(ENTRIES, "main", secondary=ROWS)
    assert got.valid == len(ENTRIES) == got.agree
    assert got.leaves == bytes.fromhex("".join(e.entry_hash for e in ENTRIES))
    # a chunk from the middle of the chain: sequence numbers and the link continue
    _same(ENTRIES[300:], ROWS[300:], first_seq=300, prev=ENTRIES[299].entry_hash, threads=threads)


def _damaged(kind: str, at: int) -> list:
    items: list = list(ENTRIES)
    if kind == "payload":  # UPDATE of the payload, hashes left alone
        items[at] = items[at]._replace(payload_json=items[at].payload_json.replace("webhook", "webhooK", 1))
    elif kind == "field":
        items[at] = items[at]._replace(recorded_offset=10**6)
    elif kind == "link":
        items[at] = items[at]._replace(prev_hash="f" * 64)
    elif kind == "hash_upper":  # the same digest in capitals: not what the reference computes
        items[at] = items[at]._replace(entry_hash=items[at].entry_hash.upper())
    elif kind == "gap":
        del items[at]
    elif kind == "duplicate":
        items.insert(at, items[at - 1])
    elif kind == "reorder":
        items[at], items[at + 1] = items[at + 1], items[at]
    elif kind == "tombstone":
        items[at] = KafkaTombstone(items[at].entry_key, at)
    elif kind == "junk":
        items[at] = "junk"
    elif kind == "short_tuple":
        items[at] = tuple(items[at])[:17]
    elif kind == "long_tuple":
        items[at] = (*items[at], "x")
    elif kind == "sequence_str":
        items[at] = items[at]._replace(sequence=str(at))
    elif kind == "sequence_bool":
        items[at] = items[at]._replace(sequence=True)
    elif kind == "huge_int":
        items[at] = items[at]._replace(recorded_offset=2**70)
    elif kind == "float_field":
        items[at] = items[at]._replace(recorded_partition=1.0)
    elif kind == "chain":
        items[at] = items[at]._replace(chain="other")
    elif kind == "payload_bytes":
        items[at] = items[at]._replace(payload_json=items[at].payload_json.encode())
    elif kind == "surrogate":
        items[at] = items[at]._replace(payload_json=items[at].payload_json + "\ud800")
    elif kind == "rehashed":  # rewritten with valid re-computed hashes from here on: a valid chain of its own
        prev = items[at - 1].entry_hash
        for j in range(at, len(items)):
            e = items[j]._replace(producer="mallory", prev_hash=prev) if j == at else items[j]._replace(prev_hash=prev)
            items[j] = e._replace(entry_hash=compute_entry_hash(e))
            prev = items[j].entry_hash
    return items


DAMAGE = ["payload", "field", "link", "hash_upper", "gap", "duplicate", "reorder", "tombstone", "junk", "short_tuple",
          "long_tuple", "sequence_str", "sequence_bool", "huge_int", "float_field", "chain", "payload_bytes",
          "surrogate", "rehashed"]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("at", [1, 63, 64, 450, 650])  # first entries, batch edges, both halves of a threaded batch
def test_damage_found_at_the_same_place(kind: str, at: int) -> None:
    items = _damaged(kind, at)
    for threads in (1, 2):
        _same(items, ROWS, threads=threads)
    got = native.scanner(2)(items, "main")
    if kind == "rehashed":
        assert got.valid == len(items)  # internally consistent: only Kafka/Postgres and checkpoints catch it
        assert native.scanner(2)(items, "main", secondary=ROWS).agree == at
        assert not verify(items, ROWS, CPS, KEYS, scanner=native.scanner(2)).ok
    else:
        assert got.valid == at
    assert verify(items, ROWS, CPS, KEYS, scanner=native.scanner(2)) == verify(items, ROWS, CPS, KEYS)


def test_entries_outside_the_fast_shape_are_checked_by_the_reference() -> None:
    items, cps = _ledger(400, odd_every=9)
    rows = [tuple(e) for e in items]
    for threads in (1, 2):
        _same(items, rows, threads=threads)
        assert native.scanner(threads)(items, "main").valid == len(items)
    # ... and a damaged odd entry is still refused where the reference refuses it
    bad = list(items)
    bad[8] = bad[8]._replace(producer="x")  # an odd entry (index 8 = 9th) altered
    assert bad[8].incident_id == "inc-é"
    assert native.scanner(1)(bad, "main").valid == serial_scan(bad, "main").valid == 8
    assert verify(items, rows, cps, KEYS, scanner=native.scanner(2)).ok


def test_a_list_entry_and_str_subclasses_go_to_the_reference() -> None:
    class S(str):
        pass

    items: list = list(ENTRIES[:300])
    items[10] = list(items[10])  # the reference accepts a list of the 18 fields (orjson writes it the same)
    items[20] = items[20]._replace(producer=S("ledger"))
    items[30] = items[30]._replace(entry_hash=S(items[30].entry_hash))
    _same(items, [tuple(e) for e in ENTRIES[:300]])


@pytest.mark.parametrize("forgery", ['he said "hi"', "back\\slash", "line\nfeed", "tab\there", "del\x7f", "ünï"])
def test_a_hash_over_a_naively_written_header_is_refused(forgery: str) -> None:
    """An attacker who stores SHA-256 over a header written without JSON escaping (what a C writer that skipped the
    shape check would produce) gets no entry past the compiled scanner: it writes such a field only as JSON does."""
    items: list = list(ENTRIES[:100])
    e = items[50]._replace(producer=forgery)
    fields = []
    for v in e[:16]:
        fields.append("null" if v is None else str(v) if isinstance(v, int) else f'"{v}"')
    naive = ("[" + ",".join(fields) + "]\n").encode()
    forged = e._replace(entry_hash=sha256(b"\x00" + _FORMAT_LINE + naive + e.payload_json.encode()).hexdigest())
    items[50] = forged
    if naive != orjson.dumps(tuple(e[:16]), None, orjson.OPT_APPEND_NEWLINE):
        assert native.scanner(1)(items, "main").valid == serial_scan(items, "main").valid == 50
    honest = list(ENTRIES[:100])
    honest[50] = e._replace(entry_hash=compute_entry_hash(e))  # the same field, hashed as the reference does
    assert native.scanner(1)(honest, "main").valid == serial_scan(honest, "main").valid == 51


def test_random_fields_round_trip_against_orjson() -> None:
    """Random header strings and ints (printable, escapes, non-ASCII, 64-bit edges): the C result always equals the
    reference's, whichever path each entry took."""
    rng = random.Random(20261126)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t", "\x00", "\x1f", "\x7f", '"', "\\", "é", "€", "😀"]
    ints = [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 10**19]
    chain = LedgerChain("main")
    items = []
    for i in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        event = {"event_id": f"e{i}", "incident_id": s or None, "x": s}
        try:
            entry = chain.record(event, event_id=f"l{i}", occurred_at=rng.choice(ints[:7]), producer=s,
                                 recorded_topic="t", recorded_type="T", recorded_offset=rng.choice(ints[:6]))
        except Exception:  # noqa: BLE001 - a value orjson refuses (the reference never stores it)
            continue
        items.append(entry)
    assert len(items) > 400
    _same(items, [tuple(e) for e in items])
    assert native.scanner(2)(items, "main").valid == len(items)


def test_merkle_pairs_and_levels_match_the_python_ones() -> None:
    leaves = b"".join(sha256(i.to_bytes(4, "big")).digest() for i in range(3001))
    module = NATIVE.module
    assert module.pairs(leaves, 1) == module.pairs(leaves, 2) == _pairs(leaves)
    assert native.subtree_levels(module, leaves, 20, 2) == subtree_levels(leaves, 20)
    assert module.pairs(b"", 1) == b"" and module.pairs(leaves[:32], 1) == b""


@pytest.mark.parametrize("chunk", [64, 100, 256])
def test_streaming_verifier_with_the_compiled_scanner(chunk: int) -> None:
    def run(scanner, items, rows, cps):
        sv = StreamingVerifier("main", cps, KEYS, scanner=scanner)
        for i in range(0, len(items), chunk):
            if not sv.feed(items[i:i + chunk], rows[i:i + chunk]):
                break
        return sv.finish(), sv.failed

    got, _ = run(native.scanner(2), ENTRIES, ROWS, CPS)
    assert got is not None and got == verify(ENTRIES, ROWS, CPS, KEYS)
    for kind in ("payload", "rehashed", "tombstone"):
        items = _damaged(kind, 333)
        got, failed = run(native.scanner(2), items, ROWS, CPS)
        assert got is None and failed, kind


def test_a_failed_build_says_why(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "_chainscan.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setattr(native, "MODULE", "pilothouse.ledger._chainscan_absent")  # no installed build either
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    got = native._find_or_build()
    assert not got.available and "could not build _chainscan.c" in got.origin and "pure-Python" in got.origin


@pytest.mark.parametrize("at", [0, 5, 64, 450, 699])
def test_agreeing_prefix_with_postgres_rows_that_differ(at: int) -> None:
    """The agreeing prefix (Postgres rows equal to the Kafka entries) is the reference's, whichever field differs —
    payloads are compared by the hashing threads, the other fields before."""
    def row(**change):
        return tuple(ENTRIES[at]._replace(**change))

    payload = ENTRIES[at].payload_json
    variants = [
        row(payload_json=payload[:-2] + "X" + payload[-1]),          # same length, last bytes differ
        row(payload_json="X" + payload[1:]),                          # first byte differs
        row(payload_json=payload + " "),                              # longer
        row(payload_json=payload.replace("a", "\u0101", 1)),          # another string kind (UCS2), same length
        row(payload_json=payload.encode()),                           # bytes, not str
        row(producer="mallory"),
        row(sequence=at + 1),
        row(entry_hash="0" * 64),
        tuple(ENTRIES[at])[:17],
        KafkaTombstone(ENTRIES[at].entry_key, at),
        None,
    ]
    for v in variants:
        rows = list(ROWS)
        rows[at] = v
        for threads in (1, 2):
            _same(ENTRIES, rows, threads=threads)
            assert native.scanner(threads)(ENTRIES, "main", secondary=rows).agree == at
    _same(ENTRIES, ROWS[:at], threads=2)  # a shorter mirror
    assert native.scanner(2)(ENTRIES, "main", secondary=ROWS[:at]).agree == at


def test_the_build_without_openssl_headers_gives_the_same_results(tmp_path) -> None:
    """The fallback build (no libssl-dev: SHA256_CTX declared here, linked against the runtime libcrypto.so.3)."""
    import subprocess

    out = tmp_path / "_chainscan_noheaders.so"
    command = native._compile_commands(native.SOURCE, out)[1]
    assert "-DPILOTHOUSE_NO_OPENSSL_HEADERS" in command
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    module = native._load_file(out)
    scan = native.scanner(2, native.Native(module, "test"))
    for items in (ENTRIES, _damaged("payload", 450), _damaged("link", 64)):
        got, ref = scan(items, "main", secondary=ROWS), serial_scan(items, "main", secondary=ROWS)
        assert got.same_as(ref) and got.agree == ref.agree


def test_sha256_of_every_length_equals_hashlib(sha_engine: str) -> None:
    rng = random.Random(7)
    messages = [rng.randbytes(n) for n in [*range(0, 300), 447, 448, 1023, 1024, 1055, 4096, 65_537]]
    for order in (messages, messages[::-1], messages[1:]):  # pairs of every mix of lengths, and an odd last one
        assert NATIVE.module.sha256_batch(order) == [sha256(m).digest() for m in order]


def test_typical_entries_take_the_fast_path_without_hand_backs(sha_engine: str) -> None:
    """Good ~1 KB entries (ASCII and non-ASCII payloads) are all checked in C: nothing is handed to the reference."""
    valid, last, leaves, agree = NATIVE.module.scan(ENTRIES, 0, "main", "0" * 64, 0, True, ROWS, 2,
                                                    b"\x00" + _FORMAT_LINE)
    assert (valid, agree, last) == (len(ENTRIES), len(ENTRIES), ENTRIES[-1].entry_hash)
    assert leaves == bytes.fromhex("".join(e.entry_hash for e in ENTRIES))


def test_junk_in_every_field_never_crashes_and_matches_the_reference() -> None:
    """Entries with a field of another type (None, float, bytes, list, dict, bool, big int, str subclass, object) at
    every position, alone or as the Postgres row: the compiled scanner gives the reference's answer every time."""
    class S(str):
        pass

    junk = [None, 1.5, b"bytes", ["x"], {"k": 1}, True, 2**80, -(2**80), S("s"), object(), "", "é" * 3, 0]
    rng = random.Random(99)
    for trial in range(300):
        items: list = list(ENTRIES[:80])
        rows: list = list(ROWS[:80])
        at, field = rng.randrange(80), rng.randrange(18)
        value = rng.choice(junk)
        target = items if trial % 2 else rows
        target[at] = tuple(ENTRIES[at][:field]) + (value,) + tuple(ENTRIES[at][field + 1:])
        for threads in (1, 2):
            _same(items, rows, threads=threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_first_of_several_bad_entries_is_found_whichever_thread_hashes_it(threads: int) -> None:
    items: list = list(ENTRIES)
    for at in (690, 520, 611, 515 + 64):  # payloads changed, links intact: only the hashes show it
        items[at] = items[at]._replace(payload_json=items[at].payload_json.replace("webhook", "webhooK", 1))
    got = native.scanner(threads)(items, "main", secondary=ROWS)
    assert (got.valid, got.agree) == (520, 520)
    _same(items, ROWS, threads=threads)
