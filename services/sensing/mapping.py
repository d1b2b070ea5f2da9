"""Declarative mapping rules for the generic JSON webhook (sources we do not know).

A rule set is a YAML-able dict, validated once when it is loaded (at startup), so a bad rule is a clear
configuration error and never a surprise at 3 a.m. Applying the rules to a payload lives in
``pilothouse.sensing.normalize.normalize_generic``; this module holds the rule model and the small path language.

Example (a Datadog webhook built from its documented default template)::

    name: datadog
    kind: alert                      # alert -> NormalizedAlert; change -> TelemetryRecord(kind="change")
    items: null                      # optional path to a list of items; absent: the payload is one item
    fields:
      fingerprint: {path: aggreg_key}          # or {from: [host, title]} / {from_labels: true}; never a default
      status: {path: transition, map: {Triggered: firing, Recovered: resolved}}
      severity: {path: priority, map: {P1: critical, P2: error}, default: unknown}
      summary: title                            # a bare string is a path
      service: {const: payments}
      entity: {path: "host", default: ""}
      starts_at: {path: date, format: epoch_ms}
      labels: {path: tags}                      # an object of scalars ...
      annotations: {fields: {body: {path: body}}}   # ... and/or named fields
      links: [link, "urls[*]"]

Paths: dotted names, ``[n]`` (negative counts from the end), ``[*]`` (every element), ``["odd.key"]`` for keys
with dots or spaces; a leading ``$`` or ``$.`` is allowed. ``[*]`` is allowed only in ``items``, ``links`` and
``fingerprint.from`` paths, because a scalar field cannot take many values.

Nothing here does I/O; ``load_mapping_rules`` accepts an already parsed dict (or YAML text, parsed in memory).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pilothouse.bus.errors import ConfigurationError

STATUSES = ("firing", "resolved")
SEVERITIES = ("critical", "error", "warning", "info", "unknown")
TIME_FORMATS = ("rfc3339", "epoch_s", "epoch_ms", "epoch_ns")

ALERT_FIELDS = (
    "fingerprint", "status", "severity", "service", "entity", "summary",
    "starts_at", "ends_at", "labels", "annotations", "links",
)
CHANGE_FIELDS = (
    "service", "entity", "timestamp", "severity", "body", "attributes", "trace_id", "span_id",
)
_SCALAR_FIELDS = ("status", "severity", "service", "entity", "summary", "body", "trace_id", "span_id")
_TIME_FIELDS = ("starts_at", "ends_at", "timestamp")
_MAP_FIELDS = ("labels", "annotations", "attributes")
_REQUIRED = {"alert": ("fingerprint", "status", "summary"), "change": ("body",)}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class MappingConfigError(ConfigurationError):
    """A mapping rule set is invalid. ``where`` is the place in the rules (``fields.status.map``)."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where


# ---------------------------------------------------------------------------------------------------- paths

class _Wildcard:
    __slots__ = ()

    def __repr__(self) -> str:
        return "[*]"


WILDCARD = _Wildcard()
Step = str | int | _Wildcard

_SEG_NAME = re.compile(r"[A-Za-z0-9_@$\-]+")
_SEG_INDEX = re.compile(r"\[(-?\d+)\]")
_SEG_QUOTED = re.compile(r"""\[(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\]""")


@dataclass(frozen=True, slots=True)
class JsonPath:
    """A compiled dotted path. ``text`` is what the rules said, kept for error messages."""

    text: str
    steps: tuple[Step, ...]

    @property
    def is_multi(self) -> bool:
        return any(s is WILDCARD for s in self.steps)

    def find(self, doc: Any) -> list[Any]:
        """All values the path reaches (``None`` values count as absent). Empty list: nothing there."""
        current = [doc]
        for step in self.steps:
            nxt: list[Any] = []
            for value in current:
                if step is WILDCARD:
                    if isinstance(value, list):
                        nxt.extend(value)
                    elif isinstance(value, dict):
                        nxt.extend(value.values())
                elif isinstance(step, int):
                    if isinstance(value, list) and -len(value) <= step < len(value):
                        nxt.append(value[step])
                elif isinstance(value, dict) and step in value:
                    nxt.append(value[step])
            current = nxt
            if not current:
                return []
        return [v for v in current if v is not None]


def compile_path(text: Any, where: str = "") -> JsonPath:
    """Compile ``a.b[0]["c.d"][*]``; raise MappingConfigError with the position of the first bad character."""
    if not isinstance(text, str) or not text.strip():
        raise MappingConfigError("a path must be a non-empty string", where)
    s = text.strip()
    pos = 0
    if s.startswith("$"):
        pos = 1
        if s[pos:pos + 1] == ".":
            pos += 1
    steps: list[Step] = []
    expect_name = True  # at the start or after a dot a bare name (or a bracket) may follow
    while pos < len(s):
        ch = s[pos]
        if ch == "[":
            if s.startswith("[*]", pos):
                steps.append(WILDCARD)
                pos += 3
            elif m := _SEG_INDEX.match(s, pos):
                steps.append(int(m.group(1)))
                pos = m.end()
            elif m := _SEG_QUOTED.match(s, pos):
                raw = m.group(1) if m.group(1) is not None else m.group(2)
                steps.append(re.sub(r"\\(.)", r"\1", raw))
                pos = m.end()
            else:
                raise MappingConfigError(f"bad bracket at character {pos + 1} of path {text!r}", where)
            expect_name = False
        elif ch == ".":
            if expect_name:
                raise MappingConfigError(f"empty segment at character {pos + 1} of path {text!r}", where)
            pos += 1
            expect_name = True
            if pos == len(s):
                raise MappingConfigError(f"path {text!r} ends with a dot", where)
        elif expect_name and (m := _SEG_NAME.match(s, pos)):
            steps.append(m.group(0))
            pos = m.end()
            expect_name = False
        else:
            raise MappingConfigError(f"unexpected {ch!r} at character {pos + 1} of path {text!r}", where)
    if not steps:
        raise MappingConfigError(f"path {text!r} selects nothing (the whole document is not a field)", where)
    return JsonPath(text, tuple(steps))


# ---------------------------------------------------------------------------------------------------- rules

@dataclass(frozen=True, slots=True)
class FieldRule:
    """One output field: a path (with optional default, value map, time format) or a constant."""

    path: JsonPath | None = None
    const: str | None = None
    default: str | None = None
    value_map: Mapping[str, str] | None = None
    time_format: str | None = None


@dataclass(frozen=True, slots=True)
class FingerprintRule:
    """``path``: the source's own id, used verbatim. ``from_paths``: SHA-256 over those values.
    ``from_labels``: SHA-256 over the sorted mapped labels. Exactly one is set; there is no default on purpose:
    a payload that lacks the configured fields is refused, never given a random or shared id."""

    path: JsonPath | None = None
    from_paths: tuple[JsonPath, ...] = ()
    from_labels: bool = False


@dataclass(frozen=True, slots=True)
class MapRule:
    """labels / annotations / attributes: an object found at ``path`` and/or named ``fields``. With
    ``pairs_sep`` (and ``kv_sep``) the value at ``path`` may instead be a string of pairs such as Datadog's
    ``$TAGS`` (``env:prod,team:payments``); a pair without the separator becomes ``name=true``."""

    path: JsonPath | None = None
    fields: Mapping[str, FieldRule] | None = None
    pairs_sep: str | None = None
    kv_sep: str | None = None


@dataclass(frozen=True, slots=True)
class MappingRules:
    name: str
    kind: Literal["alert", "change"]
    items: JsonPath | None
    fingerprint: FingerprintRule | None
    scalars: Mapping[str, FieldRule]
    times: Mapping[str, FieldRule]
    maps: Mapping[str, MapRule]
    links: tuple[JsonPath, ...]

    def fields_used(self) -> Iterator[str]:
        yield from self.scalars
        yield from self.times
        yield from self.maps
        if self.fingerprint:
            yield "fingerprint"
        if self.links:
            yield "links"


def _check_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise MappingConfigError(f"unknown key {key!r} (allowed: {', '.join(allowed)})", where)


def _scalar_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise MappingConfigError(f"expected a string or number, got {type(value).__name__}", where)


def _single_path(text: Any, where: str) -> JsonPath:
    path = compile_path(text, where)
    if path.is_multi:
        raise MappingConfigError(f"[*] is not allowed here: this field takes one value (path {path.text!r})", where)
    return path


def _field_rule(field: str, spec: Any, where: str) -> FieldRule:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise MappingConfigError("expected a path string or an object with path/const", where)
    _check_keys(spec, ("path", "const", "default", "map", "format"), where)
    if ("path" in spec) == ("const" in spec):
        raise MappingConfigError("set exactly one of 'path' or 'const'", where)
    if "const" in spec and ("default" in spec or "map" in spec):
        raise MappingConfigError("'default' and 'map' only make sense with 'path'", where)
    time_format = spec.get("format")
    if field in _TIME_FIELDS:
        if "path" in spec and time_format is None:
            raise MappingConfigError(f"a time field needs 'format' ({', '.join(TIME_FORMATS)})", where)
        if time_format is not None and time_format not in TIME_FORMATS:
            raise MappingConfigError(f"format {time_format!r} is not one of {', '.join(TIME_FORMATS)}", where)
    elif time_format is not None:
        raise MappingConfigError("'format' is only for starts_at / ends_at / timestamp", where)
    value_map = None
    if "map" in spec:
        raw_map = spec["map"]
        if not isinstance(raw_map, Mapping) or not raw_map:
            raise MappingConfigError("'map' must be a non-empty object of source value -> output value", f"{where}.map")
        value_map = {_scalar_text(k, f"{where}.map"): _scalar_text(v, f"{where}.map.{k}") for k, v in raw_map.items()}
    allowed = STATUSES if field == "status" else SEVERITIES if field == "severity" else None
    rule = FieldRule(
        path=_single_path(spec["path"], f"{where}.path") if "path" in spec else None,
        const=_scalar_text(spec["const"], f"{where}.const") if "const" in spec else None,
        default=_scalar_text(spec["default"], f"{where}.default") if "default" in spec else None,
        value_map=value_map,
        time_format=time_format,
    )
    if allowed is not None:
        for label, value in (("const", rule.const), ("default", rule.default)):
            if value is not None and value not in allowed:
                raise MappingConfigError(f"{value!r} is not a {field} ({'|'.join(allowed)})", f"{where}.{label}")
        for src, value in (value_map or {}).items():
            if value not in allowed:
                raise MappingConfigError(f"{value!r} is not a {field} ({'|'.join(allowed)})", f"{where}.map.{src}")
    if field in _TIME_FIELDS and (rule.const is not None or rule.default is not None or rule.value_map):
        raise MappingConfigError("a time field takes a path and a format only (no const, default or map)", where)
    return rule


def _fingerprint_rule(spec: Any, where: str) -> FingerprintRule:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise MappingConfigError("expected {path: ...}, {from: [paths]} or {from_labels: true}", where)
    if "default" in spec or "const" in spec:
        raise MappingConfigError(
            "a fingerprint may not have a default or a constant: every alert would share one id", where)
    _check_keys(spec, ("path", "from", "from_labels"), where)
    chosen = [k for k in ("path", "from", "from_labels") if k in spec]
    if len(chosen) != 1:
        raise MappingConfigError("set exactly one of 'path', 'from' or 'from_labels'", where)
    if "path" in spec:
        return FingerprintRule(path=_single_path(spec["path"], f"{where}.path"))
    if "from" in spec:
        paths = spec["from"]
        if not isinstance(paths, list) or not paths:
            raise MappingConfigError("'from' must be a non-empty list of paths", f"{where}.from")
        return FingerprintRule(from_paths=tuple(compile_path(p, f"{where}.from[{i}]") for i, p in enumerate(paths)))
    if spec["from_labels"] is not True:
        raise MappingConfigError("'from_labels' must be true when given", f"{where}.from_labels")
    return FingerprintRule(from_labels=True)


def _map_rule(field: str, spec: Any, where: str) -> MapRule:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise MappingConfigError("expected a path string or {path: ..., fields: {...}}", where)
    _check_keys(spec, ("path", "fields", "pairs_sep", "kv_sep"), where)
    if "path" not in spec and "fields" not in spec:
        raise MappingConfigError("set 'path' and/or 'fields'", where)
    pairs_sep, kv_sep = spec.get("pairs_sep"), spec.get("kv_sep")
    if (pairs_sep is None) != (kv_sep is None) or (pairs_sep is not None and "path" not in spec):
        raise MappingConfigError("'pairs_sep' and 'kv_sep' go together, with 'path'", where)
    for key, sep in (("pairs_sep", pairs_sep), ("kv_sep", kv_sep)):
        if sep is not None and (not isinstance(sep, str) or not sep):
            raise MappingConfigError("a separator must be a non-empty string", f"{where}.{key}")
    if pairs_sep is not None and pairs_sep == kv_sep:
        raise MappingConfigError("'pairs_sep' and 'kv_sep' must differ", where)
    fields = None
    if "fields" in spec:
        raw = spec["fields"]
        if not isinstance(raw, Mapping) or not raw:
            raise MappingConfigError("'fields' must be a non-empty object of name -> rule", f"{where}.fields")
        fields = {}
        for name, sub in raw.items():
            if not isinstance(name, str) or not name:
                raise MappingConfigError("a field name must be a non-empty string", f"{where}.fields")
            fields[name] = _field_rule(field, sub, f"{where}.fields.{name}")
    return MapRule(path=_single_path(spec["path"], f"{where}.path") if "path" in spec else None, fields=fields,
                   pairs_sep=pairs_sep, kv_sep=kv_sep)


def load_mapping_rules(spec: Mapping[str, Any] | str) -> MappingRules:
    """Validate a rule set (a dict, or YAML text) and compile its paths. Raises MappingConfigError."""
    if isinstance(spec, str):
        import yaml  # parsing text in memory, not I/O; imported here so the module stays light

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise MappingConfigError(f"not valid YAML: {e}") from e
    if not isinstance(spec, Mapping):
        raise MappingConfigError("mapping rules must be an object with name, kind and fields")
    _check_keys(spec, ("name", "kind", "items", "fields"), "rules")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise MappingConfigError("required: a name of lowercase letters, digits, '.', '_', '-' (1-63)", "name")
    kind = spec.get("kind", "alert")
    if kind not in ("alert", "change"):
        raise MappingConfigError(f"{kind!r} is not a kind (alert|change)", "kind")
    items = compile_path(spec["items"], "items") if spec.get("items") is not None else None
    fields = spec.get("fields")
    if not isinstance(fields, Mapping) or not fields:
        raise MappingConfigError("required: an object of output field -> rule", "fields")
    allowed = ALERT_FIELDS if kind == "alert" else CHANGE_FIELDS
    fingerprint = None
    scalars: dict[str, FieldRule] = {}
    times: dict[str, FieldRule] = {}
    maps: dict[str, MapRule] = {}
    links: tuple[JsonPath, ...] = ()
    for field, rule in fields.items():
        where = f"fields.{field}"
        if field not in allowed:
            raise MappingConfigError(f"not a field of kind {kind!r} (allowed: {', '.join(allowed)})", where)
        if field == "fingerprint":
            fingerprint = _fingerprint_rule(rule, where)
        elif field in _TIME_FIELDS:
            times[field] = _field_rule(field, rule, where)
        elif field in _MAP_FIELDS:
            maps[field] = _map_rule(field, rule, where)
        elif field == "links":
            raw = [rule] if isinstance(rule, str) else rule
            if not isinstance(raw, list) or not raw:
                raise MappingConfigError("expected a path or a non-empty list of paths", where)
            links = tuple(compile_path(p, f"{where}[{i}]") for i, p in enumerate(raw))
        else:
            scalars[field] = _field_rule(field, rule, where)
    for field in _REQUIRED[kind]:
        if field not in fields:
            raise MappingConfigError(f"required for kind {kind!r}", f"fields.{field}")
    if fingerprint is not None and fingerprint.from_labels and "labels" not in maps:
        raise MappingConfigError("from_labels needs a 'labels' rule", "fields.fingerprint")
    return MappingRules(
        name=name, kind=kind, items=items, fingerprint=fingerprint,
        scalars=scalars, times=times, maps=maps, links=links,
    )
