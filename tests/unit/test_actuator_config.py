"""The actuator's settings: read from the environment, secrets hidden, and consistent with the bus catalogue
(the broker's ACLs are derived from it, so a topic or group outside it would be denied at run time)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from pilothouse.actuator.config import Settings
from pilothouse.bus.authorization import key_id
from pilothouse.bus.catalogue import load_catalogue


def test_settings_come_from_the_environment_and_hide_secrets(monkeypatch):
    key = Ed25519PrivateKey.generate().public_key()
    raw = base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_POSTGRES_DSN", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_TRUSTED_KEYS", json.dumps({key_id(key): raw}))
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_HTTP_TARGETS", json.dumps([
        {"name": "flags", "url": "http://flags:8080/v1/{action}", "actions": ["toggle_feature_flag"],
         "dry_run_param": "dryRun", "token": "s3cret"}]))
    s = Settings()
    assert s.trusted_keys == {key_id(key): raw}
    assert s.http_targets[0].actions == ("toggle_feature_flag",)
    assert "hunter2" not in repr(s) and "s3cret" not in repr(s)
    with pytest.raises(ValidationError):
        s.max_clock_skew_s = 60  # frozen


def test_bad_settings_are_refused_with_the_field_named(monkeypatch):
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_POSTGRES_DSN", "postgresql://db/x")
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_TRUSTED_KEYS", json.dumps({"policy-key": "AAAA"}))
    with pytest.raises(ValidationError, match="trusted key id"):
        Settings()
    monkeypatch.delenv("PILOTHOUSE_ACTUATOR_TRUSTED_KEYS")
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_GROUP_PREFIX", "someone.else")
    with pytest.raises(ValidationError, match="group_prefix"):
        Settings()


def test_default_topics_and_groups_match_the_catalogue(monkeypatch):
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_POSTGRES_DSN", "postgresql://db/x")
    s = Settings()
    cat = load_catalogue()
    consumed = {s.topic_pending, s.topic_authorized, s.topic_kill_switch}
    produced = {s.topic_shadow, s.topic_executions, s.topic_verifications}
    assert consumed == {t.name for t in cat.consumed_by("actuator")}
    assert produced == {t.name for t in cat.produced_by("actuator")}
    # Consumer groups are "<group_prefix>.<purpose>"; the ACLs grant the actuator "pilothouse.actuator." only.
    assert s.group_prefix + "." == "pilothouse.actuator."


@pytest.mark.parametrize("prefix,ok", [("pilothouse.actuator", True), ("pilothouse.actuator.blue", True),
                                       ("test.abc123", True), ("pilothouse.actuators", False),
                                       ("pilothouse.policy", False), ("", False)])
def test_group_prefix_stays_inside_the_actuators_acl(monkeypatch, prefix, ok):
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_POSTGRES_DSN", "postgresql://db/x")
    monkeypatch.setenv("PILOTHOUSE_ACTUATOR_GROUP_PREFIX", prefix)
    if ok:
        assert Settings().group_prefix == prefix
    else:
        with pytest.raises(ValidationError):
            Settings()
