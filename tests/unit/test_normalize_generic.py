"""Generic JSON webhook: declarative mapping rules, checked at load time, applied to a few payload shapes, and
failing loudly (never inventing an id) when a payload does not carry what the rules name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from pilothouse.bus.errors import ConfigurationError
from pilothouse.sensing.mapping import MappingConfigError, compile_path, load_mapping_rules
from pilothouse.sensing.normalize import INVISIBLE_NOTE, Limits, MalformedPayload, label_fingerprint, normalize

GENERIC = Path(__file__).resolve().parents[1] / "fixtures" / "alert-payloads" / "pilothouse-authored" / "generic"
RECEIVED = 1_800_000_000_000


def rules(name: str):
    return load_mapping_rules((GENERIC / f"{name}.rules.yaml").read_text())


def payload(name: str) -> Any:
    return orjson.loads((GENERIC / f"{name}.payload.json").read_bytes())


def run(name: str, doc: Any, **kw):
    return normalize("generic", orjson.dumps(doc), rules(name), received_at_ms=RECEIVED, **kw)


# ------------------------------------------------------------------------------------------------- shapes

def test_every_rules_file_loads_and_has_a_payload():
    names = sorted(p.name.removesuffix(".rules.yaml") for p in GENERIC.glob("*.rules.yaml"))
    assert names == ["batch", "datadog", "deploy", "opsgenie"]
    for name in names:
        assert rules(name).name
        assert (GENERIC / f"{name}.payload.json").exists()


def test_datadog_shape():
    doc = payload("datadog")
    (alert,) = run("datadog", doc)
    assert alert.fingerprint == doc["aggreg_key"]  # the source's own id, verbatim
    assert (alert.status, alert.severity) == ("firing", "error")  # Triggered, P2
    assert alert.summary == doc["title"] and alert.entity == doc["hostname"] and alert.service == "checkout"
    assert alert.starts_at_ms == int(doc["date"])
    assert alert.labels == {"env": "production", "service": "checkout", "team": "payments", "monitor": "true"}
    assert alert.annotations == {"body": doc["body"], "event_type": doc["event_type"], "org": doc["org"]["name"]}
    assert alert.links == [doc["link"]]
    doc["transition"] = "Recovered"
    doc["priority"] = "P9"  # unmapped severity with a default: unknown, as the rules say
    (alert,) = run("datadog", doc)
    assert (alert.status, alert.severity) == ("resolved", "unknown")


def test_opsgenie_shape():
    doc = payload("opsgenie")
    (alert,) = run("opsgenie", doc)
    assert alert.fingerprint == "rabbitmq-orders-backlog"
    assert (alert.status, alert.severity) == ("resolved", "warning")  # Close, P3
    assert alert.service == "orders"  # path with a quoted key: alert.details["service"]
    assert alert.labels == {"action": "Close", "team": "platform", "integration": "Pilothouse webhook"}
    assert alert.annotations["queue"] == "orders" and alert.annotations["depth"] == "12034"
    assert orjson.loads(alert.annotations["tags"]) == ["rabbitmq", "orders"]  # arrays kept as JSON text
    assert alert.starts_at_ms == doc["alert"]["createdAt"]
    doc["action"] = "Create"
    del doc["alert"]["entity"]  # entity has a default
    (alert,) = run("opsgenie", doc)
    assert alert.status == "firing" and alert.entity == ""


def test_batch_shape_with_items_and_a_computed_fingerprint():
    doc = payload("batch")
    out = run("batch", doc)
    assert [a.entity for a in out] == ["lb-1", "lb-2", "db-1"]
    assert [a.status for a in out] == ["firing", "resolved", "firing"]  # JSON booleans map through "true"/"false"
    assert [a.severity for a in out] == ["warning", "warning", "critical"]
    assert out[1].starts_at_ms == 1793610001500
    assert len({a.fingerprint for a in out}) == 3 and all(a.fingerprint.startswith("sha256:") for a in out)
    # identity is host + check: a new message or time keeps it, another host changes it
    changed = copy.deepcopy(doc)
    changed["events"][0].update(message="certificate expires in 8 days", at="2026-11-03T10:00:00Z")
    changed["events"][1]["host"] = "lb-3"
    again = run("batch", changed)
    assert again[0].fingerprint == out[0].fingerprint
    assert again[1].fingerprint != out[1].fingerprint


def test_deploy_change_event():
    doc = payload("deploy")
    (record,) = run("deploy", doc)
    assert record.kind == "change" and record.source == "generic:deploys"
    assert (record.service, record.entity, record.severity) == ("checkout", "prod-eu-1", "info")
    assert record.timestamp_ms == 1762077492250  # epoch seconds with a fraction
    assert record.body == doc["deployment"]["description"]
    assert record.attributes == {"version": "v2.14.1", "environment": "production", "actor": "ci-bot",
                                 "commit": "9f3c2ab"}  # commits[-1]: the last element


def test_top_level_array_is_a_list_of_items():
    spec = {"name": "arr", "fields": {"fingerprint": {"path": "id"}, "status": {"const": "firing"},
                                       "summary": "text"}}
    body = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]
    out = normalize("generic", body, spec, received_at_ms=RECEIVED)
    assert [(a.fingerprint, a.summary, a.starts_at_ms) for a in out] == [("a", "one", RECEIVED), ("b", "two", RECEIVED)]


def test_fingerprint_from_labels():
    spec = {"name": "by-labels", "fields": {"fingerprint": {"from_labels": True}, "status": {"const": "firing"},
                                             "summary": "msg", "labels": "tags"}}
    (alert,) = normalize("generic", {"msg": "m", "tags": {"b": "2", "a": 1}}, spec, received_at_ms=RECEIVED)
    assert alert.labels == {"b": "2", "a": "1"}
    assert alert.fingerprint == label_fingerprint("generic", {"a": "1", "b": "2"}, "by-labels")
    with pytest.raises(MalformedPayload, match="maps to no labels"):
        normalize("generic", {"msg": "m"}, spec, received_at_ms=RECEIVED)


def test_invisible_characters_in_mapped_fields_are_removed_and_counted():
    doc = payload("datadog")
    doc["title"] = "\u200b" + doc["title"] + "\U000e0041"
    (alert,) = run("datadog", doc)
    assert alert.summary == payload("datadog")["title"]
    assert alert.annotations[INVISIBLE_NOTE] == "2"


# ------------------------------------------------------------------------------------------------- fails loudly

@pytest.mark.parametrize("name,mutate,path,reason", [
    ("datadog", lambda d: d.pop("aggreg_key"), "aggreg_key",
     "the fingerprint field 'aggreg_key' configured in mapping 'datadog' is missing"),
    ("datadog", lambda d: d.update(aggreg_key=None), "aggreg_key", "is missing"),
    ("datadog", lambda d: d.update(aggreg_key=""), "aggreg_key", "fingerprint field of mapping 'datadog' is empty"),
    ("datadog", lambda d: d.update(aggreg_key={"k": 1}), "aggreg_key", "expected a scalar, got object"),
    ("datadog", lambda d: d.update(transition="Snoozed"), "transition",
     "status value 'Snoozed' is not in the value map of mapping 'datadog'"),
    ("datadog", lambda d: d.pop("transition"), "transition", "status: the field configured in mapping 'datadog'"),
    ("datadog", lambda d: d.pop("title"), "title", "summary: the field configured"),
    ("datadog", lambda d: d.update(date="yesterday"), "date", "expected a number (epoch_ms)"),
    ("datadog", lambda d: d.update(date=1762077900000 * 1_000_000), "date", "after year 9999"),
    ("datadog", lambda d: d.update(link="javascript:alert(1)"), "link", "not an absolute http(s) URL"),
    ("datadog", lambda d: d.update(tags=",".join(f"t{i}:v" for i in range(200))), "tags",
     "200 labels exceed the limit of 128"),
    ("batch", lambda d: d["events"][1].pop("check"), "events[1].check",
     "the fingerprint field 'check' configured in mapping 'inhouse-checker' is missing"),
    ("batch", lambda d: d.pop("events"), "events", "the items path 'events' of mapping 'inhouse-checker' is missing"),
    ("batch", lambda d: d.update(events=[]), "events", "empty list"),
    ("batch", lambda d: d["events"].append("x"), "events[3]", "expected object, got string"),
    ("batch", lambda d: d["events"][0].update(at="2026-11-02T10:00:00"), "events[0].at", "with a time zone"),
    ("batch", lambda d: d["events"][2].update(host=["db-1"]), "events[2].host", "expected a scalar, got array"),
    ("opsgenie", lambda d: d["alert"].update(priority="urgent"), "alert.priority",
     "severity value 'urgent' is not in the value map"),
    ("deploy", lambda d: d["deployment"].pop("description"), "deployment.description", "body: the field"),
    ("deploy", lambda d: d["deployment"].update(finished_at=-1), "deployment.finished_at", "non-negative"),
])
def test_payload_that_does_not_fit_the_rules_is_refused(name, mutate, path, reason):
    doc = payload(name)
    mutate(doc)
    with pytest.raises(MalformedPayload) as info:
        run(name, doc)
    assert info.value.path == path
    assert reason in info.value.reason


def test_item_limit():
    doc = payload("batch")
    with pytest.raises(MalformedPayload, match="3 items exceed the limit of 2"):
        run("batch", doc, limits=Limits(max_alerts=2))
    assert len(run("batch", doc, limits=Limits(max_alerts=3))) == 3


def test_generic_without_rules_is_a_configuration_error():
    with pytest.raises(MappingConfigError, match="needs mapping rules"):
        normalize("generic", b"{}", received_at_ms=RECEIVED)


# ------------------------------------------------------------------------------------------------- config errors

BASE = {"name": "x", "fields": {"fingerprint": {"path": "id"}, "status": {"const": "firing"}, "summary": "s"}}


def with_fields(**fields: Any) -> dict:
    spec = copy.deepcopy(BASE)
    spec["fields"].update(fields)
    return spec


@pytest.mark.parametrize("spec,where,reason", [
    ({**BASE, "name": None}, "name", "required: a name"),
    ({**BASE, "name": "Data Dog"}, "name", "lowercase letters"),
    ({**BASE, "kind": "incident"}, "kind", "'incident' is not a kind"),
    ({**BASE, "version": 2}, "rules", "unknown key 'version'"),
    ({"name": "x", "fields": {}}, "fields", "required"),
    ({"name": "x", "fields": {"status": {"const": "firing"}, "summary": "s"}}, "fields.fingerprint", "required"),
    ({"name": "x", "fields": {"fingerprint": "id", "summary": "s"}}, "fields.status", "required"),
    (with_fields(fingerprint={"path": "id", "default": "none"}), "fields.fingerprint", "may not have a default"),
    (with_fields(fingerprint={"const": "same"}), "fields.fingerprint", "every alert would share one id"),
    (with_fields(fingerprint={"path": "id", "from": ["a"]}), "fields.fingerprint", "exactly one of"),
    (with_fields(fingerprint={"from": []}), "fields.fingerprint.from", "non-empty list"),
    (with_fields(fingerprint={"from_labels": True}), "fields.fingerprint", "needs a 'labels' rule"),
    (with_fields(status={"path": "state", "map": {"open": "fire"}}), "fields.status.map.open",
     "'fire' is not a status (firing|resolved)"),
    (with_fields(status={"path": "state", "default": "ok"}), "fields.status.default", "'ok' is not a status"),
    (with_fields(severity={"const": "sev9"}), "fields.severity.const", "'sev9' is not a severity"),
    (with_fields(severity={"path": "p", "map": {}}), "fields.severity.map", "non-empty object"),
    (with_fields(summary={"path": "a", "const": "b"}), "fields.summary", "exactly one of 'path' or 'const'"),
    (with_fields(summary={}), "fields.summary", "exactly one of 'path' or 'const'"),
    (with_fields(summary={"const": "b", "default": "c"}), "fields.summary", "only make sense with 'path'"),
    (with_fields(summary={"path": "a", "fmt": "x"}), "fields.summary", "unknown key 'fmt'"),
    (with_fields(summary=42), "fields.summary", "expected a path string"),
    (with_fields(summary="a..b"), "fields.summary.path", "empty segment at character 3"),
    (with_fields(summary="a["), "fields.summary.path", "bad bracket at character 2"),
    (with_fields(summary="a[x]"), "fields.summary.path", "bad bracket"),
    (with_fields(summary="a."), "fields.summary.path", "ends with a dot"),
    (with_fields(summary="$"), "fields.summary.path", "selects nothing"),
    (with_fields(summary="a b"), "fields.summary.path", "unexpected ' '"),
    (with_fields(summary=""), "fields.summary.path", "non-empty string"),
    (with_fields(summary="items[*].text"), "fields.summary.path", "[*] is not allowed here"),
    (with_fields(starts_at="ts"), "fields.starts_at", "needs 'format'"),
    (with_fields(starts_at={"path": "ts", "format": "iso"}), "fields.starts_at", "'iso' is not one of"),
    (with_fields(starts_at={"path": "ts", "format": "epoch_s", "default": "0"}), "fields.starts_at",
     "path and a format only"),
    (with_fields(service={"path": "svc", "format": "epoch_s"}), "fields.service", "only for starts_at"),
    (with_fields(body="b"), "fields.body", "not a field of kind 'alert'"),
    ({"name": "x", "kind": "change", "fields": {"status": "s", "body": "b"}}, "fields.status",
     "not a field of kind 'change'"),
    ({"name": "x", "kind": "change", "fields": {"service": "s"}}, "fields.body", "required for kind 'change'"),
    (with_fields(labels={"path": "t", "pairs_sep": ","}), "fields.labels", "go together"),
    (with_fields(labels={"path": "t", "pairs_sep": ",", "kv_sep": ","}), "fields.labels", "must differ"),
    (with_fields(labels={"fields": {}}), "fields.labels.fields", "non-empty object"),
    (with_fields(labels={}), "fields.labels", "set 'path' and/or 'fields'"),
    (with_fields(links=[]), "fields.links", "non-empty list"),
    (with_fields(links=["ok", "bad..path"]), "fields.links[1]", "empty segment"),
    ("name: [unclosed", "", "not valid YAML"),
    ("- just a list", "", "must be an object"),
])
def test_bad_rules_are_a_clear_configuration_error(spec, where, reason):
    with pytest.raises(MappingConfigError) as info:
        load_mapping_rules(spec)
    assert info.value.where == where
    assert reason in info.value.reason
    assert isinstance(info.value, ConfigurationError)


def test_rules_are_validated_before_any_payload_is_read():
    bad = with_fields(status={"path": "state", "map": {"open": "fire"}})
    with pytest.raises(MappingConfigError):
        normalize("generic", b"not even json", bad, received_at_ms=RECEIVED)


# ------------------------------------------------------------------------------------------------- paths

@pytest.mark.parametrize("text,doc,expected", [
    ("a.b", {"a": {"b": 1}}, [1]),
    ("$.a.b", {"a": {"b": 1}}, [1]),
    ("$a", {"a": 2}, [2]),
    ("a[1]", {"a": [10, 20]}, [20]),
    ("a[-1]", {"a": [10, 20]}, [20]),
    ("a[2]", {"a": [10, 20]}, []),
    ("a[*].b", {"a": [{"b": 1}, {"c": 2}, {"b": 3}]}, [1, 3]),
    ("a[*]", {"a": {"x": 1, "y": 2}}, [1, 2]),
    ('a["b.c"]', {"a": {"b.c": 5, "b": {"c": 6}}}, [5]),
    ("a['x y']", {"a": {"x y": 7}}, [7]),
    ('a["q\\"uote"]', {"a": {'q"uote': 8}}, [8]),
    ("a.b", {"a": None}, []),
    ("a.b", {"a": {"b": None}}, []),
    ("a.b", {"a": "string"}, []),
    ("a[0]", {"a": {"0": 1}}, []),
    ("app-name.v1", {"app-name": {"v1": 9}}, [9]),
])
def test_path_language(text, doc, expected):
    assert compile_path(text).find(doc) == expected


# ------------------------------------------------------------------------------------------------- command line

def test_cli_normalizes_a_file_and_reports_refusals(capsys, tmp_path):
    from pilothouse.sensing.normalize import main

    assert main(["normalize", "--source", "generic", "--rules", str(GENERIC / "batch.rules.yaml"),
                 "--received-at-ms", "5", str(GENERIC / "batch.payload.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [orjson.loads(line)["entity"] for line in lines] == ["lb-1", "lb-2", "db-1"]

    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"events": []}')
    assert main(["normalize", "--source", "generic", "--rules", str(GENERIC / "batch.rules.yaml"), str(bad)]) == 2
    err = orjson.loads(capsys.readouterr().err)
    assert err == {"error": "malformed_payload", "path": "events", "reason": "empty list: nothing to ingest"}

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("name: x\nfields: {fingerprint: {path: id, default: a}}\n")
    assert main(["check-rules", str(rules_file)]) == 3
    assert "every alert would share one id" in capsys.readouterr().err
    assert main(["check-rules", str(GENERIC / "deploy.rules.yaml")]) == 0
    assert "mapping 'deploys' (kind change" in capsys.readouterr().out
    assert main(["normalize", "--source", "grafana", str(tmp_path / "missing.json")]) == 1
