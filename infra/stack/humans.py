"""Signing keys for the local stack's demo people (``pilothouse stack up`` creates them once, then reuses them).

Each demo account gets an Ed25519 key pair: the private key in ``<data>/humans/<id>.key`` (PKCS#8 PEM, mode 0600, in a
0700 directory) — the person's, used by the CLI, the unattended demo and loaded into the browser to sign in the
console — and its public key in ``<data>/humans/registry.json``, the registry policy and the actuator read
(``PILOTHOUSE_POLICY_HUMAN_KEYS``, ``PILOTHOUSE_ACTUATOR_HUMAN_KEYS``). The console principal never gets a private key.

In a real deployment the people generate their own keys and an admin enrols the public keys in the registry file
(several per person for rotation); nothing here is needed there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus import attestation

#: The demo's console accounts and their roles (the same names ``pilothouse demo`` creates accounts for).
DEMO_HUMANS: dict[str, list[str]] = {
    "responder-1": ["responder"], "responder-2": ["responder"], "approver-1": ["approver"],
    "approver-2": ["approver"], "admin-1": ["admin", "approver", "responder"],
}
REGISTRY_NAME = "registry.json"


def humans_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "humans"


def key_path(data_dir: Path, user: str) -> Path:
    """Where a demo person's private key lives."""
    return humans_dir(data_dir) / f"{user}.key"


def registry_path(data_dir: Path) -> Path:
    return humans_dir(data_dir) / REGISTRY_NAME


def ensure_human_keys(data_dir: Path, humans: dict[str, list[str]] | None = None) -> Path:
    """Create missing key files, then (re)write the registry with every demo person's public key; returns its path.

    Idempotent: existing keys are kept; people enrolled in the registry by hand (not demo accounts) are kept too.
    """
    humans = DEMO_HUMANS if humans is None else humans
    directory = humans_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    registry_file = registry_path(data_dir)
    doc: dict = {"humans": {}}
    if registry_file.exists():
        doc = json.loads(registry_file.read_text())
    for user, roles in humans.items():
        path = key_path(data_dir, user)
        if not path.exists():
            attestation.write_human_key(path, Ed25519PrivateKey.generate())
        public = attestation.load_human_key(path).public_key()
        doc["humans"][user] = {"roles": list(roles), "keys": [{"key_id": attestation.key_id(public),
                                                               "public_key": attestation.public_key_b64(public)}]}
    attestation.HumanKeyRegistry.from_document(doc, source=str(registry_file))  # never write an unreadable one
    tmp = registry_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, registry_file)  # readers never see a half-written registry
    return registry_file
