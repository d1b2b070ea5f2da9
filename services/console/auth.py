"""Who is logged in: local accounts (argon2id hashes, roles from a file) and server-side sessions in signed cookies.

The identity layer is a port (:class:`IdentityProvider`): :class:`LocalAccounts` reads a YAML/TOML users file today;
an OIDC provider can replace it later without touching the web layer, which only ever sees an :class:`Account`.
Every decision is attributed to ``Account.id``, the normalised stable id (``ONCALL-7`` == ``oncall-7``), and that id
comes only from the session, never from the request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pilothouse.bus.errors import ConfigurationError
from pilothouse.bus.identity import IdentityInvalid, normalise_identity

ROLES = ("responder", "approver", "admin")
# Principals policy never accepts as humans (policies/pilothouse/config/data.json): refused at load time too.
SERVICE_PRINCIPALS = frozenset({"sensing", "reasoning", "policy", "actuator", "ledger", "console", "model"})
NON_HUMAN_PREFIXES = ("svc:", "service:", "model:", "system:", "spiffe://")
MAX_PASSWORD_CHARS = 1024

_hasher = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 low-memory defaults


def hash_password(password: str) -> str:
    """An argon2id hash (PHC string) for the users file."""
    if not password or len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password must be 1..{MAX_PASSWORD_CHARS} characters")
    return _hasher.hash(password)


class Account(BaseModel):
    """A logged-in human: stable id (normalised), display name, roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    display: str = ""
    roles: tuple[str, ...] = ()

    def has_any_role(self, wanted: list[str] | tuple[str, ...]) -> bool:
        """True when one of the account's roles is in ``wanted`` (compared lower-case, as policy does)."""
        mine = {r.lower() for r in self.roles}
        return any(w.strip().lower() in mine for w in wanted)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class _UserEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    display: str = Field(default="", max_length=200)
    roles: tuple[str, ...] = Field(min_length=1)
    password_hash: str = Field(min_length=20)

    @field_validator("id")
    @classmethod
    def _stable(cls, value: str) -> str:
        try:
            stable = normalise_identity(value)
        except IdentityInvalid as e:
            raise ValueError(str(e)) from None
        if stable in SERVICE_PRINCIPALS or stable.startswith(NON_HUMAN_PREFIXES):
            raise ValueError(f"{value!r} is a service/model principal name; console accounts are humans")
        return stable

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(sorted({r.strip().lower() for r in value}))
        bad = [r for r in out if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles {bad}; roles are {', '.join(ROLES)}")
        return out

    @field_validator("password_hash")
    @classmethod
    def _argon2id(cls, value: str) -> str:
        if not value.startswith("$argon2id$"):
            raise ValueError("password_hash must be an argon2id PHC string (make one: pilothouse console hash-password)")
        return value


class IdentityProvider(Protocol):
    """The port the web layer logs people in through."""

    def authenticate(self, username: str, password: str) -> Account | None:
        """The account if the credentials are right, else None (never says which part was wrong)."""
        ...


class LocalAccounts:
    """Accounts from a YAML or TOML file: ``users: [{id, display, roles: [...], password_hash}]``."""

    def __init__(self, entries: list[_UserEntry]):
        self._users: dict[str, _UserEntry] = {}
        for e in entries:
            if e.id in self._users:
                raise ConfigurationError(f"users file: account {e.id!r} is listed twice (ids compare normalised)")
            self._users[e.id] = e
        # Verifying against a dummy hash when the user is unknown keeps the timing of both failures alike.
        self._dummy = _hasher.hash(secrets.token_hex(16))

    @classmethod
    def from_file(cls, path: Path) -> LocalAccounts:
        """Load and validate the users file; ConfigurationError names the problem."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigurationError(f"users file {path}: {e.strerror}") from e
        try:
            doc = tomllib.loads(text) if str(path).endswith(".toml") else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ConfigurationError(f"users file {path}: not valid {'TOML' if str(path).endswith('.toml') else 'YAML'}: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("users"), list):
            raise ConfigurationError(f"users file {path}: expected a top-level 'users' list")
        entries = []
        for i, raw in enumerate(doc["users"]):
            try:
                entries.append(_UserEntry.model_validate(raw))
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "entry"
                raise ConfigurationError(f"users file {path}: users[{i}].{where}: {first['msg']}") from None
        return cls(entries)

    def authenticate(self, username: str, password: str) -> Account | None:
        if not isinstance(username, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return None
        try:
            uid = normalise_identity(username)
        except IdentityInvalid:
            uid = ""
        entry = self._users.get(uid)
        try:
            _hasher.verify(entry.password_hash if entry else self._dummy, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if entry is None:
            return None
        return Account(id=entry.id, display=entry.display or entry.id, roles=entry.roles)

    def __len__(self) -> int:
        return len(self._users)


@dataclass
class Session:
    """Server-side session state; the cookie carries only its signed id."""

    sid: str
    csrf_token: str
    expires_at: float
    account: Account | None = None  # None: anonymous (the login form's CSRF token lives here)
    flash: list[str] = field(default_factory=list)
    statements: dict = field(default_factory=dict)  # statement id -> the statement this person was asked to sign


class SessionStore:
    """In-memory sessions with server-side expiry. Cookie value: ``<sid>.<hmac-sha256(secret, sid)>``."""

    def __init__(self, secret: bytes, ttl_s: int, *, clock=time.time, max_sessions: int = 10_000):
        if len(secret) < 32:
            raise ConfigurationError("session secret must be at least 32 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _sign(self, sid: str) -> str:
        return hmac.new(self._secret, sid.encode(), hashlib.sha256).hexdigest()

    def cookie_value(self, session: Session) -> str:
        return f"{session.sid}.{self._sign(session.sid)}"

    def create(self, account: Account | None = None) -> Session:
        """A new session (fresh id and CSRF token: call again at login so an old id is never promoted)."""
        now = self._clock()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl_s, account)
        with self._lock:
            if len(self._sessions) >= self._max:
                self._purge(now)
            if len(self._sessions) >= self._max:  # still full: drop the oldest-expiring one
                oldest = min(self._sessions.values(), key=lambda x: x.expires_at)
                del self._sessions[oldest.sid]
            self._sessions[s.sid] = s
        return s

    def get(self, cookie: str | None) -> Session | None:
        """The live session for a cookie value, or None (bad signature, unknown or expired id)."""
        if not cookie or "." not in cookie or len(cookie) > 200:
            return None
        sid, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sign(sid)):
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if s.expires_at <= self._clock():
                del self._sessions[sid]
                return None
            return s

    def destroy(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.sid, None)

    def _purge(self, now: float) -> None:
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]


def csrf_ok(session: Session | None, token: str | None) -> bool:
    """Constant-time comparison of the request's CSRF token with the session's."""
    if session is None or not token or not isinstance(token, str):
        return False
    return hmac.compare_digest(session.csrf_token.encode(), token.encode())
