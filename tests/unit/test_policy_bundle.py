"""Static checks of the policy bundle that need no OPA binary: generated docs, revision, determinism rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pilothouse.policy.domain import ENTRYPOINTS, render_readme

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_readme_embedded_schemas_are_up_to_date() -> None:
    readme = (POLICIES / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme) == readme, (
        "policies/README.md is stale: run `python -m pilothouse.policy.adapters.opa schema --readme policies/README.md`"
    )


def test_manifest_revision_matches_data_revision() -> None:
    manifest = json.loads((POLICIES / ".manifest").read_text(encoding="utf-8"))
    config = json.loads((POLICIES / "pilothouse/config/data.json").read_text(encoding="utf-8"))
    assert manifest["revision"] == config["bundle_revision"]
    assert manifest["roots"] == ["pilothouse"]


def _policy_files() -> list[Path]:
    files = [p for p in POLICIES.rglob("*.rego") if not p.name.endswith("_test.rego")]
    assert files, "no policy files found"
    return files


def test_decisions_are_deterministic() -> None:
    for path in _policy_files():
        text = path.read_text(encoding="utf-8")
        for forbidden in ("http.send", "time.now_ns", "rand.", "uuid.", "opa.runtime", "net.lookup"):
            assert forbidden not in text, f"{path.name} uses {forbidden}: decisions must be replayable"


def test_every_policy_has_a_test_beside_it() -> None:
    for path in _policy_files():
        assert path.with_name(path.stem + "_test.rego").exists(), f"{path} has no _test.rego beside it"


def test_directory_is_package_and_entrypoints_are_marked() -> None:
    for path in _policy_files():
        text = path.read_text(encoding="utf-8")
        package = re.search(r"^package (\S+)$", text, re.MULTILINE).group(1)
        assert package.replace(".", "/") == str(path.parent.relative_to(POLICIES))
    for entrypoint in ENTRYPOINTS.values():
        package_dir, rule = entrypoint.rsplit("/", 1)
        text = next((POLICIES / package_dir).glob("*.rego")).read_text(encoding="utf-8")
        block = re.search(r"# METADATA\n((?:#.*\n)+)" + re.escape(rule) + " :=", text)
        assert block and "# entrypoint: true" in block.group(1), f"{entrypoint} lacks `entrypoint: true` metadata"
