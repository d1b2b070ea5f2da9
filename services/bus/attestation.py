"""Human attestations: a person signs what they decided, so the console that carries it cannot forge or alter it.

Each human account has Ed25519 keys; the private key stays with the person (a key file for the CLI and unattended
runs, the browser's WebCrypto key store in the web UI). Public keys live in a registry file the verifier's settings
name (``PILOTHOUSE_POLICY_HUMAN_KEYS``, ``PILOTHOUSE_ACTUATOR_HUMAN_KEYS``) and that the console principal cannot
write. A statement is domain-separated canonical bytes (sorted-key compact JSON after a one-line prefix), computed
identically by whoever signs and whoever verifies:

- approval (gate 2): ``approval_id, action_id, action_hash, decision, approver_id, expires_at``
- validation (gate 1): ``hypothesis_id, incident_id, verdict, validator_id, signed_at`` (the record's ``occurred_at``)
- kill switch: ``scope, engaged, actor, at`` (the record's ``changed_by`` and ``occurred_at``)

Times are integer milliseconds since the epoch (what Avro ``timestamp-millis`` carries); ids are the normalised stable
ids of :mod:`pilothouse.bus.identity`. The registry format (JSON or YAML)::

    {"humans": {"approver-1": {"roles": ["approver"],
                               "keys": [{"key_id": "ed25519:…", "public_key": "<base64 of 32 raw bytes>"}]}}}

Several keys per person allow rotation (enrol the new key, switch, then remove the old one); ``key_id`` is derived from
the public key (:func:`key_id`) and checked against it on load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from pilothouse.bus.actions import canonical_json
from pilothouse.bus.errors import ConfigurationError, PermanentError
from pilothouse.bus.identity import IdentityInvalid, normalise_identity
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated, KillSwitchChanged
from pilothouse.bus.watched import WatchedFile

APPROVAL_CONTEXT = b"pilothouse.approval.v1\n"
VALIDATION_CONTEXT = b"pilothouse.validation.v1\n"
KILL_SWITCH_CONTEXT = b"pilothouse.kill-switch.v1\n"
MAX_KEYS_PER_HUMAN = 16

Attested = ApprovalRecorded | HypothesisValidated | KillSwitchChanged


class AttestationInvalid(PermanentError):
    """A human statement that is unsigned, signed by a key not enrolled for that person, or altered."""


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def epoch_ms(at: datetime) -> int:
    """A timezone-aware time as integer milliseconds since the epoch (the precision the records carry); exact
    integer arithmetic, no float rounding."""
    if at.tzinfo is None:
        raise AttestationInvalid("times in a statement must be timezone-aware")
    return (at - _EPOCH) // _MS


def to_ms(at: datetime) -> datetime:
    """``at`` truncated to whole milliseconds: what a record's time is after the Avro round trip. Build statements
    and records from this, so signer and verifier see the same instant."""
    return _EPOCH + epoch_ms(at) * _MS


def _stable(raw: str) -> str:
    try:
        return normalise_identity(raw)
    except IdentityInvalid as e:
        raise AttestationInvalid(f"unusable identity in the statement: {e}") from e


def approval_statement(*, approval_id: str, action_id: str, action_hash: str, decision: str, approver_id: str,
                       expires_at: datetime) -> bytes:
    """The bytes an approver signs to approve or reject one exact action until ``expires_at``."""
    return APPROVAL_CONTEXT + canonical_json({
        "approval_id": approval_id, "action_id": action_id, "action_hash": action_hash, "decision": decision,
        "approver_id": _stable(approver_id), "expires_at": epoch_ms(expires_at)})


def validation_statement(*, hypothesis_id: str, incident_id: str, verdict: str, validator_id: str,
                         signed_at: datetime) -> bytes:
    """The bytes a responder signs to validate or reject one hypothesis of one incident."""
    return VALIDATION_CONTEXT + canonical_json({
        "hypothesis_id": hypothesis_id, "incident_id": incident_id, "verdict": verdict,
        "validator_id": _stable(validator_id), "signed_at": epoch_ms(signed_at)})


def kill_switch_statement(*, scope: str, engaged: bool, actor: str, at: datetime) -> bytes:
    """The bytes an admin signs to engage or release a kill switch at time ``at``."""
    return KILL_SWITCH_CONTEXT + canonical_json({
        "scope": scope, "engaged": bool(engaged), "actor": _stable(actor), "at": epoch_ms(at)})


def statement_of(record: Attested) -> bytes:
    """The statement a record claims its human signed (recomputed from the record's own fields)."""
    if isinstance(record, ApprovalRecorded):
        return approval_statement(approval_id=record.approval_id, action_id=record.action_id,
                                  action_hash=record.action_hash, decision=record.decision,
                                  approver_id=record.approver_id, expires_at=record.expires_at)
    if isinstance(record, HypothesisValidated):
        return validation_statement(hypothesis_id=record.hypothesis_id, incident_id=record.incident_id,
                                    verdict=record.verdict, validator_id=record.validator_id,
                                    signed_at=record.occurred_at)
    if isinstance(record, KillSwitchChanged):
        return kill_switch_statement(scope=record.scope, engaged=record.engaged, actor=record.changed_by,
                                     at=record.occurred_at)
    raise AttestationInvalid(f"{type(record).__name__} carries no human statement")


def signer_of(record: Attested) -> str:
    """The stable id of the person a record says signed it."""
    raw = {ApprovalRecorded: "approver_id", HypothesisValidated: "validator_id",
           KillSwitchChanged: "changed_by"}[type(record)]
    return _stable(getattr(record, raw))


_CONTEXTS = {APPROVAL_CONTEXT, VALIDATION_CONTEXT, KILL_SWITCH_CONTEXT}


def answer_statement(private_key: Ed25519PrivateKey, statement: Mapping[str, Any],
                     expect: Mapping[str, Any]) -> dict[str, str]:
    """Sign a statement a console handed out (``statement_id``, ``signing_input`` base64) — after checking that its
    bytes are a well-formed statement saying what the person means (``expect``: field -> value, e.g. the action id,
    hash and decision they reviewed). Returns the fields to send back: ``statement_id``, ``key_id``, ``signature``.
    Raises AttestationInvalid (nothing is signed) when the bytes say anything else."""
    try:
        raw = base64.b64decode(str(statement["signing_input"]), validate=True)
        statement_id = str(statement["statement_id"])
    except (KeyError, binascii.Error, ValueError) as e:
        raise AttestationInvalid(f"not a statement to sign: {e}") from e
    prefix, sep, body = raw.partition(b"\n")
    if not sep or prefix + b"\n" not in _CONTEXTS:
        raise AttestationInvalid("not a pilothouse statement (unknown prefix): refusing to sign")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise AttestationInvalid("statement body is not JSON: refusing to sign") from e
    if not isinstance(doc, dict) or canonical_json(doc) != body:
        raise AttestationInvalid("statement is not in canonical form: refusing to sign")
    wrong = {k: doc.get(k) for k, v in expect.items() if doc.get(k) != v}
    if wrong:
        raise AttestationInvalid(f"statement differs from what you meant ({wrong}): refusing to sign")
    kid, sig = sign_statement(private_key, raw)
    return {"statement_id": statement_id, "key_id": kid, "signature": sig}


# ---- keys --------------------------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short id of a public key: ``ed25519:`` + the first 16 hex digits of SHA-256 of its 32 raw bytes."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """The 32 raw bytes of a public key, base64 (the registry's ``public_key``)."""
    return base64.b64encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def b64url(data: bytes) -> str:
    """Unpadded base64url (how signatures travel)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_statement(private_key: Ed25519PrivateKey, statement: bytes) -> tuple[str, str]:
    """``(key_id, signature)`` of a statement, the signature as unpadded base64url of 64 bytes."""
    return key_id(private_key.public_key()), b64url(private_key.sign(statement))


def sign_record(private_key: Ed25519PrivateKey, record: Attested) -> Attested:
    """``record`` with ``key_id`` and ``signature`` set by its human (tests, CLI, the unattended demo)."""
    kid, sig = sign_statement(private_key, statement_of(record))
    return record.model_copy(update={"key_id": kid, "signature": sig})


def write_human_key(path: Path, private_key: Ed25519PrivateKey) -> None:
    """Write a private key as PKCS#8 PEM, mode 0600 from the first byte (never world-readable, not even briefly)."""
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_human_key(path: Path) -> Ed25519PrivateKey:
    """A person's private key from its PKCS#8 PEM file (``pilothouse stack up`` writes .stack/humans/<id>.key)."""
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise ConfigurationError(f"human key file {path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"human key file {path}: not an unencrypted PKCS#8 PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"human key file {path}: not an Ed25519 key")
    return key


# ---- the registry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Human:
    """One enrolled person: stable id, roles (as enrolled), public keys by key id."""

    id: str
    roles: tuple[str, ...]
    keys: Mapping[str, Ed25519PublicKey]


@dataclass(frozen=True)
class Verified:
    """A statement that verified: who signed it (stable id), with which key, and their enrolled roles."""

    signer: str
    key_id: str
    roles: tuple[str, ...]


class HumanKeyRegistry:
    """Stable id -> enrolled public keys (and roles). Read-only for everyone but the admins who enrol keys."""

    def __init__(self, humans: Mapping[str, Human], *, source: str = "<memory>"):
        self.humans = dict(humans)
        self.source = source

    @classmethod
    def from_document(cls, doc: Any, *, source: str = "<memory>") -> HumanKeyRegistry:
        """Validate a parsed registry document; ConfigurationError names the first problem."""
        if not isinstance(doc, dict) or not isinstance(doc.get("humans"), dict):
            raise ConfigurationError(f"human keys {source}: expected a top-level 'humans' mapping")
        humans: dict[str, Human] = {}
        for raw_id, entry in doc["humans"].items():
            where = f"human keys {source}: humans.{raw_id}"
            try:
                uid = normalise_identity(str(raw_id))
            except IdentityInvalid as e:
                raise ConfigurationError(f"{where}: {e}") from None
            if uid in humans:
                raise ConfigurationError(f"{where}: listed twice (ids compare normalised)")
            if not isinstance(entry, dict) or not isinstance(entry.get("keys"), list) or not entry["keys"]:
                raise ConfigurationError(f"{where}: needs a non-empty 'keys' list")
            if len(entry["keys"]) > MAX_KEYS_PER_HUMAN:
                raise ConfigurationError(f"{where}: more than {MAX_KEYS_PER_HUMAN} keys")
            roles = entry.get("roles", [])
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ConfigurationError(f"{where}.roles: must be a list of strings")
            keys: dict[str, Ed25519PublicKey] = {}
            for i, k in enumerate(entry["keys"]):
                if not isinstance(k, dict) or not isinstance(k.get("public_key"), str):
                    raise ConfigurationError(f"{where}.keys[{i}]: needs 'public_key' (base64 of 32 raw bytes)")
                try:
                    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(k["public_key"], validate=True))
                except (binascii.Error, ValueError) as e:
                    raise ConfigurationError(f"{where}.keys[{i}].public_key: not 32 base64 bytes: {e}") from None
                kid = key_id(pub)
                if k.get("key_id") not in (None, kid):
                    raise ConfigurationError(f"{where}.keys[{i}].key_id: {k['key_id']!r} does not match its public "
                                             f"key (expected {kid})")
                keys[kid] = pub
            humans[uid] = Human(uid, tuple(sorted({r.strip().lower() for r in roles})), keys)
        return cls(humans, source=source)

    @classmethod
    def from_file(cls, path: Path) -> HumanKeyRegistry:
        """Load the registry file once (``.json``, else YAML); :class:`HumanKeyFile` follows it as it changes."""
        return HumanKeyFile(Path(path)).registry()

    def document(self) -> dict[str, Any]:
        """The registry as its file holds it (what :meth:`from_document` reads back)."""
        return {"humans": {h.id: {"roles": list(h.roles),
                                  "keys": [{"key_id": kid, "public_key": public_key_b64(pub)}
                                           for kid, pub in sorted(h.keys.items())]}
                           for h in sorted(self.humans.values(), key=lambda x: x.id)}}

    def verify_statement(self, signer: str, statement: bytes, key_id_: str | None, signature: str | None) -> Verified:
        """Raise AttestationInvalid unless ``signature`` over ``statement`` verifies with one of ``signer``'s keys."""
        if not signature or not key_id_:
            raise AttestationInvalid("unsigned: no human signature")
        uid = _stable(signer)
        human = self.humans.get(uid)
        if human is None:
            raise AttestationInvalid(f"{uid} has no enrolled signing key")
        public = human.keys.get(key_id_)
        if public is None:
            raise AttestationInvalid(f"key {key_id_[:40]!r} is not enrolled for {uid}")
        try:
            raw = _unb64url(signature)
        except (binascii.Error, ValueError) as e:
            raise AttestationInvalid("signature is not base64url") from e
        if len(raw) != 64:
            raise AttestationInvalid(f"an Ed25519 signature has 64 bytes, got {len(raw)}")
        try:
            public.verify(raw, statement)
        except InvalidSignature as e:
            raise AttestationInvalid("signature does not verify") from e
        return Verified(uid, key_id_, human.roles)

    def verify(self, record: Attested) -> Verified:
        """Verify the human signature a record carries over the statement its own fields make."""
        return self.verify_statement(signer_of(record), statement_of(record), record.key_id, record.signature)


#: Roles that may release a kill switch (turning one ON only stops things and needs no signature).
KILL_SWITCH_RELEASE_ROLES = ("admin",)
#: How far in the future a signed kill-switch time may lie (clock skew): a later one would outrank future switches.
MAX_STATEMENT_SKEW_S = 120


def kill_switch_refusal(registry: HumanKeyRegistry, record: KillSwitchChanged, now: datetime) -> str | None:
    """None when a kill-switch change may apply, else why it is refused (policy and the actuator both ask).

    Engaging is always allowed: it only stops things (the broker ACL still limits who may write the topic). Releasing
    needs the signature of an admin enrolled under the id in ``changed_by``, over scope, state and time, with a time
    not in the future; the stores keep the latest change per scope, so a replayed old release never undoes a newer
    switch.
    """
    if record.engaged:
        return None
    scope = record.scope[:100]
    try:
        verified = registry.verify(record)
    except AttestationInvalid as e:
        return f"release of {scope!r} by {record.changed_by[:100]} refused: {e}"
    if not set(verified.roles) & set(KILL_SWITCH_RELEASE_ROLES):
        return (f"release of {scope!r} refused: {verified.signer} is not enrolled as "
                f"{' or '.join(KILL_SWITCH_RELEASE_ROLES)}")
    if epoch_ms(record.occurred_at) > epoch_ms(now) + MAX_STATEMENT_SKEW_S * 1000:
        return f"release of {scope!r} refused: signed for {record.occurred_at.isoformat()}, in the future"
    return None


def now_utc() -> datetime:
    """The current time, UTC (statements are made and checked against it)."""
    return datetime.now(timezone.utc)


class HumanKeyFile:
    """The enrolled human keys from a settings file, re-read whenever its modification time changes (admins enrol
    and rotate keys without restarting the verifier). The first load raises on an unreadable or invalid file; a
    later bad edit keeps the last good registry and logs an error. No file: an empty registry (nothing counts)."""

    def __init__(self, path: Path | None):
        self._file = WatchedFile(path, lambda doc: HumanKeyRegistry.from_document(doc, source=str(path)),
                                 empty=HumanKeyRegistry({}, source="<none configured>"), what="human keys",
                                 error=ConfigurationError, logger="pilothouse.attestation")

    @property
    def last_error(self) -> str | None:
        return self._file.last_error

    def registry(self) -> HumanKeyRegistry:
        """The current registry (re-read first if the file changed)."""
        return self._file.current()
