"""The append-only checkpoint file outside Postgres: round trip, and damaged lines reported (never dropped silently)."""

from __future__ import annotations

import json
from pathlib import Path

from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.domain import CheckpointSigner, LedgerChain, verify

SIGNER = CheckpointSigner.from_seed("pilothouse-ledger", bytes(range(32)))


def _checkpoints(n: int = 3) -> tuple[list, list]:
    chain = LedgerChain("main")
    entries, cps = [], []
    for i in range(n * 4):
        entries.append(chain.record({"event_id": f"e{i}"}, event_id=f"l{i}", occurred_at=i, producer="ledger",
                                    recorded_topic="t", recorded_type="T"))
        if i % 4 == 3:
            cps.append(chain.checkpoint(SIGNER, 1000 + i))
    return entries, cps


def test_round_trip_and_append_only(tmp_path: Path) -> None:
    entries, cps = _checkpoints()
    store = CheckpointFile(tmp_path / "ledger")
    assert store.load().checkpoints == []
    assert store.append(cps[:2]) == 2
    assert store.append(cps[2:]) == 1
    loaded = store.load()
    assert loaded.checkpoints == cps and loaded.rejected == []
    lines = store.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["tree_size"] == 4
    assert lines[0] == json.dumps(cps[0].to_dict(), sort_keys=True, separators=(",", ":"))
    assert verify(entries, None, loaded.checkpoints, {SIGNER.key_id: SIGNER.public_key}).ok


def test_damaged_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    _, cps = _checkpoints()
    store = CheckpointFile(tmp_path)
    store.append(cps[:1])
    with store.path.open("ab") as f:
        f.write(b"{not json\n")
        f.write(b'{"chain": "main"}\n')
        f.write(b"[1, 2]\n")
    store.append(cps[1:2])
    with store.path.open("ab") as f:
        f.write(b'{"chain":"main","tree_si')  # an interrupted write
    loaded = store.load()
    assert loaded.checkpoints == cps[:2]
    assert [n for n, _ in loaded.rejected] == [2, 3, 4, 6]
    reasons = dict(loaded.rejected)
    assert "not JSON" in reasons[2] and "lacks field" in reasons[3] and "incomplete" in reasons[6]
