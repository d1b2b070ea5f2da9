"""Ed25519 authorizations: the policy service signs, the actuator verifies with the same function."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.policy.domain import (
    AuthorizationInvalid,
    AuthorizationPayload,
    sign_authorization,
    verify_authorization,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def payload(**overrides: object) -> AuthorizationPayload:
    fields = {
        "action_id": "act-1",
        "action_hash": "a" * 64,
        "decision_id": "dec-0123",
        "bundle_revision": "2026.11.25-1",
        "input_hash": "b" * 64,
        "approval_ids": ["ap-bob", "ap-alice"],
        "expires_at": NOW + timedelta(minutes=5),
    }
    fields.update(overrides)
    return AuthorizationPayload.model_validate(fields)


def test_round_trip_verifies() -> None:
    p = payload()
    signature = sign_authorization(KEY, p)
    verify_authorization(KEY.public_key(), p, signature, now=NOW, action_hash="a" * 64)


def test_canonical_bytes_are_independent_of_approval_order_and_timezone() -> None:
    a = payload()
    b = payload(approval_ids=["ap-alice", "ap-bob"], expires_at="2026-11-25T13:05:00+01:00")
    assert a.canonical_bytes() == b.canonical_bytes()
    assert a.canonical_bytes().startswith(b"pilothouse.authorization.v1\n")
    # The signature made over one verifies for the other: the actuator need not receive the same field order.
    verify_authorization(KEY.public_key(), b, sign_authorization(KEY, a), now=NOW)


def test_signature_is_deterministic() -> None:
    assert sign_authorization(KEY, payload()) == sign_authorization(KEY, payload())


@pytest.mark.parametrize(
    "tampered",
    [
        {"action_hash": "c" * 64},
        {"action_id": "act-2"},
        {"decision_id": "dec-9999"},
        {"bundle_revision": "2026.11.24-9"},
        {"input_hash": "d" * 64},
        {"approval_ids": ["ap-alice"]},
        {"approval_ids": ["ap-alice", "ap-bob", "ap-mallory"]},
        {"expires_at": NOW + timedelta(hours=5)},
    ],
)
def test_any_altered_field_fails_verification(tampered: dict) -> None:
    signature = sign_authorization(KEY, payload())
    with pytest.raises(AuthorizationInvalid, match="does not match"):
        verify_authorization(KEY.public_key(), payload(**tampered), signature, now=NOW)


def test_signature_from_another_key_fails() -> None:
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with pytest.raises(AuthorizationInvalid):
        verify_authorization(KEY.public_key(), payload(), sign_authorization(other, payload()), now=NOW)


@pytest.mark.parametrize("signature", ["", "not base64 !!", "AAAA", "A" * 200])
def test_malformed_signature_fails(signature: str) -> None:
    with pytest.raises(AuthorizationInvalid):
        verify_authorization(KEY.public_key(), payload(), signature, now=NOW)


def test_flipped_bit_fails() -> None:
    import base64

    raw = bytearray(base64.urlsafe_b64decode(sign_authorization(KEY, payload()) + "=="))
    raw[10] ^= 0x01
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(AuthorizationInvalid, match="does not match"):
        verify_authorization(KEY.public_key(), payload(), forged, now=NOW)


def test_expired_authorization_fails() -> None:
    p = payload()
    signature = sign_authorization(KEY, p)
    verify_authorization(KEY.public_key(), p, signature, now=p.expires_at - timedelta(microseconds=1))
    with pytest.raises(AuthorizationInvalid, match="expired"):
        verify_authorization(KEY.public_key(), p, signature, now=p.expires_at)


def test_naive_now_refused() -> None:
    p = payload()
    with pytest.raises(AuthorizationInvalid, match="timezone"):
        verify_authorization(KEY.public_key(), p, sign_authorization(KEY, p), now=NOW.replace(tzinfo=None))


def test_bound_to_another_action_fails() -> None:
    p = payload()
    with pytest.raises(AuthorizationInvalid, match="another action"):
        verify_authorization(KEY.public_key(), p, sign_authorization(KEY, p), now=NOW, action_hash="e" * 64)


@pytest.mark.parametrize(
    "bad",
    [{"approval_ids": ["ap-1", "ap-1"]}, {"action_hash": "ABC"}, {"expires_at": "2026-11-25T12:00:00"}, {"extra": 1}],
)
def test_invalid_payload_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        payload(**bad)
