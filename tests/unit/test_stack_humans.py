"""`pilothouse stack up` gives each demo person a private key file (0600) and enrols its public key in the registry."""

from __future__ import annotations

import json

from pilothouse.bus import attestation
from pilothouse.bus.records import KillSwitchChanged
from pilothouse.stack import humans


def test_keys_created_once_private_and_enrolled(tmp_path):
    registry_file = humans.ensure_human_keys(tmp_path)
    assert (humans.humans_dir(tmp_path).stat().st_mode & 0o777) == 0o700
    first = {u: humans.key_path(tmp_path, u).read_bytes() for u in humans.DEMO_HUMANS}
    for u in humans.DEMO_HUMANS:
        assert humans.key_path(tmp_path, u).stat().st_mode & 0o777 == 0o600
    # A person enrolled by hand survives a later `stack up`; demo keys are reused, not regenerated.
    doc = json.loads(registry_file.read_text())
    doc["humans"]["oncall-9"] = doc["humans"]["approver-1"]
    registry_file.write_text(json.dumps(doc))
    humans.ensure_human_keys(tmp_path)
    assert {u: humans.key_path(tmp_path, u).read_bytes() for u in humans.DEMO_HUMANS} == first
    registry = attestation.HumanKeyRegistry.from_file(registry_file)
    assert set(registry.humans) == set(humans.DEMO_HUMANS) | {"oncall-9"}
    assert registry.humans["admin-1"].roles == ("admin", "approver", "responder")
    # The admin's key file signs what the registry verifies.
    from datetime import datetime, timezone

    rec = KillSwitchChanged(event_id="k", correlation_id="k", occurred_at=datetime.now(timezone.utc), scope="global",
                            engaged=False, changed_by="admin-1")
    key = attestation.load_human_key(humans.key_path(tmp_path, "admin-1"))
    assert registry.verify(attestation.sign_record(key, rec)).signer == "admin-1"
