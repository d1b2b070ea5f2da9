"""``pilothouse policy ...``: run the service, replay past decisions, evaluate one input, document the schemas,
make a signing key. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import base64
import sys

USAGE = """usage: pilothouse policy COMMAND [ARGS...]

commands:
  run      run the policy service (PILOTHOUSE_POLICY_*, PILOTHOUSE_KAFKA_*)
  replay   re-evaluate past decisions against the policy OPA serves now: replay [--since T] [--source ...]
  decide   evaluate one input document: decide proposal|approvals --input FILE [--opa-url URL]
  schema   print the input/decision JSON schemas, or --readme policies/README.md [--check]
  keygen   print a new Ed25519 signing key (PILOTHOUSE_POLICY_SIGNING_KEY) and its public key for the actuator"""


def keygen(argv: list[str]) -> int:
    """Print a fresh signing key: the private half for the policy service, the public half for the actuator."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    from pilothouse.bus.authorization import key_id

    if argv:
        print("usage: pilothouse policy keygen", file=sys.stderr)
        return 2
    key = Ed25519PrivateKey.generate()
    private = base64.b64encode(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())).decode()
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    print(f"PILOTHOUSE_POLICY_SIGNING_KEY={private}")
    print(f'PILOTHOUSE_ACTUATOR_TRUSTED_KEYS={{"{key_id(key.public_key())}": "{public}"}}')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from pilothouse.policy.__main__ import main as run

        return run(rest)
    if command == "replay":
        from pilothouse.policy.replay import main as replay

        return replay(rest)
    if command == "keygen":
        return keygen(rest)
    if command in ("decide", "schema"):
        from pilothouse.policy.adapters.opa import main as opa_main

        return opa_main(argv)
    print(f"pilothouse policy: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
