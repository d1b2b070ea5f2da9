"""Human attestations: statements both sides compute identically; only the enrolled key of the named person verifies."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus import attestation as at
from pilothouse.bus.errors import ConfigurationError
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated, KillSwitchChanged
from pilothouse.bus.serde import Serde

NOW = datetime(2026, 11, 25, 23, 0, 0, 123000, tzinfo=timezone.utc)


def registry(**people: tuple[list[str], list[Ed25519PrivateKey]]) -> at.HumanKeyRegistry:
    return at.HumanKeyRegistry.from_document({"humans": {
        uid: {"roles": roles, "keys": [{"key_id": at.key_id(k.public_key()),
                                        "public_key": at.public_key_b64(k.public_key())} for k in keys]}
        for uid, (roles, keys) in people.items()}})


def approval(approver: str = "approver-1", **kw) -> ApprovalRecorded:
    base = dict(event_id="e1", incident_id="inc", correlation_id="inc", occurred_at=NOW, producer="console",
                approval_id="appr-1", action_id="act-1", action_hash="a" * 64, decision="approve",
                approver_id=approver, approver_roles=["approver"], expires_at=NOW + timedelta(minutes=15))
    return ApprovalRecorded(**{**base, **kw})


def test_approval_statement_is_canonical_and_domain_separated():
    s = at.statement_of(approval())
    prefix, body = s.split(b"\n", 1)
    assert prefix == b"pilothouse.approval.v1"
    doc = json.loads(body)
    assert list(doc) == sorted(doc) and b" " not in body
    assert doc == {"action_hash": "a" * 64, "action_id": "act-1", "approval_id": "appr-1", "approver_id": "approver-1",
                   "decision": "approve", "expires_at": int((NOW + timedelta(minutes=15)).timestamp() * 1000)}
    # The same fields spelled differently (case of the id) give the same statement: ids compare normalised.
    assert at.statement_of(approval("APPROVER-1")) == s


def test_statement_survives_the_avro_round_trip():
    key = Ed25519PrivateKey.generate()
    signed = at.sign_record(key, approval())
    serde = Serde()
    back = serde.decode(serde.encode(signed)).record
    registry(**{"approver-1": (["approver"], [key])}).verify(back)


@pytest.mark.parametrize("change", [
    {"action_hash": "b" * 64}, {"action_id": "act-2"}, {"decision": "reject"}, {"approval_id": "appr-2"},
    {"expires_at": NOW + timedelta(hours=1)}, {"approver_id": "approver-2"},
])
def test_any_bound_field_changed_after_signing_does_not_verify(change):
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    reg = registry(**{"approver-1": (["approver"], [k1]), "approver-2": (["approver"], [k2])})
    signed = at.sign_record(k1, approval())
    assert reg.verify(signed).signer == "approver-1"
    with pytest.raises(at.AttestationInvalid):
        reg.verify(signed.model_copy(update=change))


def test_unsigned_unknown_and_foreign_keys_are_refused_with_a_reason():
    mine, console_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    reg = registry(**{"approver-1": (["approver"], [mine])})
    with pytest.raises(at.AttestationInvalid, match="unsigned"):
        reg.verify(approval())
    with pytest.raises(at.AttestationInvalid, match="not enrolled for approver-1"):
        reg.verify(at.sign_record(console_key, approval()))
    # A key id copied from the registry with the console's own signature: the signature does not verify.
    forged = at.sign_record(console_key, approval()).model_copy(update={"key_id": at.key_id(mine.public_key())})
    with pytest.raises(at.AttestationInvalid, match="does not verify"):
        reg.verify(forged)
    with pytest.raises(at.AttestationInvalid, match="no enrolled signing key"):
        reg.verify(at.sign_record(mine, approval("approver-9")))
    with pytest.raises(at.AttestationInvalid, match="64 bytes"):
        reg.verify(approval(key_id=at.key_id(mine.public_key()), signature="AAAA"))


def test_validation_and_kill_switch_statements_bind_their_fields():
    k = Ed25519PrivateKey.generate()
    reg = registry(**{"admin-1": (["admin"], [k])})
    v = HypothesisValidated(event_id="v", incident_id="inc", correlation_id="inc", occurred_at=NOW,
                            hypothesis_id="h-1", verdict="validated", validator_id="admin-1")
    sv = at.sign_record(k, v)
    assert reg.verify(sv).roles == ("admin",)
    assert at.statement_of(sv).startswith(b"pilothouse.validation.v1\n")
    for change in ({"hypothesis_id": "h-2"}, {"incident_id": "inc-2"}, {"verdict": "rejected"},
                   {"occurred_at": NOW + timedelta(seconds=1)}):
        with pytest.raises(at.AttestationInvalid):
            reg.verify(sv.model_copy(update=change))
    ks = KillSwitchChanged(event_id="k", correlation_id="k", occurred_at=NOW, scope="global", engaged=False,
                           changed_by="admin-1", reason="all clear")
    sk = at.sign_record(k, ks)
    reg.verify(sk)
    assert at.statement_of(sk).startswith(b"pilothouse.kill-switch.v1\n")
    for change in ({"scope": "service:cart"}, {"engaged": True}, {"occurred_at": NOW + timedelta(days=1)}):
        with pytest.raises(at.AttestationInvalid):
            reg.verify(sk.model_copy(update=change))
    # The reason is free text, not part of the statement.
    reg.verify(sk.model_copy(update={"reason": "edited"}))


def test_rotation_several_keys_per_person(tmp_path):
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    reg = registry(**{"approver-1": (["approver"], [old, new])})
    path = tmp_path / "humans.json"
    path.write_text(json.dumps(reg.document()))
    loaded = at.HumanKeyRegistry.from_file(path)
    for k in (old, new):
        assert loaded.verify(at.sign_record(k, approval())).key_id == at.key_id(k.public_key())


def test_registry_refuses_a_key_id_that_does_not_match_its_key(tmp_path):
    k = Ed25519PrivateKey.generate()
    doc = {"humans": {"approver-1": {"keys": [{"key_id": "ed25519:0000000000000000",
                                               "public_key": at.public_key_b64(k.public_key())}]}}}
    with pytest.raises(ConfigurationError, match="does not match its public key"):
        at.HumanKeyRegistry.from_document(doc)
    with pytest.raises(ConfigurationError, match="listed twice"):
        at.HumanKeyRegistry.from_document({"humans": {
            "A": {"keys": [{"public_key": at.public_key_b64(k.public_key())}]},
            "a": {"keys": [{"public_key": at.public_key_b64(k.public_key())}]}}})
    with pytest.raises(ConfigurationError, match="human keys file"):
        at.HumanKeyRegistry.from_file(tmp_path / "missing.json")


def test_key_file_is_private_and_round_trips(tmp_path):
    k = Ed25519PrivateKey.generate()
    path = tmp_path / "humans" / "approver-1.key"
    at.write_human_key(path, k)
    assert path.stat().st_mode & 0o777 == 0o600
    assert at.key_id(at.load_human_key(path).public_key()) == at.key_id(k.public_key())
    path.write_text("not a key")
    with pytest.raises(ConfigurationError, match="PKCS#8"):
        at.load_human_key(path)


def test_kill_switch_release_rules():
    admin, responder = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    reg = registry(**{"admin-1": (["admin"], [admin]), "responder-1": (["responder"], [responder])})

    def switch(engaged: bool, who: str = "admin-1", at: datetime = NOW) -> KillSwitchChanged:
        return KillSwitchChanged(event_id="k", correlation_id="k", occurred_at=at, scope="global", engaged=engaged,
                                 changed_by=who)

    assert at.kill_switch_refusal(reg, switch(True, "anyone"), NOW) is None  # engaging only stops things
    assert "unsigned" in at.kill_switch_refusal(reg, switch(False), NOW)
    assert at.kill_switch_refusal(reg, at.sign_record(admin, switch(False)), NOW) is None
    assert "not enrolled as admin" in at.kill_switch_refusal(
        reg, at.sign_record(responder, switch(False, "responder-1")), NOW)
    future = at.sign_record(admin, switch(False, at=NOW + timedelta(minutes=10)))
    assert "in the future" in at.kill_switch_refusal(reg, future, NOW)
    assert at.kill_switch_refusal(reg, future, NOW + timedelta(minutes=9)) is None  # within the skew by then


def test_registry_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_last_good(tmp_path):
    import os

    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    path = tmp_path / "humans.json"
    path.write_text(json.dumps(registry(**{"approver-1": (["approver"], [k1])}).document()))
    live = at.HumanKeyFile(path)
    assert set(live.registry().humans) == {"approver-1"}
    path.write_text(json.dumps(registry(**{"approver-1": (["approver"], [k1]), "approver-2": (["approver"], [k2])})
                               .document()))
    os.utime(path, ns=(1, 10**18))  # a new modification time, whatever the clock's resolution
    assert set(live.registry().humans) == {"approver-1", "approver-2"}
    path.write_text("{broken")
    os.utime(path, ns=(1, 2 * 10**18))
    assert set(live.registry().humans) == {"approver-1", "approver-2"} and live.last_error
    with pytest.raises(ConfigurationError):
        at.HumanKeyFile(path)  # a bad file at start-up is refused
    assert at.HumanKeyFile(None).registry().humans == {}  # nothing configured: nobody counts
