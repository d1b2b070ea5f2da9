"""``pilothouse approve|reject|validate``: record a decision through the approval console's HTTP API.

The CLI logs in with the person's own console account (never a service credential), gets a session and its CSRF
token, then posts the decision; the console attributes it to that account and refuses what policy would refuse.

    pilothouse approve  ACTION_ID [--hash SHA256] [--comment TEXT] [--yes]
    pilothouse reject   ACTION_ID [--hash SHA256] --comment TEXT
    pilothouse validate HYPOTHESIS_ID [--reject] [--comment TEXT]

Connection: ``--url`` (or PILOTHOUSE_CONSOLE_URL, default http://127.0.0.1:8420), ``--user`` (or
PILOTHOUSE_CONSOLE_USER); the password comes from PILOTHOUSE_CONSOLE_PASSWORD or is prompted for (no echo).
Signing: ``--key FILE`` (or PILOTHOUSE_HUMAN_KEY) is your own Ed25519 key (PKCS#8 PEM; the local stack's demo people
have theirs in .stack/humans/<id>.key). The console answers an unsigned decision with the exact statement to sign; the
CLI checks that the statement says what you asked for, signs it locally and sends the signature: the console cannot
sign for you, and policy counts nothing unsigned.
Without ``--hash`` the CLI shows the action it fetched and binds the decision to that action's hash; on a terminal it
asks before approving unless ``--yes``. Exit codes: 0 recorded, 1 refused (the reason is printed), 2 usage,
3 console unreachable or failing.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8420"


class _Refused(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _parser(verb: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pilothouse {verb}", description=__doc__.split("\n\n")[0])
    p.add_argument("target_id", metavar="HYPOTHESIS_ID" if verb == "validate" else "ACTION_ID")
    p.add_argument("--url", default=os.environ.get("PILOTHOUSE_CONSOLE_URL", DEFAULT_URL))
    p.add_argument("--user", default=os.environ.get("PILOTHOUSE_CONSOLE_USER"))
    p.add_argument("--comment", default="")
    p.add_argument("--key", default=os.environ.get("PILOTHOUSE_HUMAN_KEY"),
                   help="your Ed25519 private key file (PKCS#8 PEM) that signs the decision")
    p.add_argument("--json", action="store_true", help="print the console's answer as JSON")
    if verb == "validate":
        p.add_argument("--reject", action="store_true", help="reject the hypothesis instead of validating it")
    else:
        p.add_argument("--hash", dest="action_hash", help="the action hash you checked (else: the current one)")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation on a terminal")
    return p


def _answer(r: httpx.Response) -> dict[str, Any]:
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text[:500]}
    if r.status_code >= 500:
        raise _Refused(f"console error {r.status_code}: {data.get('error', '')}", 3)
    if r.status_code >= 400:
        raise _Refused(f"refused ({r.status_code} {data.get('code', '')}): {data.get('error', '')}", 1)
    return data


def _post_signed(client: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str], key_file: str | None,
                 expect: dict[str, Any]) -> dict[str, Any]:
    """Post a decision; when the console asks for a signature, sign its statement (after checking it says
    ``expect``) with the person's key and post again."""
    from pilothouse.bus.attestation import AttestationInvalid, answer_statement, load_human_key
    from pilothouse.bus.errors import ConfigurationError

    r = client.post(path, json=body, headers=headers)
    if r.status_code != 428:
        return _answer(r)
    if not key_file:
        raise _Refused("this decision must be signed with your own key: pass --key FILE or set PILOTHOUSE_HUMAN_KEY",
                       2)
    try:
        signed = answer_statement(load_human_key(key_file), r.json().get("statement") or {}, expect)
    except (ConfigurationError, AttestationInvalid) as e:
        raise _Refused(f"not signed: {e}", 1) from e
    return _answer(client.post(path, json={**body, **signed}, headers=headers))


def _login(client: httpx.Client, user: str | None) -> str:
    if not user:
        raise _Refused("who are you? pass --user or set PILOTHOUSE_CONSOLE_USER", 2)
    password = os.environ.get("PILOTHOUSE_CONSOLE_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise _Refused("no password: set PILOTHOUSE_CONSOLE_PASSWORD or run on a terminal", 2)
        password = getpass.getpass(f"console password for {user}: ")
    return _answer(client.post("/api/session", json={"username": user, "password": password}))["csrf_token"]


def _describe(action: dict[str, Any]) -> str:
    p = action.get("pending") or action.get("proposal") or {}
    lines = [f"action   {action['action_id']}: {p.get('action_type')} on {p.get('target_kind')} {p.get('target')}",
             f"params   {p.get('params_json')}", f"hash     {p.get('action_hash')}", f"status   {action.get('status')}"]
    if p.get("approvers_needed") is not None:
        lines.append(f"approvals {len(p.get('approved_by', []))} of {p['approvers_needed']} "
                     f"(roles {', '.join(p.get('approver_roles', []))}); expires {p.get('expires_at')}")
    if action.get("shadow"):
        lines.append(f"shadow   {action['shadow']['outcome']}: {action['shadow'].get('summary', '')}")
    return "\n".join(lines)


def _run(verb: str, argv: list[str], client: httpx.Client | None) -> int:
    args = _parser(verb).parse_args(argv)
    own = client is None
    client = client or httpx.Client(base_url=args.url, timeout=30.0)
    try:
        csrf = _login(client, args.user)
        headers = {"X-CSRF-Token": csrf}
        if verb == "validate":
            body = {"verdict": "rejected" if args.reject else "validated", "comment": args.comment}
            data = _post_signed(client, f"/api/hypotheses/{args.target_id}/decision", body, headers, args.key,
                                {"hypothesis_id": args.target_id, "verdict": body["verdict"]})
        else:
            action_hash = args.action_hash
            if not action_hash:
                action = _answer(client.get(f"/api/actions/{args.target_id}"))
                print(_describe(action), file=sys.stderr)
                action_hash = (action.get("pending") or {}).get("action_hash")
                if not action_hash:
                    raise _Refused("refused: this action is not waiting for approval", 1)
                if verb == "approve" and not args.yes and sys.stdin.isatty():
                    if input("approve exactly this action? [y/N] ").strip().lower() not in ("y", "yes"):
                        print("not approved", file=sys.stderr)
                        return 1
            body = {"decision": verb, "action_hash": action_hash, "comment": args.comment}
            data = _post_signed(client, f"/api/actions/{args.target_id}/decision", body, headers, args.key,
                                {"action_id": args.target_id, "action_hash": action_hash, "decision": verb})
        print(json.dumps(data, indent=2) if args.json else data.get("message", "recorded"))
        return 0
    except _Refused as e:
        print(f"pilothouse {verb}: {e}", file=sys.stderr)
        return e.code
    except httpx.HTTPError as e:
        print(f"pilothouse {verb}: cannot reach the console at {args.url}: {e}", file=sys.stderr)
        return 3
    finally:
        if own:
            client.close()


def approve(argv: list[str], client: httpx.Client | None = None) -> int:
    """``pilothouse approve ACTION_ID ...``"""
    return _run("approve", argv, client)


def reject(argv: list[str], client: httpx.Client | None = None) -> int:
    """``pilothouse reject ACTION_ID ...``"""
    return _run("reject", argv, client)


def validate(argv: list[str], client: httpx.Client | None = None) -> int:
    """``pilothouse validate HYPOTHESIS_ID ...``"""
    return _run("validate", argv, client)


def main(argv: list[str] | None = None, client: httpx.Client | None = None) -> int:
    """``main(["approve"|"reject"|"validate", ...])``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("approve", "reject", "validate"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return _run(argv[0], argv[1:], client)
