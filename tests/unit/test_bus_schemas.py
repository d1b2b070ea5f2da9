"""The Avro contract: schemas load, are safe, match the catalogue and their pydantic twins, and evolve compatibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pilothouse.bus import codegen
from pilothouse.bus.catalogue import load_catalogue, parse_catalogue
from pilothouse.bus.compatibility import incompatibilities, schemas_at
from pilothouse.bus.errors import ConfigurationError, SchemaError
from pilothouse.bus.records import RECORDS
from pilothouse.bus.schemas import SCHEMAS_DIR, SchemaSet, lint, load_schemas

ENVELOPE = ["event_id", "incident_id", "correlation_id", "causation_id", "occurred_at", "producer"]


def test_every_catalogue_topic_has_a_schema_with_the_envelope():
    schemas, cat = load_schemas(), load_catalogue()
    assert len(cat.topics) >= 14
    for topic in cat.topics.values():
        rs = schemas.get(topic.record)
        names = [f["name"] for f in rs.expanded["fields"]]
        assert names[: len(ENVELOPE)] == ENVELOPE, topic.name
        assert topic.key in names or topic.key in ("entry_key", "none"), (topic.name, topic.key)


def test_the_issue_s_record_families_are_all_declared():
    records = {t.record.rsplit(".", 1)[1] for t in load_catalogue().topics.values()}
    for needed in ["AlertsReceived", "IncidentUpdated", "HypothesesProposed", "HypothesisValidated", "ActionProposed",
                   "PolicyDecided", "ApprovalRequested", "ApprovalRecorded", "ActionAuthorized", "ShadowRunCompleted",
                   "ActionExecuted", "ActionVerified", "LedgerEntry", "CheckpointSigned"]:
        assert needed in records


def test_records_py_is_generated_from_the_current_schemas():
    assert codegen.RECORDS_PATH.read_text() == codegen.render(), "run: python -m pilothouse.bus.codegen"


def test_pydantic_twins_have_exactly_the_avro_fields():
    schemas = load_schemas()
    for name, model in RECORDS.items():
        avro_fields = [f["name"] for f in schemas.get(name).expanded["fields"]]
        assert list(model.model_fields) == avro_fields, name
        for f in schemas.get(name).expanded["fields"]:
            assert model.model_fields[f["name"]].is_required() == ("default" not in f), (name, f["name"])


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "array", "items": "null"},
        {"type": "map", "values": "null"},
        {"type": "array", "items": {"type": "record", "name": "Empty", "fields": []}},
        {"type": "array", "items": {"type": "fixed", "name": "Z", "size": 0}},
    ],
)
def test_lint_refuses_containers_of_zero_byte_items(bad):
    schema = {"type": "record", "name": "pilothouse.t.X", "fields": [{"name": "a", "type": bad}]}
    assert lint(schema)


def test_lint_accepts_every_shipped_schema_and_a_schema_set_refuses_a_bomb(tmp_path: Path):
    for name in load_schemas().names():
        assert lint(load_schemas().get(name).expanded) == []
    (tmp_path / "X.avsc").write_text(json.dumps(
        {"type": "record", "name": "X", "namespace": "pilothouse.t",
         "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}))
    with pytest.raises(SchemaError, match="memory bomb"):
        SchemaSet(tmp_path)


def test_schema_file_name_must_match_type(tmp_path: Path):
    (tmp_path / "Wrong.avsc").write_text(json.dumps({"type": "record", "name": "X", "fields": []}))
    with pytest.raises(SchemaError, match="file name"):
        SchemaSet(tmp_path)


def test_catalogue_rejects_unknown_principals_and_bad_names():
    base = {"version": 1, "principals": {"a": {}}, "topics": {
        "pilothouse.x.y.v1": {"record": "R", "key": "k", "producers": ["a"], "consumers": ["b"]}}}
    with pytest.raises(ConfigurationError, match="unknown principals"):
        parse_catalogue(base)
    base["topics"] = {"x.y": {"record": "R", "key": "k", "producers": ["a"], "consumers": []}}
    with pytest.raises(ConfigurationError, match="names are"):
        parse_catalogue(base)


def test_each_record_type_has_one_topic_and_every_topic_a_dlq():
    cat = load_catalogue()
    records = [t.record for t in cat.topics.values()]
    assert len(records) == len(set(records))
    assert all(n.endswith(".dlq") for n in cat.all_topic_names()[1::2])


def test_schemas_stay_backward_compatible_with_main():
    old = schemas_at("main", SCHEMAS_DIR.parent)
    if old is None:
        pytest.skip("no schemas committed on main yet")
    assert incompatibilities(old, load_schemas()) == []


R_V1 = {"type": "record", "name": "R", "namespace": "pilothouse.t", "fields": [{"name": "a", "type": "string"}]}


def two_versions(tmp_path: Path, added_field: dict) -> tuple[Path, Path]:
    """Schema folders ``old`` (R with field a) and ``new`` (R with ``added_field`` too)."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for d, rec in ((old_dir, R_V1), (new_dir, {**R_V1, "fields": R_V1["fields"] + [added_field]})):
        d.mkdir()
        (d / "R.avsc").write_text(json.dumps(rec))
    return old_dir, new_dir


def test_compatibility_check_detects_a_breaking_change(tmp_path: Path):
    old_dir, new_dir = two_versions(tmp_path, {"name": "b", "type": "long"})  # added without a default
    problems = incompatibilities(SchemaSet(old_dir), SchemaSet(new_dir))
    assert problems and "pilothouse.t.R" in problems[0]
    rec_added_with_default = {**R_V1, "fields": R_V1["fields"] + [{"name": "b", "type": "long", "default": 0}]}
    (new_dir / "R.avsc").write_text(json.dumps(rec_added_with_default))
    assert incompatibilities(SchemaSet(old_dir), SchemaSet(new_dir)) == []


def test_a_record_written_with_an_earlier_version_still_decodes_after_the_upgrade(tmp_path: Path):
    from pilothouse.bus.compatibility import record_history
    from pilothouse.bus.errors import DecodeError
    from pilothouse.bus.serde import Serde

    old_dir, new_dir = two_versions(tmp_path, {"name": "episode", "type": "int", "default": 1})
    old = SchemaSet(old_dir)
    written_before = Serde(old).encode_dict("pilothouse.t.R", {"a": "x"})
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        Serde(SchemaSet(new_dir)).decode(written_before)  # what an upgrade without the kept version does
    kept = record_history(old, SchemaSet(new_dir), new_dir / "history")
    assert [p.name for p in kept] == [f"R.{old.get('pilothouse.t.R').fingerprint.hex()}.json"]
    assert record_history(old, SchemaSet(new_dir), new_dir / "history") == []  # idempotent
    new = SchemaSet(new_dir)
    decoded = Serde(new).decode(written_before, expected="pilothouse.t.R")
    assert decoded.schema.name == "pilothouse.t.R" and decoded.data == {"a": "x", "episode": 1}
    assert [h.path.name for h in new.history()] == [kept[0].name]
    kept[0].rename(new_dir / "history" / "R.0000000000000000.json")
    with pytest.raises(SchemaError, match="file name must be"):
        SchemaSet(new_dir)


def test_every_kept_earlier_version_is_readable_by_the_current_schemas():
    from pilothouse.bus.compatibility import unreadable

    schemas = load_schemas()
    assert schemas.history(), "schemas/history keeps the versions changed since the first release"
    for h in schemas.history():
        assert h.fingerprint != schemas.get(h.name).fingerprint
        assert unreadable(h.name, h.expanded, schemas) == [], h.path.name
