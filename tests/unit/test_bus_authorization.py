"""Authorizations: only a trusted key's signature over the exact, unexpired action verifies."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus.actions import action_hash
from pilothouse.bus.authorization import AuthorizationInvalid, key_id, sign, verify
from pilothouse.bus.identity import IdentityInvalid, normalise_identity
from pilothouse.bus.records import ActionAuthorized

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
PARAMS = '{"replicas":3,"service":"cart"}'
HASH = action_hash("scale_replicas", "service", "cart", {"service": "cart", "replicas": 3})


def authorization(**kw) -> ActionAuthorized:
    base = dict(event_id="e", incident_id="i", correlation_id="i", occurred_at=NOW, authorization_id="auth-1",
                action_id="act-1", action_hash=HASH, action_type="scale_replicas", target_kind="service",
                target="cart", params_json=PARAMS, decision_id="dec-1", bundle_revision="r1", input_sha256="0" * 64,
                approval_ids=["ap-2", "ap-1"], issued_at=NOW, expires_at=NOW + timedelta(minutes=10), key_id="",
                signature="")
    base.update(kw)
    return ActionAuthorized(**base)


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_a_valid_signature_verifies(key):
    rec = sign(key, authorization())
    verify({key_id(key.public_key()): key.public_key()}, rec, now=NOW, expected_action_hash=HASH)


@pytest.mark.parametrize("field,value", [("params_json", '{"replicas":30,"service":"cart"}'), ("target", "checkout"),
                                         ("approval_ids", ["ap-1"]), ("expires_at", NOW + timedelta(days=1)),
                                         ("action_type", "rollback_deploy")])
def test_altering_any_signed_field_breaks_the_signature(key, field, value):
    rec = sign(key, authorization()).model_copy(update={field: value})
    with pytest.raises(AuthorizationInvalid, match="forged or altered"):
        verify({key_id(key.public_key()): key.public_key()}, rec, now=NOW, expected_action_hash=HASH)


def test_forged_expired_and_rebound_authorizations_are_refused(key):
    trusted = {key_id(key.public_key()): key.public_key()}
    forger = Ed25519PrivateKey.generate()
    with pytest.raises(AuthorizationInvalid, match="unknown key"):
        verify(trusted, sign(forger, authorization()), now=NOW, expected_action_hash=HASH)
    forged_with_trusted_id = sign(forger, authorization()).model_copy(update={"key_id": key_id(key.public_key())})
    with pytest.raises(AuthorizationInvalid, match="forged"):
        verify(trusted, forged_with_trusted_id, now=NOW, expected_action_hash=HASH)
    with pytest.raises(AuthorizationInvalid, match="expired"):
        verify(trusted, sign(key, authorization()), now=NOW + timedelta(minutes=11), expected_action_hash=HASH)
    with pytest.raises(AuthorizationInvalid, match="bound to another action"):
        verify(trusted, sign(key, authorization()), now=NOW, expected_action_hash="f" * 64)


@pytest.mark.parametrize("variant", ["ONCALL-7", "oncall-7 ", "ｏｎｃａｌｌ-７", "on\u200bcall-7", "oncall\u2060-7"])
def test_identity_variants_normalise_to_one_account(variant):
    assert normalise_identity(variant) == "oncall-7"


@pytest.mark.parametrize("bad", ["", "\u200b", "a\x00b", "x" * 300])
def test_unsafe_identities_are_refused(bad):
    with pytest.raises(IdentityInvalid):
        normalise_identity(bad)
