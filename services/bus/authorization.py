"""Signed authorizations: the policy service signs, the actuator verifies (Ed25519, domain-separated canonical bytes).

The signature covers exactly the fields of the ``ActionAuthorized`` record that decide what runs and until when, so a
record altered on the wire (or written by a principal that is not policy) does not verify. Two independent locks:
the broker ACL (only policy may write the topic) and this signature.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pilothouse.bus.actions import canonical_json
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.records import ActionAuthorized

CONTEXT = b"pilothouse.authorization.v1\n"
SIGNED_FIELDS = (
    "authorization_id", "action_id", "action_hash", "action_type", "target_kind", "target", "params_json",
    "decision_id", "bundle_revision", "input_sha256", "approval_ids", "issued_at", "expires_at", "key_id",
)


class AuthorizationInvalid(PermanentError):
    """Forged, altered, expired, or bound to another action."""


def signed_bytes(record: ActionAuthorized) -> bytes:
    """The domain-separated canonical bytes a signature covers."""
    doc = record.model_dump(mode="json", include=set(SIGNED_FIELDS))
    doc["approval_ids"] = sorted(doc["approval_ids"])
    return CONTEXT + canonical_json(doc)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short id of a public key (so verifiers can pick the right one during key rotation)."""
    import hashlib

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, record: ActionAuthorized) -> ActionAuthorized:
    """Return ``record`` with ``key_id`` and ``signature`` set."""
    unsigned = record.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": ""})
    sig = private_key.sign(signed_bytes(unsigned))
    return unsigned.model_copy(update={"signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii")})


def verify(
    keys: dict[str, Ed25519PublicKey], record: ActionAuthorized, *, now: datetime, expected_action_hash: str
) -> None:
    """Raise AuthorizationInvalid unless signed by a trusted key, unexpired at ``now`` and bound to the action the
    verifier hashed itself (``expected_action_hash``)."""
    public = keys.get(record.key_id)
    if public is None:
        raise AuthorizationInvalid(f"signed by an unknown key {record.key_id!r}")
    try:
        raw = base64.urlsafe_b64decode(record.signature + "=" * (-len(record.signature) % 4))
    except (binascii.Error, ValueError) as e:
        raise AuthorizationInvalid("signature is not base64url") from e
    if len(raw) != 64:
        raise AuthorizationInvalid(f"an Ed25519 signature has 64 bytes, got {len(raw)}")
    try:
        public.verify(raw, signed_bytes(record))
    except InvalidSignature as e:
        raise AuthorizationInvalid("signature does not match (forged or altered)") from e
    if now.tzinfo is None:
        raise AuthorizationInvalid("now must be timezone-aware")
    if now >= record.expires_at:
        raise AuthorizationInvalid(f"authorization expired at {record.expires_at.isoformat()}")
    if expected_action_hash != record.action_hash:
        raise AuthorizationInvalid("authorization is bound to another action (action_hash differs)")


def load_private_key(b64: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from its 32 raw bytes, base64 (settings: PILOTHOUSE_POLICY_SIGNING_KEY)."""
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(b64))
    except (binascii.Error, ValueError) as e:
        raise AuthorizationInvalid(f"signing key is not 32 base64 bytes: {e}") from e


def load_public_key(b64: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes, base64."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))
    except (binascii.Error, ValueError) as e:
        raise AuthorizationInvalid(f"public key is not 32 base64 bytes: {e}") from e
