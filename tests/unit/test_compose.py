"""docker-compose.yml describes the same system as the code: service names, environment names and topics agree."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

import pilothouse.cli
from pilothouse.bus.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["sensing", "reasoning", "policy", "actuator", "ledger", "console"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def known_settings_env_names() -> set[str]:
    """Every PILOTHOUSE_* variable some Settings class of the code base reads."""
    names: set[str] = set()
    packages = ["pilothouse.bus", "pilothouse.stack", *(f"pilothouse.{s}" for s in SERVICES)]
    for pkg in packages:
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            continue
        modules = [mod] + [importlib.import_module(f"{pkg}.{m.name}") for m in pkgutil.iter_modules(mod.__path__)
                           if m.name in ("config", "info")]
        for m in modules:
            for obj in vars(m).values():
                if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings:
                    prefix = obj.model_config.get("env_prefix", "")
                    names |= {(prefix + f).upper() for f in obj.model_fields}
    from pilothouse.catalogue_cli import PASSWORD_ENV

    names |= {PASSWORD_ENV + p.upper() for p in load_catalogue().principals}
    return names


def test_every_catalogue_principal_is_a_compose_service_running_its_own_package(compose):
    services = compose["services"]
    assert set(load_catalogue().principals) == set(SERVICES)
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"pilothouse.{name}"]
        assert svc["environment"]["PILOTHOUSE_KAFKA_USERNAME"] == name
        assert svc["image"] == services["kafka-init"]["image"]  # one image for all services
    for infra, image in {"kafka": "apache/kafka:", "postgres": "postgres:", "opa": "openpolicyagent/opa:",
                         "vllm": "vllm/vllm-openai:"}.items():
        assert services[infra]["image"].startswith(image)


def test_compose_uses_the_pinned_versions_of_the_local_stack(compose):
    from pilothouse.stack.config import KAFKA_VERSION, OPA_VERSION

    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert compose["services"]["opa"]["image"] == f"openpolicyagent/opa:{OPA_VERSION}"


def test_every_pilothouse_environment_variable_is_read_by_the_code(compose):
    known = known_settings_env_names()
    used = {k for svc in compose["services"].values() for k in (svc.get("environment") or {})
            if k.startswith("PILOTHOUSE_")}
    assert used, "compose sets no PILOTHOUSE_ variables?"
    assert used <= known, f"not read by any Settings class: {sorted(used - known)}"


def test_topics_in_compose_match_the_catalogue(compose):
    cat = load_catalogue()
    for name in SERVICES:
        declared = compose["services"][name]["x-pilothouse"]
        assert sorted(declared["produces"]) == sorted(t.name for t in cat.produced_by(name)), name
        assert sorted(declared["consumes"]) == sorted(t.name for t in cat.consumed_by(name)), name
    mentioned = set(re.findall(r"pilothouse\.[a-z-]+\.[a-z-]+\.v\d+", (ROOT / "docker-compose.yml").read_text()))
    assert mentioned <= set(cat.topics), f"unknown topics: {sorted(mentioned - set(cat.topics))}"


def test_kafka_init_gets_a_password_for_every_principal(compose):
    env = compose["services"]["kafka-init"]["environment"]
    from pilothouse.catalogue_cli import PASSWORD_ENV

    assert {k for k in env if k.startswith(PASSWORD_ENV)} == {PASSWORD_ENV + p.upper() for p in SERVICES}
    assert compose["services"]["kafka-init"]["command"] == ["pilothouse", "catalogue", "apply"]
    assert pilothouse.cli.COMMANDS["catalogue"][0] == "pilothouse.catalogue_cli:main"


def test_readme_topic_table_matches_the_catalogue():
    text = (ROOT / "README.md").read_text()
    for t in load_catalogue().topics.values():
        row = f"| `{t.name}` | {t.record.rsplit('.', 1)[1]} | {', '.join(t.producers)} | {', '.join(t.consumers)} |"
        assert row in text, f"README topic table is stale for {t.name}"
