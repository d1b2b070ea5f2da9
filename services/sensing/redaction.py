"""Redaction: the one choke point every record passes before it leaves sensing. Fail-closed.

A `Redactor` is built once (rules compiled, pseudonym key bound) and is then pure and thread-safe: no I/O, no shared
mutable state at call time. `redact_text` / `redact_record` return the redacted value and a `RedactionManifest`
(kinds and counts found, rule-set version — never the values). Anything the redactor cannot scan raises
`RedactionRefused(reason)`; the caller drops the record and reports the reason.

Pipeline per string
1. Normalise: strip ANSI escape sequences and control characters (tab/LF/CR stay), then invisible characters
   (format characters such as zero-width and bidi controls, the tag block U+E0000–E007F, variation selectors, Hangul
   fillers), NFKC, strip again. ASCII text skips the Unicode steps (it is already NFKC), which keeps log lines fast.
2. Gate: one RE2 set (`re2.Set`) holds the literal keywords of every secret rule plus a cheap trigger per PII
   family; one match over the text says which rules and detectors can possibly fire. Most log lines stop here.
3. Precise recognisers, only for what the gate let through:
   - secrets: the vendored gitleaks rule set and our log-shaped rules (`rules/*.toml`, gitleaks semantics: secret
     group, entropy, generic-rule digit check, rule and global allowlists/stopwords), detect-secrets' keyword
     deny-list for `password = ...` style assignments, and detect-secrets' entropy measures (with its
     UUID/sequence/template filters) restricted to quoted or assigned values;
   - personal data: e-mail, IPv4 (also embedded in host names like ip-10-0-0-1), IPv6 (validated by `ipaddress`),
     card numbers (Luhn), IBAN (ISO 13616 length + mod 97), US SSN, UK NINO, phone numbers (strong shapes
     anywhere, weak shapes only next to a phone word), user names in common log shapes, person names after a
     name label or a title.
4. Overlapping spans are merged (the union is replaced, so nothing a recogniser found survives) and replaced:
   IPs, e-mails and user names by keyed pseudonyms `<IP:3fa81c2e9d10>` (HMAC-SHA256, stable per deployment key),
   everything else by typed placeholders numbered per record (`<AWS_ACCESS_KEY#1>`; the same value gets the same
   number within one record).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import itertools
import math
import re
import sys
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2
from detect_secrets.filters import heuristic as ds_heuristic
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.keyword import DENYLIST as DS_KEYWORD_DENYLIST
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pilothouse.bus.errors import PermanentError

__all__ = [
    "REDACTOR_CODE_VERSION",
    "RULES_DIR",
    "RedactionFinding",
    "RedactionManifest",
    "RedactionRefused",
    "RedactionSettings",
    "Redactor",
    "main",
    "normalise",
]

# Bump when recogniser code changes behaviour; it is folded into the rule-set version.
REDACTOR_CODE_VERSION = "redaction-1"
RULES_DIR = Path(__file__).with_name("rules")
CLEAN_CACHE_MAX_CHARS = 512  # longer strings (log lines, descriptions with ids) rarely repeat exactly
RULE_FILES = ("gitleaks.toml", "pilothouse-secrets.toml")


class RedactionRefused(PermanentError):
    """The text or record could not be scanned; it must not be forwarded. `reason` never contains input values."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RedactionSettings(BaseSettings):
    """Settings for the redactor (environment prefix PILOTHOUSE_REDACTION_)."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_REDACTION_", frozen=True)

    pseudonym_key: SecretStr = Field(description="HMAC key for IP/e-mail/user pseudonyms; at least 16 bytes")
    # 12 hex = 48 bits: with 10^5 distinct hosts the chance of two sharing a pseudonym is ~2e-5 (8 hex: ~69%).
    pseudonym_hex_chars: int = Field(default=12, ge=8, le=64)
    max_text_chars: int = Field(default=1_000_000, ge=1)
    max_record_chars: int = Field(default=4_000_000, ge=1)
    max_record_nodes: int = Field(default=100_000, ge=1)
    max_depth: int = Field(default=64, ge=1)
    clean_cache: int = Field(default=65_536, ge=0, description="recent strings that needed no redaction, remembered "
                             "so they are not scanned again (0: off)")


@dataclass(frozen=True)
class RedactionFinding:
    kind: str
    count: int


@dataclass(frozen=True)
class RedactionManifest:
    """What was redacted (kinds and counts, never values). Shape of the Avro RedactionManifest record."""

    ruleset_version: str
    scanned: bool
    findings: tuple[RedactionFinding, ...] = ()
    redacted_fields: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ruleset_version": self.ruleset_version,
            "scanned": self.scanned,
            "findings": [{"kind": f.kind, "count": f.count} for f in self.findings],
            "redacted_fields": list(self.redacted_fields),
        }

    def count(self, kind: str) -> int:
        return sum(f.count for f in self.findings if f.kind == kind)


# --------------------------------------------------------------------------------------------------------------------
# Normalisation


@functools.cache
def _invisible_table() -> dict[int, None]:
    """Code points deleted before scanning: all format characters (Cf: zero-width, bidi, tags, BOM, soft hyphen...),
    variation selectors and other characters that render as nothing."""
    table: dict[int, None] = {}
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        if unicodedata.category(chr(cp)) == "Cf":
            table[cp] = None
    extra = [(0xFE00, 0xFE0F), (0xE0100, 0xE01EF), (0xE0000, 0xE007F), (0x180B, 0x180F), (0x034F, 0x034F),
             (0x115F, 0x1160), (0x17B4, 0x17B5), (0x3164, 0x3164), (0xFFA0, 0xFFA0), (0x2800, 0x2800)]
    for lo, hi in extra:
        for cp in range(lo, hi + 1):
            table[cp] = None
    return table


# ANSI escape sequences and C0/C1 control characters (tab, LF and CR stay): they render as nothing and can split a key
_CONTROLS = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalise(text: str) -> tuple[str, int]:
    """NFKC with invisible characters removed. Returns (text, number of invisible characters removed)."""
    removed = 0
    if not text.isprintable() and _CONTROLS.search(text):  # isprintable: a fast C check for the common case
        cleaned = _CONTROLS.sub("", text)
        removed = len(text) - len(cleaned)
        text = cleaned
    if text.isascii():
        return text, removed
    table = _invisible_table()
    stripped = text.translate(table)
    removed += len(text) - len(stripped)
    out = unicodedata.normalize("NFKC", stripped)
    again = out.translate(table)
    removed += len(out) - len(again)
    return again, removed


# --------------------------------------------------------------------------------------------------------------------
# Secret rules (gitleaks format)


def _shannon(data: str) -> float:
    if not data:
        return 0.0
    n = len(data)
    return -sum((c / n) * math.log2(c / n) for c in Counter(data).values())


@dataclass(frozen=True)
class _Allowlist:
    condition_and: bool
    target: str  # "secret" | "match" | "line"
    regexes: tuple[Any, ...]
    stopwords: tuple[str, ...]
    has_paths: bool

    def allows(self, secret: str, match: str, line: str) -> bool:
        subject = {"secret": secret, "match": match, "line": line}[self.target]
        checks: list[bool] = []
        if self.regexes:
            checks.append(any(r.search(subject) for r in self.regexes))
        if self.stopwords:
            low = secret.lower()
            checks.append(any(w in low for w in self.stopwords))
        if self.has_paths:
            checks.append(False)  # records have no file path: a path condition never holds
        if not checks:
            return False
        return all(checks) if self.condition_and else any(checks)


def _compile_allowlist(spec: Mapping[str, Any]) -> _Allowlist:
    return _Allowlist(
        condition_and=str(spec.get("condition", "OR")).upper() == "AND",
        target=str(spec.get("regexTarget", "secret")),
        regexes=tuple(re2.compile(r) for r in spec.get("regexes", [])),
        stopwords=tuple(str(w).lower() for w in spec.get("stopwords", [])),
        has_paths=bool(spec.get("paths")),
    )


@dataclass(frozen=True)
class _SecretRule:
    rule_id: str
    kind: str
    regex: Any
    secret_group: int
    entropy: float
    allowlists: tuple[_Allowlist, ...]
    validator: Callable[[str], bool] | None
    groups: int


def _valid_basic_auth(secret: str) -> bool:
    try:
        raw = base64.b64decode(secret + "=" * (-len(secret) % 4), validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    return ":" in decoded and decoded.isprintable()


def _mixed_credential(secret: str) -> bool:
    """A -p value that is a credential, not a port or a path: letters and digits (or symbols), not only digits."""
    if secret.isdigit() or "/" in secret or "=" in secret or secret.startswith(("$", "<", "{")):
        return False
    has_alpha = any(c.isalpha() for c in secret)
    has_other = any(c.isdigit() or not c.isalnum() for c in secret)
    return has_alpha and has_other


_VALIDATORS: dict[str, Callable[[str], bool]] = {
    "basic-auth": _valid_basic_auth,
    "mixed-credential": _mixed_credential,
}


def _load_rule_files(rules_dir: Path) -> tuple[list[_SecretRule], list[list[str]], list[_Allowlist], bytes]:
    """(rules, lower-case keywords per rule, global allowlists, digest input of the rule files)."""
    rules: list[_SecretRule] = []
    keywords: list[list[str]] = []
    global_allow: list[_Allowlist] = []
    digest_input = b""
    kinds: dict[str, str] = {}
    docs = []
    for name in RULE_FILES:
        raw = (rules_dir / name).read_bytes()
        digest_input += name.encode() + b"\0" + hashlib.sha256(raw).digest()
        docs.append(tomllib.loads(raw.decode("utf-8")))
    for doc in docs:
        kinds.update(doc.get("kinds", {}))
    for doc in docs:
        if "allowlist" in doc:
            global_allow.append(_compile_allowlist(doc["allowlist"]))
        for spec in doc.get("rules", []):
            if "regex" not in spec:
                continue  # path-only rules (e.g. pkcs12-file) have nothing to match in text
            rule_id = spec["id"]
            if not spec.get("keywords"):
                raise ValueError(f"rule {rule_id} has no keywords; every rule must be gated")
            validator_name = spec.get("validator")
            regex = re2.compile(spec["regex"])
            rules.append(_SecretRule(
                rule_id=rule_id,
                kind=spec.get("kind") or kinds.get(rule_id) or rule_id.upper().replace("-", "_"),
                regex=regex,
                secret_group=int(spec.get("secretGroup", 0)),
                entropy=float(spec.get("entropy", 0.0)),
                allowlists=tuple(_compile_allowlist(a) for a in spec.get("allowlists", [])),
                validator=_VALIDATORS[validator_name] if validator_name else None,
                groups=regex.groups,
            ))
            keywords.append([str(k).lower() for k in spec["keywords"]])
    return rules, keywords, global_allow, digest_input


# --------------------------------------------------------------------------------------------------------------------
# Span bookkeeping

_GENERIC_KINDS = {"GENERIC_SECRET": 0, "HIGH_ENTROPY_SECRET": 0, "SECRET": 0, "PASSWORD": 1, "SESSION_TOKEN": 1}


def _specificity(kind: str) -> int:
    """When two recognisers cover the same characters, the placeholder names the most specific one."""
    return _GENERIC_KINDS.get(kind, 2)


_SECRET, _PII, _PSEUDO = 3, 2, 1  # merge priority: a span covering a secret is named as the secret


@dataclass
class _Span:
    start: int
    end: int
    kind: str
    tier: int
    value: str  # canonical value: pseudonym input / numbering key (never leaves the process)


@dataclass
class _Scope:
    """Per-call state: placeholder numbering and counts for one record."""

    numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    next_number: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    chars: int = 0
    nodes: int = 0
    fields: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Personal-data recognisers (python `re`; only run on texts the gate let through)

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}(?:@|%40)"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|[01]\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.~])({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET})(?!\.\d|\w)")
_IPV4_DASHED = re.compile(rf"(?:(?<=[A-Za-z]-)|(?<![\w.-]))({_OCTET})-({_OCTET})-({_OCTET})-({_OCTET})"
                          r"(?![\w-]?\d|-[0-9A-Fa-f])")
_DASHED_QUAD = re.compile(rf"{_OCTET}-{_OCTET}-{_OCTET}-{_OCTET}")
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv(?:ersion)?|\bver|\brelease|\bbuild)[\s:=]*$")
_IPV6_RUN = re.compile(r"(?<![\w:.])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,}(?:\.\d{1,3}){0,3})(?![\w:])")
_NUM_CAND = re.compile(r"(?<![\w.+/:#@$%-])(\+ ?)?(\(?\d[\d().\- ]*\d\)?)((?: ?(?:x|ext\.?) ?)\d{1,5})?"
                       r"(?![\w@/]|[.:,-]\d|[:-][0-9A-Fa-f]{2}(?![A-Za-z]))")
_IBAN_CAND = re.compile(r"(?i)(?<![\w-])([a-z]{2}\d{2}(?: ?[a-z0-9]){11,30})(?![\w-])")
_NINO = re.compile(r"(?<![\w-])((?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D])(?![\w-])")
_PHONE_WORDS = re.compile(r"(?i)\b(?:phones?|ph|tel|telephone|mobiles?|mob|cell|cellphone|fax|desk|office|call|calling|"
                          r"called|dial|dialed|sms|text|whatsapp|contact|reach|ring)\b")
# government and bank identifiers that have no checksum we can test: only right after their label
_ID_LABEL = re.compile(
    r"(?i)\b(?:(?P<nat>passport|driver'?s?[ -]licen[cs]e|licen[cs]e (?=no\b|number\b|#)|itin|"
    r"taxpayer id(?:entification)?|"
    r"tax id|national id(?:entity)?|identity card|id card|social security|ssn|nric|aadhaar|pan|tin)"
    r"|(?P<acct>bank account|account|routing|aba|sort code))(?![A-Za-z])"
    r"(?:[ \t]*(?:no\.?|num(?:ber)?|#|is|was|:|=)){0,3}[ \t]*[:#=]?[ \t]*"
    r"(?P<value>(?=[A-Za-z0-9*-]{0,19}\d)[A-Za-z0-9][A-Za-z0-9*-]{4,19})(?![\w-])"
)
_ID_GATE_WORDS = (r"passport|licen[cs]e|itin|taxpayer|tax id|national id|identity card|id card|social security|"
                  r"ssn|nric|aadhaar|\bpan\b|\btin\b|account|routing|\baba\b|sort code")
_SSN_WORDS = re.compile(r"(?i)\b(?:ssn|social security|social sec)\b")
_DATE_START = re.compile(r"^(\d{4})[-./ ](\d{1,2})[-./ ](\d{1,2})|^(\d{1,2})[-./ ](\d{1,2})[-./ ](\d{2}|\d{4})(?!\d)")
_NANP = re.compile(r"^(?:1[ .-]?)?(?:\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([ .-])\d{3}\1\d{4})$")

_USER_VALUE = r"([A-Za-z0-9_][A-Za-z0-9._$@\\-]{0,63})"
_USER_PATTERNS = [
    re.compile(r"(?i)(?<![\w-])(?:user(?:name)?|login|logname|acct|account|uname)[\"']?(?:=|: ?)[\"']?" + _USER_VALUE),
    re.compile(r"(?i)\b(?:invalid|illegal|unknown) user \"?" + _USER_VALUE),
    re.compile(r"(?i)\b(?:accepted|failed|postponed) \S+ for (?:invalid user |illegal user )?" + _USER_VALUE
               + r" from\b"),
    re.compile(r"(?i)\b(?:for|by|from|to|authenticating|as) user \"?" + _USER_VALUE),
    re.compile(r"(?i)\bsudo:\s+" + _USER_VALUE + r"\s*:"),
    re.compile(r"(?:/home|/Users|\\Users)[/\\]([A-Za-z0-9_][A-Za-z0-9._-]{0,63})"),
]
_NOT_USERS = frozenset({"unknown", "invalid", "none", "null", "nil", "-", "by", "from", "for", "on", "at", "is", "was",
                        "not", "name", "id"})

_NAME_LABEL = re.compile(r"(?<![\w.])(?:Name|NAME|Full [Nn]ame|First [Nn]ame|Last [Nn]ame|Customer|Patient|Contact)"
                         r"\s*[:=]\s*"
                         r"([A-Z][^\W\d_A-Z]+(?:[ \t][A-Z][^\W\d_A-Z]*\.?){1,3})(?![\w-])")
_TITLE_NAME = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.? ([A-Z][^\W\d_]+(?: [A-Z][^\W\d_]+)?)")

# detect-secrets' keyword deny-list (password, secret, api_key, ...) as key=value / key: value / key "value".
_KEYWORD_ASSIGN = re.compile(
    r"(?i)(?<![\w])([\w.-]{0,64}(?:" + "|".join(DS_KEYWORD_DENYLIST) + r")[\w.-]{0,64})"
    r"[\"'\]]{0,2}[ \t]*(?::=|=>|==?|:)"
    r"[ \t]*(?:\"([^\"\r\n]{1,512})\"|'([^'\r\n]{1,512})'|`([^`\r\n]{1,512})`|"
    r"((?:!!?\w+[ \t]+)?[^\s\"'`,;&)}\]]{1,512}))"  # an optional YAML tag (!!binary) goes with the value
)
_KEYWORD_BLOCK = re.compile(
    r"(?im)^([ \t]*)[\w.-]*(?:" + "|".join(DS_KEYWORD_DENYLIST) + r")[\w.-]*[\"']?[ \t]*[=:][ \t]*\r?\n"
    r"((?:\1[ \t]+\S[^\r\n]*(?:\r?\n|$))+)"
)
_BLOCK_LINE = re.compile(r"(?m)^[ \t]+(?:[\w.-]+[ \t]*[=:][ \t]*)?(?:!!?\w+[ \t]+)?[\"']?([^\r\n\"']+?)[\"']?[ \t]*$")
_REFERENCE_KEY_SUFFIXES = ("name", "names", "ref", "refs", "keyref", "path", "paths", "file", "files", "dir", "arn",
                           "type", "types", "length", "size", "version", "id", "ids", "count", "policy", "hint",
                           "provider", "store", "manager", "mount", "env", "enabled", "required", "expiry", "expires",
                           "ttl", "url", "uri", "endpoint", "prompt", "field", "label", "class")
_PATH_VALUE = re.compile(r"^[A-Za-z][A-Za-z._-]*(?:/[A-Za-z][A-Za-z._-]*)+/?$")
_PLACEHOLDER_VALUE = re.compile(
    r"(?i)^(?:null|none|nil|true|false|undefined|empty|n/a|\*+|x{3,}|\.+|-+|<[^>]*>|\[[^\]]*\]|\(\w*\)|"
    r"\$\{?[\w.:-]+\}?|"
    r"%\w+%|%\(\w+\)[sd]|%[sd]|\{\{.*\}\}|\{[\w.]*\}|redacted|\[redacted\]|masked|hidden|changeme|required|optional|"
    r"(?:os\.)?getenv\(.*|process\.env\..*|env\(.*|self\.\w+|this\.\w+|[\w.]*\(\).*)$"
)

# high-entropy strings: quoted values, or unquoted values assigned to a key
_QUOTED_TOKEN = re.compile(r"([\"'])([A-Za-z0-9+/=_.~-]{10,512})\1")
_CONFIG_LINE = re.compile(r"(?m)^[ \t]*[\w.-]+[ \t]*[:=][ \t]*([\"']?)([A-Za-z0-9+/=_~-]{10,512})\1[ \t]*"
                          r"(?:#[^\r\n]*)?\r?$")
_ASSIGNED_TOKEN = re.compile(r"(?<![\w.-])[A-Za-z_][\w.-]{0,40}\s*[=:]\s*([A-Za-z0-9+/_-]{20,512}={0,2})(?![\w+/=.-])")
_NON_DIGITS = re.compile(r"\D+")
_ID_KEY_BEFORE = re.compile(r"(?i)(?:\b|_)(?:id|ids|uuid|guid|fingerprint|hash|digest|checksum|sha\d*|md5|etag|"
                            r"request_?id|trace_?id|span_?id|commit|revision|rev)[\"']?\s*[:=]\s*[\"']?$")
_HEX_ONLY = re.compile(r"^[0-9a-fA-F]+$")
_TOKEN_RUNS = re.compile(r"[-_.~]")
_B64_ENTROPY = Base64HighEntropyString(limit=4.5)
_HEX_ENTROPY = HexHighEntropyString(limit=3.0)

# IBAN lengths per country (ISO 13616 registry)
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_prefix_ok(d: str) -> bool:
    # Visa 4, Mastercard 51-55 / 2221-2720, Amex 34/37, Diners 30/36/38/39, Discover/UnionPay/Maestro 6, JCB 35,
    # Maestro 50/56-59, JCB legacy 1800 / 2131.
    if d[0] in "3456":
        return True
    return d.startswith(("1800", "2131")) or (d[0] == "2" and 2221 <= int(d[:4]) <= 2720)


def _card_shape_ok(groups: list[str], seps: set[str]) -> bool:
    if len(groups) == 1:
        return True
    if len(seps) != 1 or not seps <= {" ", "-"}:
        return False
    lens = [len(g) for g in groups]
    if all(n == 4 for n in lens[:-1]) and 1 <= lens[-1] <= 4:
        return True
    return lens in ([4, 6, 5], [4, 6, 4], [4, 4, 4, 2])


def _ssn_ok(d: str) -> bool:
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000" and len(set(d)) > 1


def _is_date_like(cand: str) -> bool:
    m = _DATE_START.match(cand)
    if not m:
        return False
    if m.group(1):
        month, day = int(m.group(2)), int(m.group(3))
    else:
        a, b = int(m.group(4)), int(m.group(5))
        month, day = (a, b) if a <= 12 else (b, a)
    return 1 <= month <= 12 and 1 <= day <= 31


def _classify_number(text: str, start: int, end: int, plus: bool, ext: bool) -> str | None:
    cand = text[start:end]
    digits = _NON_DIGITS.sub("", cand)
    n = len(digits)
    if n < 7 or n > 19:
        return None
    seps = {ch for ch in cand if not ch.isdigit()}
    core = cand.replace("(", " ").replace(")", " ")
    groups = [g for g in re.split(r"[ .-]+", core) if g]
    if "  " in cand or ".." in cand or "--" in cand:
        return None
    if not plus and re.fullmatch(r"\d{3}([- ])\d{2}\1\d{4}", cand):
        return "US_SSN" if _ssn_ok(digits) else None  # the SSN shape; an unissued number is not a phone either
    if not plus and not ext and 12 <= n <= 19 and _card_prefix_ok(digits) and _card_shape_ok(groups, seps) \
            and _luhn_ok(digits):
        return "CREDIT_CARD"
    if n > 15:
        return None
    before = text[max(0, start - 32):start]
    after = text[end:end + 16]
    context = bool(_PHONE_WORDS.search(before) or _PHONE_WORDS.search(after))
    if not plus and n == 9 and len(groups) == 1 and _SSN_WORDS.search(before) and _ssn_ok(digits):
        return "US_SSN"
    if plus:
        return "PHONE" if n >= 8 else None
    bare = cand.strip("()")
    if _is_date_like(bare):
        return None
    if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", bare) or _DASHED_QUAD.fullmatch(bare):
        return None  # dotted or dashed quad: the IP recogniser decides
    if _NANP.match(cand) or (ext and len(groups) >= 2):
        return "PHONE"
    if re.match(r"00\d{0,2}[ .-]", cand) and len(groups) >= 2 and n >= 10:
        return "PHONE"
    plain = seps - {"(", ")"}
    lens = [len(g) for g in groups]
    if len(groups) == 1:
        # an unformatted number is a phone only right after a phone word ("Fax: 9498777106"), not "flags = 00000004"
        near = _PHONE_WORDS.search(text, max(0, start - 16), start)
        gap = text[near.end():start] if near else "="
        return "PHONE" if near and "=" not in gap and "," not in gap and 7 <= n <= 12 else None
    if any(x > 7 for x in lens) or sum(1 for x in lens if x > 4) > 1 or any(x < 2 for x in lens[1:]):
        return None
    if context:
        return "PHONE"
    if len(plain) > 1:
        return None
    dashed_or_dotted = plain <= {"-", "."} and all(2 <= x <= 4 for x in lens)
    if len(groups) >= 3 and 8 <= n <= 12 and (digits[0] == "0" or dashed_or_dotted):
        return "PHONE"
    if digits[0] == "0" and len(groups) >= 2 and 9 <= n <= 12:
        return "PHONE"
    return None


def _iban_ok(cand: str) -> tuple[str, int] | None:
    """(compact IBAN, length of the matched prefix of cand) if cand starts with a valid IBAN ending at a boundary."""
    expected = _IBAN_LENGTHS.get(cand[:2].upper())
    if expected is None:
        return None
    seen = 0
    end = 0
    for end, ch in enumerate(cand, 1):
        if ch != " ":
            seen += 1
            if seen == expected:
                break
    if seen != expected or (end < len(cand) and cand[end] != " "):
        return None
    compact = cand[:end].replace(" ", "").upper()
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return None
    return (compact, end) if number % 97 == 1 else None


# --------------------------------------------------------------------------------------------------------------------
# The redactor

# Family triggers in the gate (RE2 syntax). Each is a necessary condition for its recognisers.
_FAMILY_GATES: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-](?:@|%40)[A-Za-z0-9-]+\.[A-Za-z0-9]",
    "ipv4": r"\d\.\d{1,3}\.\d{1,3}\.\d",
    "ipv4_dashed": r"\d{1,3}-\d{1,3}-\d{1,3}-\d{1,3}",
    "ipv6": r"(?i)(?:[0-9a-f]{0,4}:){3,}[0-9a-f]{1,4}|[0-9a-f]::|::[0-9a-f]",
    "number": r"\d(?:[ ().-]{0,2}\d){6}",
    "iban": r"(?i)[a-z]{2}\d{2} ?[a-z0-9]{4}",
    "nino": r"[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]",
    "user": r"(?i)user|login|logname|acct|account|uname|accepted |failed |postponed |/home/|\\users\\|sudo:",
    "keyword_assign": r"(?i)(?:" + "|".join(DS_KEYWORD_DENYLIST) + r")[\w.-]*[\"'\]]{0,2}\s*(?:[:=]|\s[\"'])",
    "entropy": r"(?m)[\"'][A-Za-z0-9+/=_.~-]{10}|[=:]\s*[A-Za-z0-9+/_-]{20}|^[ \t]*[\w.-]+[ \t]*[:=][ \t]*\S{10}",
    "labelled_id": r"(?i)(?:" + _ID_GATE_WORDS + r")[^\n]{0,48}\d",
    "names": r"(?i)name\s*[:=]|customer\s*[:=]|patient\s*[:=]|contact\s*[:=]|\b(?:mr|mrs|ms|miss|mx|dr|prof)\.? [A-Z]",
}


class Redactor:
    """Compiled redaction rules bound to a pseudonym key. Build once; call from any thread."""

    def __init__(
        self,
        pseudonym_key: bytes,
        *,
        rules_dir: Path | None = None,
        pseudonym_hex_chars: int = 12,
        max_text_chars: int = 1_000_000,
        max_record_chars: int = 4_000_000,
        max_record_nodes: int = 100_000,
        max_depth: int = 64,
        prefilter: bool = True,
        clean_cache: int = 65_536,
    ) -> None:
        """`prefilter=False` runs every recogniser on every text (same output, slower): the benchmark's baseline and
        the tests' check that the gate never hides a finding.

        `clean_cache`: how many recently scanned strings that needed nothing (no invisible character, no finding)
        are remembered, so the same string is not scanned again (0: none). Alerts repeat most of their strings
        (label names, alert names, severities, namespaces, templated annotations). Only strings of at most
        ``CLEAN_CACHE_MAX_CHARS`` are kept; the cache holds nothing that redaction would have changed, and redacting
        is a pure function of the text for a given Redactor, so a hit gives what a scan gives."""
        if not isinstance(pseudonym_key, bytes | bytearray) or len(pseudonym_key) < 16:
            raise ValueError("pseudonym_key must be at least 16 bytes")
        if not 8 <= pseudonym_hex_chars <= 64:
            raise ValueError("pseudonym_hex_chars must be within 8..64")
        self._key = bytes(pseudonym_key)
        self._hex = pseudonym_hex_chars
        self._max_text = max_text_chars
        self._max_record_chars = max_record_chars
        self._max_nodes = max_record_nodes
        self._max_depth = max_depth
        rules_dir = rules_dir or RULES_DIR
        self._rules, keywords, self._global_allow, digest_input = _load_rule_files(rules_dir)
        # rule data + code: the constant names the release, the source digest catches any unreleased edit
        code = REDACTOR_CODE_VERSION.encode() + b"\0" + hashlib.sha256(Path(__file__).read_bytes()).digest()
        self.ruleset_version = "rs-" + hashlib.sha256(
            code + b"\0" + digest_input + b"\0" + str(self._hex).encode()
        ).hexdigest()[:16]

        # One RE2 set: every distinct keyword (case-insensitive literal) and every family trigger.
        self._gate = re2.Set.SearchSet()
        self._gate_actions: list[tuple[str, tuple[int, ...]]] = []
        by_keyword: dict[str, list[int]] = {}
        for index, kws in enumerate(keywords):
            for kw in kws:
                by_keyword.setdefault(kw, []).append(index)
        self._gate_keyword: dict[int, str] = {}
        for kw, indexes in sorted(by_keyword.items()):
            self._gate_keyword[self._gate.Add("(?i)" + re2.escape(kw))] = kw
            self._gate_actions.append(("rules", tuple(indexes)))
        for family, pattern in _FAMILY_GATES.items():
            self._gate.Add(pattern)
            self._gate_actions.append((family, ()))
        self._gate.Compile()
        self._prefilter = prefilter
        self._families = [i for i, (family, _) in enumerate(self._gate_actions) if family != "rules"]
        self._keywords = keywords
        _invisible_table()  # build the normalisation table now, not on the first non-ASCII record
        self._pseudonym = functools.lru_cache(maxsize=65536)(self._pseudonym_uncached)
        self._clean_max = max(0, clean_cache)
        self._clean: dict[str, None] = {}  # strings that redact to themselves with no finding (insertion order)

    @classmethod
    def from_settings(cls, settings: RedactionSettings, *, rules_dir: Path | None = None) -> Redactor:
        return cls(
            settings.pseudonym_key.get_secret_value().encode("utf-8"),
            rules_dir=rules_dir,
            pseudonym_hex_chars=settings.pseudonym_hex_chars,
            max_text_chars=settings.max_text_chars,
            max_record_chars=settings.max_record_chars,
            max_record_nodes=settings.max_record_nodes,
            max_depth=settings.max_depth,
            clean_cache=settings.clean_cache,
        )

    # ---- public API -------------------------------------------------------------------------------------------------

    def redact_text(self, text: str) -> tuple[str, RedactionManifest]:
        """Redact one string. Raises RedactionRefused if it cannot be scanned."""
        scope = _Scope()
        if isinstance(text, bytes | bytearray):
            text = self._decode(text)
        if not isinstance(text, str):
            raise RedactionRefused(f"cannot scan a value of type {type(text).__name__}")
        out = self._guarded(lambda: self._redact_string(text, scope))
        fields = ("$",) if out != text else ()
        return out, self._manifest(scope, fields)

    def redact_record(self, obj: Any) -> tuple[Any, RedactionManifest]:
        """Redact every string in a nested dict/list (keys too). Raises RedactionRefused if any part cannot be
        scanned: the record must then be dropped as a whole."""
        scope = _Scope()
        out = self._guarded(lambda: self._walk(obj, "$", 0, scope))
        return out, self._manifest(scope, tuple(scope.fields))

    def pseudonym(self, kind: str, value: str) -> str:
        """The pseudonym a value of this kind gets (kind: IP, EMAIL, USER), e.g. to look up a host."""
        return self._pseudonym(kind, self._canonical(kind, value))

    # ---- internals --------------------------------------------------------------------------------------------------

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RedactionRefused:
            raise
        except RecursionError:
            raise RedactionRefused("record nesting too deep to scan") from None
        except MemoryError:
            raise RedactionRefused("out of memory while scanning") from None
        except Exception as exc:  # fail closed; the message may hold input, so only the type is reported
            raise RedactionRefused(f"internal error while scanning ({type(exc).__name__})") from None

    def _manifest(self, scope: _Scope, fields: tuple[str, ...]) -> RedactionManifest:
        findings = tuple(RedactionFinding(kind, count) for kind, count in sorted(scope.counts.items()))
        return RedactionManifest(self.ruleset_version, True, findings, fields)

    @staticmethod
    def _decode(raw: bytes | bytearray) -> str:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise RedactionRefused("bytes are not valid UTF-8") from None

    def _walk(self, obj: Any, path: str, depth: int, scope: _Scope) -> Any:
        if depth > self._max_depth:
            raise RedactionRefused(f"record deeper than {self._max_depth} levels")
        scope.nodes += 1
        if scope.nodes > self._max_nodes:
            raise RedactionRefused(f"record has more than {self._max_nodes} values")
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, str | bytes | bytearray | int | float):
            if isinstance(obj, str):
                text = obj
            else:
                text = self._decode(obj) if isinstance(obj, bytes | bytearray) else repr(obj)
            out = self._redact_string(text, scope)
            if out != text:
                scope.fields.append(path)
                return out
            return obj if not isinstance(obj, bytes | bytearray) else text
        if isinstance(obj, Mapping):
            result: dict[str, Any] = {}
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise RedactionRefused(f"record key of type {type(key).__name__} at {path}")
                new_key = self._redact_string(key, scope)
                if new_key in result:
                    raise RedactionRefused(f"two keys under {path} redact to the same name")
                child = f"{path}.{new_key}"
                if new_key != key:
                    scope.fields.append(child)
                result[new_key] = self._walk(value, child, depth + 1, scope)
            return result
        if isinstance(obj, list | tuple):
            return [self._walk(v, f"{path}[{i}]", depth + 1, scope) for i, v in enumerate(obj)]
        raise RedactionRefused(f"cannot scan a value of type {type(obj).__name__} at {path}")

    def _redact_string(self, text: str, scope: _Scope) -> str:
        scope.chars += len(text)
        if len(text) > self._max_text:
            raise RedactionRefused(f"text longer than {self._max_text} characters")
        if scope.chars > self._max_record_chars:
            raise RedactionRefused(f"record holds more than {self._max_record_chars} characters")
        if text in self._clean:
            return text
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RedactionRefused("text holds unpaired surrogates (a decoding error upstream)") from None
        original = text
        text, removed = normalise(text)
        if removed:
            scope.counts["INVISIBLE_CHARACTERS"] += removed
        hits = self._gate.Match(text) if self._prefilter else self._exhaustive_hits(text)
        spans = self._find(text, hits) if hits else None
        if spans:
            return self._replace(text, spans, scope)
        if text == original and self._clean_max and len(text) <= CLEAN_CACHE_MAX_CHARS:
            self._remember_clean(text)
        return text

    def _remember_clean(self, text: str) -> None:
        clean = self._clean
        if len(clean) >= self._clean_max:  # drop the oldest eighth (dicts keep insertion order)
            try:
                for old in list(itertools.islice(clean, max(1, self._clean_max // 8))):
                    clean.pop(old, None)
            except RuntimeError:  # another thread changed it meanwhile: start afresh (only a cache)
                clean.clear()
        clean[text] = None

    def _exhaustive_hits(self, text: str) -> list[int]:
        """Without the RE2 set: every family, and each rule whose keyword occurs (gitleaks' own semantics)."""
        low = text.lower()
        present = {kw for kws in self._keywords for kw in kws if kw in low}
        return self._families + [i for i, (family, _) in enumerate(self._gate_actions)
                                 if family == "rules" and self._gate_keyword[i] in present]

    # recognisers ----------------------------------------------------------------------------------------------------

    def _find(self, text: str, hits: Iterable[int]) -> list[_Span]:
        spans: list[_Span] = []
        rule_ids: set[int] = set()
        families: set[str] = set()
        for index in hits:
            family, rule_indexes = self._gate_actions[index]
            if family == "rules":
                rule_ids.update(rule_indexes)
            else:
                families.add(family)
        for rule_index in sorted(rule_ids):
            self._apply_rule(self._rules[rule_index], text, spans)
        if "keyword_assign" in families:
            self._keyword_assignments(text, spans)
        if "entropy" in families:
            self._high_entropy(text, spans)
        if "email" in families:
            for m in _EMAIL.finditer(text):
                spans.append(_Span(m.start(), m.end(), "EMAIL", _PSEUDO, m.group().lower()))
        if "ipv4" in families:
            for m in _IPV4.finditer(text):
                if not _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
                    spans.append(_Span(m.start(1), m.end(1), "IP", _PSEUDO, m.group(1)))
        if "ipv4_dashed" in families:
            for m in _IPV4_DASHED.finditer(text):
                spans.append(_Span(m.start(1), m.end(4), "IP", _PSEUDO, ".".join(m.groups())))
        if "ipv6" in families:
            self._ipv6(text, spans)
        if "number" in families:
            for m in _NUM_CAND.finditer(text):
                if m.end(2) - m.start(2) < 7:
                    continue  # fewer than 7 digits: no phone, card or id
                start = m.start(1) if m.group(1) else m.start(2)
                end = m.end(3) if m.group(3) else m.end(2)
                kind = _classify_number(text, m.start(2), m.end(2), bool(m.group(1)), bool(m.group(3)))
                if kind:
                    value = _NON_DIGITS.sub("", text[start:end])
                    spans.append(_Span(start, end, kind, _PII, value))
        if "iban" in families:
            for m in _IBAN_CAND.finditer(text):
                found = _iban_ok(m.group(1))
                if found:
                    spans.append(_Span(m.start(1), m.start(1) + found[1], "IBAN", _PII, found[0]))
        if "nino" in families:
            for m in _NINO.finditer(text):
                spans.append(_Span(m.start(1), m.end(1), "UK_NINO", _PII, m.group(1).replace(" ", "")))
        if "user" in families:
            for index, pattern in enumerate(_USER_PATTERNS):
                for m in pattern.finditer(text):
                    value = m.group(1).rstrip(".,;:)]'\"")
                    if index == 0 and value.isdigit():
                        continue  # user=0: a numeric uid in key=value logs, not a name (sshd's "invalid user 0" is)
                    if value and value.lower() not in _NOT_USERS and value.count(".") < 2:
                        spans.append(_Span(m.start(1), m.start(1) + len(value), "USER", _PSEUDO, value))
        if "labelled_id" in families:
            for m in _ID_LABEL.finditer(text):
                value = m.group("value")
                if value.isalpha() or (value.isdigit() and len(value) < 6):
                    continue
                kind = "NATIONAL_ID" if m.group("nat") else "ACCOUNT_NUMBER"
                spans.append(_Span(m.start("value"), m.end("value"), kind, _PII, value.upper()))
        if "names" in families:
            for pattern in (_NAME_LABEL, _TITLE_NAME):
                for m in pattern.finditer(text):
                    spans.append(_Span(m.start(1), m.end(1), "PERSON", _PII, m.group(1)))
        return spans

    def _apply_rule(self, rule: _SecretRule, text: str, spans: list[_Span]) -> None:
        for m in rule.regex.finditer(text):
            group = rule.secret_group or next((g for g in range(1, rule.groups + 1) if m.group(g)), 0)
            secret = m.group(group)
            if not secret:
                continue
            start, end = m.span(group)
            whole = m.group(0)
            if rule.validator and not rule.validator(secret):
                continue
            if rule.entropy:
                if _shannon(secret) <= rule.entropy:
                    continue
                if rule.rule_id.startswith("generic") and not any(c.isdigit() for c in secret):
                    continue
            line = _line_around(text, start, end)
            if any(a.allows(secret, whole, line) for a in rule.allowlists):
                continue
            if any(a.allows(secret, whole, line) for a in self._global_allow):
                continue
            spans.append(_Span(start, end, rule.kind, _SECRET, secret))

    def _keyword_assignments(self, text: str, spans: list[_Span]) -> None:
        if "\n" in text:
            for block in _KEYWORD_BLOCK.finditer(text):
                for m in _BLOCK_LINE.finditer(text, block.start(2), block.end(2)):
                    value = m.group(1)
                    clean = value.strip()
                    if clean and not _PLACEHOLDER_VALUE.match(clean) and not clean.endswith(":"):
                        spans.append(_Span(m.start(1), m.end(1), "SECRET", _SECRET, value))
        for m in _KEYWORD_ASSIGN.finditer(text):
            gi = next(g for g in (2, 3, 4, 5) if m.group(g) is not None)
            value = m.group(gi)
            stripped = value.strip()
            if not stripped or _PLACEHOLDER_VALUE.match(stripped):
                continue
            if gi == 5 and len(stripped) < 4 and not any(c.isdigit() for c in stripped):
                continue
            key = m.group(1).lower()
            if key.rstrip("\"'").endswith(_REFERENCE_KEY_SUFFIXES):
                continue  # secretName, password_file, secretKeyRef: they name or point at a secret
            if _PATH_VALUE.match(stripped):
                continue  # service_key: default/Deployment/web is a resource path, not a credential
            if key == "pwd" and stripped.startswith(("/", "~")):
                continue  # PWD=/home/x is a working directory (sudo, env dumps), not a password
            if ds_heuristic.is_indirect_reference(m.group(0)) or key.endswith(("_id", "-id", ".id")) or key in {
                    "password_policy", "passwordpolicy"}:
                continue
            spans.append(_Span(m.start(gi), m.end(gi), "PASSWORD" if "pass" in key or "pwd" in key
                               or "contras" in key else "SECRET", _SECRET, value))

    def _high_entropy(self, text: str, spans: list[_Span]) -> None:
        for m in _QUOTED_TOKEN.finditer(text):
            token = m.group(2)
            # the id heuristic looks at what precedes the token on its line; a bounded window keeps it linear
            if self._entropy_secret(token, text[max(0, m.start() - 64):m.end()], quoted=True):
                spans.append(_Span(m.start(2), m.end(2), "HIGH_ENTROPY_SECRET", _SECRET, token))
        for m in _CONFIG_LINE.finditer(text):
            token = m.group(2)
            if self._entropy_secret(token, m.group(0), quoted=True):
                spans.append(_Span(m.start(2), m.end(2), "HIGH_ENTROPY_SECRET", _SECRET, token))
        for m in _ASSIGNED_TOKEN.finditer(text):
            token = m.group(1)
            if self._entropy_secret(token, text[max(0, m.start() - 64):m.end()], quoted=False):
                spans.append(_Span(m.start(1), m.end(1), "HIGH_ENTROPY_SECRET", _SECRET, token))

    @staticmethod
    def _entropy_secret(token: str, line: str, *, quoted: bool) -> bool:
        before = line[: line.rfind(token)] if token in line else line
        if _ID_KEY_BEFORE.search(before):
            return False  # "id": "call_x8...", fingerprint=..., sha256: ... are identifiers and digests
        if ds_heuristic.is_potential_uuid(token) or ds_heuristic.is_sequential_string(token) \
                or ds_heuristic.is_templated_secret(token) or ds_heuristic.is_likely_id_string(token, line):
            return False
        if _HEX_ONLY.match(token):
            # hex: digests and ids are everywhere in logs; only quoted hex is a secret candidate (detect-secrets' rule)
            return quoted and _HEX_ENTROPY.calculate_shannon_entropy(token) > 3.0
        if len(token) < 16:
            return False
        if "." in token and quoted:
            return False  # dotted identifiers (hostnames, module paths) are not keys
        if max(len(run) for run in _TOKEN_RUNS.split(token)) < 16:
            return False  # hyphenated identifiers (Package-Name-Win7-x64) are words, not keys
        has_upper = any(c.isupper() for c in token)
        has_lower = any(c.islower() for c in token)
        has_digit = any(c.isdigit() for c in token)
        if not quoted and not (has_upper and has_lower and has_digit):
            return False
        return _B64_ENTROPY.calculate_shannon_entropy(token) > 4.5 or (
            quoted and has_digit and has_upper and has_lower and len(token) >= 24
            and _B64_ENTROPY.calculate_shannon_entropy(token) > 4.0)

    @staticmethod
    def _ipv6(text: str, spans: list[_Span]) -> None:
        for m in _IPV6_RUN.finditer(text):
            cand = m.group(1)
            if cand.count(":") >= 8 and "::" not in cand and "." not in cand:
                head, _, port = cand.rpartition(":")
                if not port.isdigit() or head.count(":") != 7:
                    continue  # longer colon runs are MAC/WWN-style ids, not addresses
                cand = head
            if cand.count(":") < 2 or cand.endswith(":") and not cand.endswith("::"):
                continue
            try:
                addr = ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            if sum(1 for part in cand.split(":") if part) < 2 and not addr.is_unspecified:
                continue
            spans.append(_Span(m.start(1), m.start(1) + len(cand), "IP", _PSEUDO, addr.compressed))

    # replacement ----------------------------------------------------------------------------------------------------

    def _replace(self, text: str, spans: list[_Span], scope: _Scope) -> str:
        spans.sort(key=lambda s: (s.start, -s.end))
        merged: list[_Span] = []
        for span in spans:
            if merged and span.start < merged[-1].end:
                last = merged[-1]
                if span.tier > last.tier or (span.tier == last.tier
                                             and _specificity(span.kind) > _specificity(last.kind)):
                    # the stronger class names the union; it becomes a placeholder for the whole span
                    merged[-1] = _Span(last.start, max(last.end, span.end), span.kind, span.tier,
                                       text[last.start:max(last.end, span.end)])
                elif span.end > last.end:
                    merged[-1] = _Span(last.start, span.end, last.kind, last.tier,
                                       last.value if last.tier == _PSEUDO and span.tier < _PSEUDO
                                       else text[last.start:span.end])
                continue
            merged.append(span)
        out: list[str] = []
        pos = 0
        for span in merged:
            out.append(text[pos:span.start])
            out.append(self._token(span, scope))
            scope.counts[span.kind] += 1
            pos = span.end
        out.append(text[pos:])
        return "".join(out)

    def _token(self, span: _Span, scope: _Scope) -> str:
        if span.tier == _PSEUDO:
            return f"<{span.kind}:{self._pseudonym(span.kind, self._canonical(span.kind, span.value))}>"
        key = (span.kind, span.value)
        number = scope.numbers.get(key)
        if number is None:
            scope.next_number[span.kind] += 1
            number = scope.numbers[key] = scope.next_number[span.kind]
        return f"<{span.kind}#{number}>"

    @staticmethod
    def _canonical(kind: str, value: str) -> str:
        if kind == "IP":
            try:
                return ipaddress.ip_address(value).compressed
            except ValueError:
                return value
        if kind == "EMAIL":
            return value.lower().replace("%40", "@")
        return value

    def _pseudonym_uncached(self, kind: str, canonical: str) -> str:
        digest = hmac.new(self._key, kind.encode() + b"\0" + canonical.encode("utf-8"), hashlib.sha256)
        return digest.hexdigest()[: self._hex]


def _line_around(text: str, start: int, end: int, reach: int = 1024) -> str:
    """The line holding [start, end), at most `reach` characters either side (keeps huge one-line texts linear)."""
    lo = max(0, start - reach)
    hi = min(len(text), end + reach)
    line_start = text.rfind("\n", lo, start) + 1 or lo
    line_end = text.find("\n", end, hi)
    return text[line_start: hi if line_end < 0 else line_end]


def main(argv: list[str] | None = None) -> int:
    """`pilothouse redact [FILE] [--json]`: redact log lines (or one JSON record per line with --json) to stdout.

    The pseudonym key comes from PILOTHOUSE_REDACTION_PSEUDONYM_KEY. A line that cannot be scanned is dropped and
    the reason goes to stderr with its line number; the manifest totals go to stderr at the end.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="pilothouse redact", description="Redact secrets and personal data.")
    parser.add_argument("file", nargs="?", help="input file (default: stdin)")
    parser.add_argument("--json", action="store_true", help="each line is a JSON record; redact every string in it")
    args = parser.parse_args(argv)
    try:
        redactor = Redactor.from_settings(RedactionSettings())
    except Exception as exc:  # missing/short key: say so, never echo the key
        print(f"pilothouse redact: cannot build the redactor ({type(exc).__name__}); set "
              "PILOTHOUSE_REDACTION_PSEUDONYM_KEY to at least 16 bytes", file=sys.stderr)
        return 2
    stream = open(args.file, "rb") if args.file else sys.stdin.buffer  # noqa: SIM115 - closed below
    totals: Counter = Counter()
    dropped = 0
    try:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                dropped += 1
                print(f"line {number}: dropped: bytes are not valid UTF-8", file=sys.stderr)
                continue
            try:
                if args.json:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise RedactionRefused("not a JSON record") from None
                    out, manifest = redactor.redact_record(record)
                    text = json.dumps(out, ensure_ascii=False)
                else:
                    text, manifest = redactor.redact_text(line)
            except RedactionRefused as refused:
                dropped += 1
                print(f"line {number}: dropped: {refused.reason}", file=sys.stderr)
                continue
            for finding in manifest.findings:
                totals[finding.kind] += finding.count
            sys.stdout.write(text + "\n")
    finally:
        if args.file:
            stream.close()
    summary = {"ruleset_version": redactor.ruleset_version, "dropped_lines": dropped, "findings": dict(totals)}
    print(json.dumps(summary, sort_keys=True), file=sys.stderr)
    return 0
