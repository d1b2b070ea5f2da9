"""Unit tests of the sensing redactor on copied, attributed fixtures (tests/fixtures/redaction/ATTRIBUTION.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from pilothouse.sensing.redaction import (
    RULES_DIR,
    RedactionManifest,
    RedactionRefused,
    RedactionSettings,
    Redactor,
    normalise,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "redaction"
KEY = hashlib.sha256(b"unit-test-pseudonym-key").digest()
PSEUDONYM = re.compile(r"<(IP|EMAIL|USER):[0-9a-f]{12}>")


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(KEY)


def _manifest_json(manifest: RedactionManifest) -> str:
    return json.dumps(manifest.to_dict())


# ---- each class -----------------------------------------------------------------------------------------------------

SECRET_CASES = [
    # (text, kind, value that must disappear)
    ('aws_token := "AKIALALEMEL33243OLIA"', "AWS_ACCESS_KEY", "AKIALALEMEL33243OLIA"),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKQ", "AWS_SECRET_KEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKQ"),
    ("clone https://x-access-token:ghp_Zx8Kq2LmN4pR7sT1vW3yA5bC6dE9fG0hJ2kL@github.com/acme/app",
     "GITHUB_PAT", "ghp_Zx8Kq2LmN4pR7sT1vW3yA5bC6dE9fG0hJ2kL"),
    ("slack init token=xoxb-26437158203-4725810633912-Qm3ZrT8vXc1LpK0sWy7NbH2d", "SLACK_BOT_TOKEN",
     "xoxb-26437158203-4725810633912-Qm3ZrT8vXc1LpK0sWy7NbH2d"),
    ("auth rejected eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhYmMxMjMiLCJpYXQiOjE3MDB9.c2lnbmF0dXJlLXZhbHVlLTEyMzQ1Ng",
     "JWT", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhYmMxMjMiLCJpYXQiOjE3MDB9.c2lnbmF0dXJlLXZhbHVlLTEyMzQ1Ng"),
    ("upstream headers: Authorization: Bearer 9fK2mQ7xL1pZ8vR3tY6wB0nC4hJ5sD", "AUTH_HEADER",
     "9fK2mQ7xL1pZ8vR3tY6wB0nC4hJ5sD"),
    ("curl -H 'X-Trace: 1' --oauth2-bearer x -H \"bearer Zm9vYmFyYmF6cXV4MTIzNDU2\"", "BEARER_TOKEN",
     "Zm9vYmFyYmF6cXV4MTIzNDU2"),
    ("proxy said basic c3ZjLWJhY2t1cDpTM2NyM3RQYXNz", "BASIC_AUTH", "c3ZjLWJhY2t1cDpTM2NyM3RQYXNz"),
    ("connecting to postgresql://app_rw:Tr1cky-Pa55@db-1.internal:5432/orders", "PASSWORD_IN_URL", "Tr1cky-Pa55"),
    ("Server=db;Database=orders;User Id=app;Password=Winter2024!x;", "PASSWORD", "Winter2024!x"),
    ("request cookie: sessionid=a81f2c9e4b7d3f60; theme=dark", "COOKIE", "a81f2c9e4b7d3f60"),
    ("GET /cb?state=ok&access_token=ya29.A0ARrdaM-k3y-v4lue_xyz HTTP/1.1", "SESSION_TOKEN",
     "ya29.A0ARrdaM-k3y-v4lue_xyz"),
    ("exec: mysql -h db -u backup -pS3cretPassw0rd orders", "CLI_SECRET", "S3cretPassw0rd"),
    ("deploy --token=glptt-0123456789abcdefABCD --force", "CLI_SECRET", "glptt-0123456789abcdefABCD"),
    ('client_config = {"signing": "Zq8XvB2nL5kP9mR3tW7yC1dF4gH6jK0s"}', "HIGH_ENTROPY_SECRET",
     "Zq8XvB2nL5kP9mR3tW7yC1dF4gH6jK0s"),
    ("sts returned SecretAccessKey 9drTJvcXLB89Qz2n8vMJc7B4Kx2Vn4wR7tY1pLk3 ok", "AWS_SECRET_KEY",
     "9drTJvcXLB89Qz2n8vMJc7B4Kx2Vn4wR7tY1pLk3"),
    ("smtp: AUTH PLAIN AGpvaG5AZXhhbXBsZS5jb20AcGFzc3dvcmQxMjM=", "SASL_CREDENTIALS",
     "AGpvaG5AZXhhbXBsZS5jb20AcGFzc3dvcmQxMjM="),
    ('{"level":"info","password":"hunter2!x"}', "PASSWORD", "hunter2!x"),
    ('charge ok {\\"credit_card_cvv\\":672,\\"credit_card_expiration_year\\":2039}', "CARD_CVV", ":672,"),
]


@pytest.mark.parametrize(("text", "kind", "value"), SECRET_CASES,
                         ids=[c[1] + f"-{i}" for i, c in enumerate(SECRET_CASES)])
def test_secret_classes_are_replaced_by_numbered_placeholders(redactor: Redactor, text: str, kind: str, value: str):
    out, manifest = redactor.redact_text(text)
    assert value not in out
    assert f"<{kind}#1>" in out
    assert manifest.count(kind) >= 1
    assert manifest.scanned and manifest.redacted_fields == ("$",)


def test_private_key_block_is_removed_even_when_truncated(redactor: Redactor):
    key = (FIXTURES / "gitleaks" / "id_ed25519").read_text()
    body = [line for line in key.splitlines() if line and not line.startswith("-----")]
    out, manifest = redactor.redact_text("deploy key loaded:\n" + key)
    assert all(line not in out for line in body) and manifest.count("PRIVATE_KEY") == 1
    truncated = "\n".join(key.splitlines()[:3])  # header and two body lines, no END line
    out, manifest = redactor.redact_text(truncated)
    assert all(line not in out for line in truncated.splitlines()[1:])
    assert manifest.count("PRIVATE_KEY") == 1


PII_CASES = [
    ("mail bounced for Jane.Doe+ops@example.co.uk today", "EMAIL", "Jane.Doe+ops@example.co.uk"),
    ("Invalid user webmaster from 173.234.31.186", "IP", "173.234.31.186"),
    ("reverse lookup for ip-10-20-30-40.eu-west-1.compute.internal", "IP", "10-20-30-40"),
    ("peer [2001:db8:85a3::8a2e:370:7334]:443 reset", "IP", "2001:db8:85a3::8a2e:370:7334"),
    ("QuorumPeer[myid=1]/0:0:0:0:0:0:0:0:2181 started", "IP", "0:0:0:0:0:0:0:0"),
    ("Failed password for invalid user bob from 10.0.0.9 port 22 ssh2", "USER", "bob"),
    ("Accepted password for root from 10.0.0.9 port 22 ssh2", "USER", "root"),
    ("pam_unix: authentication failure; rhost=10.0.0.9 user=alice", "USER", "alice"),
    ("session opened for user cyrus by (uid=0)", "USER", "cyrus"),
    ('{"ts":"2024-05-01T10:00:00Z","user":"alice","action":"login"}', "USER", "alice"),
    ("sudo:   deploy : TTY=pts/0 ; PWD=/srv/app ; USER=root ; COMMAND=/bin/true", "USER", "deploy"),
    ("open C:\\Users\\msmith\\AppData\\Local\\Temp\\x.log", "USER", "msmith"),
    ("refund to card 4111 1111 1111 1111 failed", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("card=378282246310005 declined", "CREDIT_CARD", "378282246310005"),
    ("payout IBAN GB82 WEST 1234 5698 7654 32 queued", "IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("payout iban de89370400440532013000 queued", "IBAN", "de89370400440532013000"),
    ("applicant ssn 078-05-1120 on file", "US_SSN", "078-05-1120"),
    ("NINO AB 12 34 56 C verified", "UK_NINO", "AB 12 34 56 C"),
    ("kyc: passport number is 912803456", "NATIONAL_ID", "912803456"),
    ("kyc: driver license: H12234567 scanned", "NATIONAL_ID", "H12234567"),
    ("payout routing number is: 101205681", "ACCOUNT_NUMBER", "101205681"),
    ("callback requested, phone: +44 20 7946 0958", "PHONE", "+44 20 7946 0958"),
    ("call me at (415) 555-0132 after 5", "PHONE", "(415) 555-0132"),
    ("Fax: 9498777106", "PHONE", "9498777106"),
    ("Name: Toshimi Arata\nrole: admin", "PERSON", "Toshimi Arata"),
]


@pytest.mark.parametrize(("text", "kind", "value"), PII_CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(PII_CASES)])
def test_personal_data_classes(redactor: Redactor, text: str, kind: str, value: str):
    out, manifest = redactor.redact_text(text)
    assert value not in out
    assert "PASSWORD" not in out  # PWD=/srv/app is a directory
    assert manifest.count(kind) >= 1
    if kind in ("IP", "EMAIL", "USER"):
        assert PSEUDONYM.search(out), out
    else:
        assert f"<{kind}#1>" in out


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 is a typo (Luhn fails)",
    "payout IBAN GB82 WEST 1234 5698 7654 31 (bad checksum)",
    "serial 000-12-3456 rejected (area 000 is never issued)",
    "release 10.2.3.4 of the agent",
    "wcp.dll version 0.0.0.6 loaded",
    "std::vector<int> resized; Class::method called at 12:34:56",
    "chip FF:F2:9F:16:E2:23:00:0D:60:E9:1D:DC status changed",
    "password = ${DB_PASSWORD}",
    "Authorization: <redacted>",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8 merged by ci",
    "trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7 request took 34ms",
    "uuid 123e4567-e89b-12d3-a456-426614174000 created",
    "the api key is missing; set OPENAI_API_KEY",
    "account created 2024-05-01 for tenant acme; license key expired",
    # Kubernetes and tool-call shapes that name or point at secrets rather than hold them
    "      secretName: api-limiter-logs-script",
    "        - -port=80",
    '  "service_key": "default/Deployment/checkout-web",',
    "otel   accounting-859f445487-chtq2   1/1   Running   2 (20m ago)",
    "  - name: View Graph",
    '        "id": "call_cwtbeZFAJkD51ZVd38FdF1y6",',
    "pull access denied, repository may require authorization: server message: insufficient_scope",
    "create the secret 'db-secrets-for-medium' first",
])
def test_near_misses_are_left_alone(redactor: Redactor, text: str):
    out, manifest = redactor.redact_text(text)
    assert out == text and manifest.findings == ()


# ---- pseudonyms -----------------------------------------------------------------------------------------------------


def test_pseudonyms_are_stable_typed_and_key_dependent(redactor: Redactor):
    line = "Failed password for root from 203.0.113.7 port 22; notify ops@example.org"
    first, _ = redactor.redact_text(line)
    again, _ = Redactor(KEY).redact_text(line)  # another instance, same deployment key
    other, _ = Redactor(hashlib.sha256(b"another-deployment").digest()).redact_text(line)
    assert first == again
    assert first != other
    assert set(PSEUDONYM.findall(first)) == {"IP", "EMAIL", "USER"}
    ip_token = f"<IP:{redactor.pseudonym('IP', '203.0.113.7')}>"
    assert ip_token in first and ip_token not in other
    # the same host written two ways is the same pseudonym; case of an e-mail does not matter
    assert redactor.pseudonym("IP", "2001:db8::1") == redactor.pseudonym("IP", "2001:0db8:0:0:0:0:0:1")
    assert redactor.pseudonym("EMAIL", "Ops@Example.org") == redactor.pseudonym("EMAIL", "ops@example.org")
    encoded, _ = redactor.redact_text("GET /principals/users/ops%40example.org/ 404")
    assert f"<EMAIL:{redactor.pseudonym('EMAIL', 'ops@example.org')}>" in encoded  # URL-encoded @ is the same mailbox
    assert redactor.pseudonym("IP", "203.0.113.7") != redactor.pseudonym("IP", "203.0.113.8")


def test_placeholders_are_numbered_per_record(redactor: Redactor):
    a, b = "AKIAQYLPMN5HFIQR7XYZ", "AKIAZ7XW3VUT2SRQ6PON"
    out, manifest = redactor.redact_record({"first": f"key {a}", "again": f"same {a}", "other": f"new {b}"})
    assert out == {"first": "key <AWS_ACCESS_KEY#1>", "again": "same <AWS_ACCESS_KEY#1>",
                   "other": "new <AWS_ACCESS_KEY#2>"}
    assert manifest.count("AWS_ACCESS_KEY") == 3
    # a new record starts again at #1
    assert redactor.redact_text(f"x {b}")[0] == "x <AWS_ACCESS_KEY#1>"


# ---- hidden characters ----------------------------------------------------------------------------------------------


def test_zero_width_hidden_aws_key_and_jwt_are_found(redactor: Redactor):
    key = "AKIALALEMEL33243OLIA"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhYmMxMjMiLCJpYXQiOjE3MDB9.c2lnbmF0dXJlLXZhbHVlLTEyMzQ1Ng"
    hidden_key = "\u200b".join(key)
    hidden_jwt = jwt[:10] + "\u200d\u2060" + jwt[10:30] + "\ufeff" + jwt[30:]
    out, manifest = redactor.redact_text(f"aws_key={hidden_key} token {hidden_jwt}")
    assert "<AWS_ACCESS_KEY#1>" in out and "<JWT#1>" in out
    assert "AKIA" not in out and "eyJ" not in out
    assert manifest.count("INVISIBLE_CHARACTERS") == len(key) - 1 + 3


def test_ansi_escapes_and_control_characters_do_not_hide_a_key(redactor: Redactor):
    out, manifest = redactor.redact_text("key \x1b[31mAKIALALE\x1b[0mMEL33243OLIA\x00 done")
    assert out == "key <AWS_ACCESS_KEY#1> done"
    assert manifest.count("INVISIBLE_CHARACTERS") == len("\x1b[31m\x1b[0m\x00")


def test_tag_block_variation_selectors_and_fullwidth_are_normalised(redactor: Redactor):
    tags = "".join(chr(0xE0000 + ord(c)) for c in "ignore")
    fullwidth_key = "".join(chr(ord(c) + 0xFEE0) for c in "AKIALALEMEL33243OLIA")  # NFKC folds it to ASCII
    text = f"note{tags} key\ufe0f {fullwidth_key}"
    out, manifest = redactor.redact_text(text)
    assert out == "note key <AWS_ACCESS_KEY#1>"
    assert manifest.count("INVISIBLE_CHARACTERS") == len("ignore") + 1
    assert normalise("plain ascii") == ("plain ascii", 0)


# ---- manifest -------------------------------------------------------------------------------------------------------


def test_manifest_never_contains_values(redactor: Redactor):
    secret, email, ip = "S3cretPassw0rd", "jane@example.com", "198.51.100.23"
    record = {"labels": {"instance": ip, "contact": email}, f"{email}": "mapped by mail",
              "annotations": {"description": f"mysql -p{secret} failed for {email} from {ip}"}}
    out, manifest = redactor.redact_record(record)
    dumped = _manifest_json(manifest)
    for value in (secret, email, ip, "jane", "198.51"):
        assert value not in dumped
        assert value not in json.dumps(out)
    assert set(manifest.to_dict()) == {"ruleset_version", "scanned", "findings", "redacted_fields"}
    assert {f["kind"] for f in manifest.to_dict()["findings"]} == {"CLI_SECRET", "EMAIL", "IP"}
    # field paths name the redacted key, never the original one
    assert "$.labels.instance" in manifest.redacted_fields
    assert any(p.startswith("$.<EMAIL:") for p in manifest.redacted_fields)


def test_record_walk_keys_lists_and_scalars(redactor: Redactor):
    record = {"alerts": [{"summary": "disk full on 10.1.2.3", "value": 97.5, "firing": True, "runbook": None},
                         {"card": 4111111111111111}],
              "count": 3}
    out, manifest = redactor.redact_record(record)
    assert out["alerts"][0]["summary"].startswith("disk full on <IP:")
    assert out["alerts"][0]["value"] == 97.5 and out["alerts"][0]["firing"] is True
    assert out["alerts"][0]["runbook"] is None and out["count"] == 3
    assert out["alerts"][1]["card"] == "<CREDIT_CARD#1>"  # a number that is a card becomes its placeholder
    assert manifest.redacted_fields == ("$.alerts[0].summary", "$.alerts[1].card")
    assert record["alerts"][0]["summary"] == "disk full on 10.1.2.3"  # input untouched


def test_ruleset_version_is_stable_and_tracks_rule_data(tmp_path: Path, redactor: Redactor):
    assert Redactor(KEY).ruleset_version == redactor.ruleset_version
    assert redactor.redact_text("x")[1].ruleset_version == redactor.ruleset_version
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    assert Redactor(KEY, rules_dir=rules).ruleset_version == redactor.ruleset_version
    with (rules / "pilothouse-secrets.toml").open("a") as fh:
        fh.write('\n[[rules]]\nid = "extra"\nregex = \'\'\'zz-[0-9]{8}\'\'\'\nkeywords = ["zz-"]\n')
    changed = Redactor(KEY, rules_dir=rules)
    assert changed.ruleset_version != redactor.ruleset_version
    assert changed.redact_text("id zz-12345678")[0] == "id <EXTRA#1>"


# ---- fail closed ----------------------------------------------------------------------------------------------------


class _Opaque:
    pass


class _BrokenStr(str):
    """A str whose methods fail, to reach the redactor's internal-error path without patching it."""

    def isascii(self) -> bool:
        raise RuntimeError("boom AKIALALEMEL33243OLIA")


@pytest.mark.parametrize(("value", "reason"), [
    ({"a": [_Opaque()]}, "type _Opaque"),
    ({"a": "x" * 2_000_001}, "longer than"),
    ({"a": "bad \ud800 surrogate"}, "surrogates"),
    ({"a": b"\xff\xfe not utf-8"}, "not valid UTF-8"),
    ({1: "int key"}, "key of type int"),
    ({"k": {"k": {"k": {"k": {"k": {"k": "deep"}}}}}}, "deeper than"),
    ({"ops@example.com": 1, "OPS@example.com": 2}, "same name"),
    ({"a": _BrokenStr("hello")}, "internal error"),
])
def test_unscannable_records_are_refused(value, reason: str):
    redactor = Redactor(KEY, max_text_chars=2_000_000, max_depth=4)
    with pytest.raises(RedactionRefused) as excinfo:
        redactor.redact_record(value)
    assert reason in excinfo.value.reason
    assert "AKIA" not in str(excinfo.value) and "ops@" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None  # the original exception (which may hold input) is not chained


def test_record_budget_and_text_api_refusals():
    small = Redactor(KEY, max_text_chars=100, max_record_chars=150, max_record_nodes=10)
    with pytest.raises(RedactionRefused, match="longer than 100"):
        small.redact_text("y" * 101)
    with pytest.raises(RedactionRefused, match="more than 150 characters"):
        small.redact_record(["z" * 80, "z" * 80])
    with pytest.raises(RedactionRefused, match="more than 10 values"):
        small.redact_record(list(range(20)))
    with pytest.raises(RedactionRefused, match="type int"):
        small.redact_text(12)  # type: ignore[arg-type]
    assert small.redact_text(b"bytes ok")[0] == "bytes ok"


def test_settings_and_key_checks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PILOTHOUSE_REDACTION_PSEUDONYM_KEY", "a-deployment-key-of-32-characters")
    settings = RedactionSettings()
    assert "a-deployment" not in repr(settings)
    from_settings = Redactor.from_settings(settings)
    direct = Redactor(b"a-deployment-key-of-32-characters")
    assert from_settings.pseudonym("IP", "10.0.0.1") == direct.pseudonym("IP", "10.0.0.1")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Redactor(b"short")


def test_concurrent_use_gives_the_sequential_result(redactor: Redactor):
    lines = (FIXTURES / "benign_logs.txt").read_text().splitlines() + [c[0] for c in SECRET_CASES + PII_CASES]
    expected = [redactor.redact_text(line) for line in lines]
    results: dict[int, list] = {}

    def work(n: int) -> None:
        results[n] = [redactor.redact_text(line) for line in lines]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[n] == expected for n in range(4))


def test_the_prefilter_never_hides_a_finding(redactor: Redactor):
    """The RE2 gate only decides which recognisers run; running all of them must give the same output."""
    exhaustive = Redactor(KEY, prefilter=False)
    texts = (FIXTURES / "benign_logs.txt").read_text().splitlines() + [c[0] for c in SECRET_CASES + PII_CASES]
    texts += [row["full_text"] for row in json.loads((FIXTURES / "presidio_sample.json").read_text())]
    texts += [p.read_text() for p in sorted((FIXTURES / "detect-secrets").rglob("*")) if p.is_file()]
    for text in texts:
        assert redactor.redact_text(text) == exhaustive.redact_text(text)


def test_the_clean_string_cache_changes_no_output():
    """Strings that needed nothing are remembered; a second pass (all hits) and a cache-less redactor agree with the
    first pass on every fixture text, the records too (their walk shares the cache), and nothing the redactor
    changed, nor anything it found, is ever in the cache."""
    cached, uncached = Redactor(KEY), Redactor(KEY, clean_cache=0)
    texts = (FIXTURES / "benign_logs.txt").read_text().splitlines() + [c[0] for c in SECRET_CASES + PII_CASES]
    texts += [row["full_text"] for row in json.loads((FIXTURES / "presidio_sample.json").read_text())]
    texts += ["env\u200b", "ｓｅｃｒｅｔ", "alertname", "HighErrorRate", "x" * 600]
    first = [cached.redact_text(t) for t in texts]
    assert first == [cached.redact_text(t) for t in texts] == [uncached.redact_text(t) for t in texts]
    records = [{"labels": {"alertname": t, "note": t, t[:40]: "critical"}, "links": [t, t]} for t in texts]
    first_records = [cached.redact_record(r) for r in records]
    assert first_records == [cached.redact_record(r) for r in records] == [uncached.redact_record(r) for r in records]
    remembered = set(cached._clean)
    assert "HighErrorRate" in remembered and "x" * 600 not in remembered  # too long to keep
    for text, (out, manifest) in zip(texts, first):
        if out != text or manifest.findings:
            assert text not in remembered
    assert not uncached._clean


def test_the_clean_string_cache_is_bounded():
    small = Redactor(KEY, clean_cache=64)
    for i in range(1000):
        assert small.redact_text(f"plain value {i}")[0] == f"plain value {i}"
        assert len(small._clean) <= 64
    assert "plain value 999" in small._clean


# ---- benign lines ---------------------------------------------------------------------------------------------------


def test_benign_log_lines_are_unchanged(redactor: Redactor):
    lines = (FIXTURES / "benign_logs.txt").read_text().splitlines()
    assert len(lines) >= 40
    changed = [line for line in lines if redactor.redact_text(line)[0] != line]
    assert changed == []


_LOGHUB = Path(os.environ.get("PILOTHOUSE_SHARED_DATASETS", "/work/shared/datasets")) / "loghub-2k"


@pytest.mark.skipif(not _LOGHUB.is_dir(), reason="loghub-2k is not shipped with the repository (non-OSI licence)")
def test_loghub_lines_without_personal_data_are_unchanged(redactor: Redactor):
    # 300 lines of each system; lines with anything IP-, e-mail- or user-shaped are set aside (they hold PII)
    maybe_pii = re.compile(r"\d{1,3}[.-]\d{1,3}[.-]\d{1,3}[.-]\d{1,3}|[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:|@|"
                           r"/home/|Users|user|password for")
    benign = changed = 0
    for log in sorted(_LOGHUB.glob("*/*_2k.log")):
        for line in log.read_text(errors="replace").splitlines()[:300]:
            if maybe_pii.search(line):
                continue
            benign += 1
            changed += redactor.redact_text(line)[0] != line
    assert benign >= 2000
    assert changed / benign <= 0.005


# ---- copied corpora -------------------------------------------------------------------------------------------------


def _detect_secrets_values() -> list[tuple[str, str]]:
    base = FIXTURES / "detect-secrets"
    baseline = json.loads((base / "baseline.file").read_text())
    found = []
    for rel, entries in baseline["results"].items():
        path = base / rel.removeprefix("test_data/")
        if not path.exists():
            continue
        text = path.read_text()
        lines = text.splitlines()
        for entry in entries:
            line = lines[entry["line_number"] - 1] if entry["line_number"] <= len(lines) else ""
            for size in range(len(line), 2, -1):
                hit = next((line[i:i + size] for i in range(len(line) - size + 1)
                            if hashlib.sha1(line[i:i + size].encode()).hexdigest() == entry["hashed_secret"]), None)
                if hit:
                    found.append((text, hit))
                    break
    return found


def test_detect_secrets_fixture_secrets_are_all_removed(redactor: Redactor):
    labelled = _detect_secrets_values()
    assert len(labelled) >= 12
    left = [value for text, value in labelled if value in redactor.redact_text(text)[0]]
    assert left == []


def test_gitleaks_fixture_secrets_are_removed(redactor: Redactor):
    small = (FIXTURES / "gitleaks" / "small.txt").read_text()
    env = (FIXTURES / "gitleaks" / "env.prod").read_text()
    aws = re.search(r'aws_token := "([^"]+)"', small).group(1)
    password = re.search(r"DB_PASSWORD=(\S+)", env).group(1)
    assert aws not in redactor.redact_text(small)[0]
    out = redactor.redact_text(env)[0]
    assert password not in out and "DB_HOST=example.com" in out and "DB_PORT=443" in out


def test_presidio_sample_pii_recall(redactor: Redactor):
    wanted = {"EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN"}
    rows = json.loads((FIXTURES / "presidio_sample.json").read_text())
    total = hit = 0
    for row in rows:
        out = redactor.redact_text("Nov 25 20:00:00 app-7 desk[42]: note: " + row["full_text"])[0]
        for span in row["spans"]:
            if span["entity_type"] in wanted:
                total += 1
                hit += span["entity_value"] not in out
    assert total >= 60
    assert hit / total >= 0.95


# ---- wire twin and command line -------------------------------------------------------------------------------------


def test_manifest_validates_against_the_bus_record(redactor: Redactor):
    from pilothouse.bus.records import RedactionManifest as WireManifest

    _, manifest = redactor.redact_record({"msg": "Failed password for root from 10.9.8.7", "n": 1})
    wire = WireManifest.model_validate(manifest.to_dict())
    assert wire.ruleset_version == redactor.ruleset_version and wire.scanned is True
    assert {(f.kind, f.count) for f in wire.findings} == {("IP", 1), ("USER", 1)}
    assert wire.redacted_fields == ["$.msg"]


def test_command_line_redacts_lines_and_reports_dropped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    from pilothouse.sensing.redaction import main

    source = tmp_path / "in.log"
    source.write_bytes(b"Invalid user admin from 192.0.2.44\nbroken \xff bytes\nplain line\n")
    monkeypatch.setenv("PILOTHOUSE_REDACTION_PSEUDONYM_KEY", "cli-test-key-0123456789")
    assert main([str(source)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[1] == "plain line"
    assert "192.0.2.44" not in captured.out and "admin" not in captured.out
    assert "line 2: dropped: bytes are not valid UTF-8" in captured.err
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert summary["dropped_lines"] == 1 and summary["findings"] == {"IP": 1, "USER": 1}
    monkeypatch.delenv("PILOTHOUSE_REDACTION_PSEUDONYM_KEY")
    assert main([str(source)]) == 2
