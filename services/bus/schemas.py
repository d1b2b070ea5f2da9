"""The Avro schemas in ``schemas/``: loading, cross-file name resolution, safety lint and fingerprints.

Each ``.avsc`` file defines one named type (a record, or an enum shared by several records). Records reference types
of other files by full name. For each record we build a self-contained *expanded* schema (every referenced named type
inlined at its first use), which is what fastavro parses, what the fingerprint is computed over (Avro's Parsing
Canonical Form, CRC-64-AVRO, as single-object encoding specifies) and what compatibility checks compare.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pilothouse.bus.errors import SchemaError

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


HISTORY_DIR_NAME = "history"  # schemas/history/<Name>.<fingerprint hex>.json: earlier versions, still readable


@dataclass(frozen=True)
class RecordSchema:
    """One named type, ready to use."""

    name: str  # full name, e.g. pilothouse.sensing.AlertReceived
    expanded: dict  # self-contained schema JSON
    parsed: Any  # fastavro parsed schema
    fingerprint: bytes  # 8-byte CRC-64-AVRO of the canonical form (little-endian, as single-object encoding)
    canonical: str
    path: Path


def _full_name(schema: dict, enclosing_ns: str | None) -> str:
    name = schema["name"]
    if "." in name:
        return name
    ns = schema.get("namespace", enclosing_ns)
    return f"{ns}.{name}" if ns else name


def _collect_named(schema: Any, ns: str | None, out: dict[str, dict]) -> None:
    """Collect every named type defined inline in ``schema`` (records, enums, fixed)."""
    if isinstance(schema, list):
        for s in schema:
            _collect_named(s, ns, out)
    elif isinstance(schema, dict):
        t = schema.get("type")
        if t in ("record", "error", "enum", "fixed"):
            full = _full_name(schema, ns)
            out[full] = schema
            inner_ns = full.rsplit(".", 1)[0] if "." in full else None
            for fld in schema.get("fields", []):
                _collect_named(fld["type"], inner_ns, out)
        elif t == "array":
            _collect_named(schema["items"], ns, out)
        elif t == "map":
            _collect_named(schema["values"], ns, out)
        elif isinstance(t, (dict, list)):
            _collect_named(t, ns, out)


def _expand(schema: Any, ns: str | None, named: dict[str, dict], seen: set[str]) -> Any:
    """Inline referenced named types (first use) so the schema stands alone."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return schema
        full = schema if "." in schema else (f"{ns}.{schema}" if ns else schema)
        if full in seen:
            return full
        if full not in named:
            raise SchemaError(f"unknown type {schema!r}")
        return _expand(named[full], None, named, seen)
    if isinstance(schema, list):
        return [_expand(s, ns, named, seen) for s in schema]
    if isinstance(schema, dict):
        t = schema.get("type")
        if t in ("record", "error", "enum", "fixed"):
            full = _full_name(schema, ns)
            if full in seen:
                return full
            seen.add(full)
            out = {k: v for k, v in schema.items() if k not in ("name", "namespace", "fields")}
            out["name"] = full
            if "fields" in schema:
                inner_ns = full.rsplit(".", 1)[0]
                out["fields"] = [
                    {**fld, "type": _expand(fld["type"], inner_ns, named, seen)} for fld in schema["fields"]
                ]
            return out
        if t == "array":
            return {**schema, "items": _expand(schema["items"], ns, named, seen)}
        if t == "map":
            return {**schema, "values": _expand(schema["values"], ns, named, seen)}
        if isinstance(t, (dict, list, str)) and t not in PRIMITIVES:
            return {**schema, "type": _expand(t, ns, named, seen)}
        return schema
    raise SchemaError(f"not a schema: {schema!r}")


def _min_encoded_size(schema: Any, named: dict[str, Any], stack: frozenset[str] = frozenset()) -> int:
    """Smallest number of bytes one value of ``schema`` can encode to."""
    if isinstance(schema, str):
        if schema == "null":
            return 0
        if schema in PRIMITIVES:
            return 1  # boolean 1 byte; varints >= 1; float 4; double 8; bytes/string: length varint
        if schema in stack:
            return 1
        return _min_encoded_size(named[schema], named, stack | {schema})
    if isinstance(schema, list):
        return 1  # union branch index varint
    t = schema["type"]
    if t in ("record", "error"):
        return sum(_min_encoded_size(f["type"], named, stack) for f in schema["fields"])
    if t == "fixed":
        return schema["size"]
    if t in ("enum", "array", "map"):
        return 1
    return _min_encoded_size(t, named, stack)


def lint(expanded: dict) -> list[str]:
    """Safety problems in an expanded schema.

    Containers whose items can encode to zero bytes (``array<null>``, arrays of empty records, ``fixed`` of size 0)
    let a few bytes of hostile input declare a billion elements that cost no input to "read": a memory bomb. With every
    item at least one byte long, decoding a message of N bytes can never produce more than N items.
    """
    problems: list[str] = []
    named: dict[str, dict] = {}
    _collect_named(expanded, None, named)

    def walk(s: Any, path: str) -> None:
        if isinstance(s, list):
            for i, b in enumerate(s):
                walk(b, f"{path}|{i}")
        elif isinstance(s, dict):
            t = s.get("type")
            if t in ("record", "error"):
                for f in s["fields"]:
                    walk(f["type"], f"{path}.{f['name']}")
            elif t == "array":
                if _min_encoded_size(s["items"], named) == 0:
                    problems.append(f"{path}: array items can encode to zero bytes (memory bomb)")
                walk(s["items"], f"{path}[]")
            elif t == "map":
                if _min_encoded_size(s["values"], named) == 0:
                    problems.append(f"{path}: map values can encode to zero bytes (memory bomb)")
                walk(s["values"], f"{path}{{}}")
            elif t == "fixed" and s.get("size", 0) == 0:
                problems.append(f"{path}: fixed of size 0")
            elif isinstance(t, (dict, list)):
                walk(t, path)

    walk(expanded, expanded.get("name", "?"))
    return problems


class SchemaSet:
    """Every schema under a directory, indexed by full name and by fingerprint."""

    def __init__(self, directory: Path = SCHEMAS_DIR):
        self.directory = Path(directory)
        raw: dict[str, tuple[dict, Path]] = {}
        files = sorted(self.directory.rglob("*.avsc"))
        if not files:
            raise SchemaError(f"no .avsc files under {self.directory}")
        named: dict[str, dict] = {}
        for p in files:
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise SchemaError(f"{p}: not valid JSON: {e}") from e
            if not isinstance(doc, dict) or "name" not in doc:
                raise SchemaError(f"{p}: a schema file defines exactly one named type")
            full = _full_name(doc, None)
            if p.stem != full.rsplit(".", 1)[-1]:
                raise SchemaError(f"{p}: file name must be the type name ({full.rsplit('.', 1)[-1]}.avsc)")
            if full in raw:
                raise SchemaError(f"{p}: {full} is defined twice")
            raw[full] = (doc, p)
            _collect_named(doc, None, named)
        self._by_name: dict[str, RecordSchema] = {}
        self._by_fp: dict[bytes, RecordSchema] = {}
        for full, (doc, p) in raw.items():
            expanded = _expand(copy.deepcopy(doc), None, named, set())
            problems = lint(expanded)
            if problems:
                raise SchemaError(f"{p}: " + "; ".join(problems))
            try:
                parsed = fastavro.parse_schema(expanded, _write_hint=False)
                canonical = to_parsing_canonical_form(expanded)
            except Exception as e:  # fastavro raises several types for invalid schemas
                raise SchemaError(f"{p}: {e}") from e
            fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))[::-1]  # little-endian on the wire
            rs = RecordSchema(full, expanded, parsed, fp, canonical, p)
            self._by_name[full] = rs
            self._by_fp[fp] = rs
        self._history: dict[bytes, RecordSchema] = {}
        for p in sorted((self.directory / HISTORY_DIR_NAME).glob("*.json")):
            rs = self._historical(p)
            if rs.fingerprint not in self._by_fp:
                self._history[rs.fingerprint] = rs

    def _historical(self, p: Path) -> RecordSchema:
        """An earlier version of a record (self-contained, as it was written): still decodable, resolved to the
        current version of the same name (Avro schema resolution: fields added since then take their defaults)."""
        try:
            expanded = json.loads(p.read_text())
            full = _full_name(expanded, None)
            parsed = fastavro.parse_schema(expanded, _write_hint=False)
            canonical = to_parsing_canonical_form(expanded)
        except Exception as e:  # noqa: BLE001 - JSON and fastavro raise several types for invalid schemas
            raise SchemaError(f"{p}: not a valid historical schema: {e}") from e
        if full not in self._by_name:
            raise SchemaError(f"{p}: {full} has no current version (a removed record cannot be read)")
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))[::-1]
        if p.name != history_file_name(full, fp):
            raise SchemaError(f"{p}: file name must be {history_file_name(full, fp)}")
        return RecordSchema(full, expanded, parsed, fp, canonical, p)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        """Every full type name."""
        return sorted(self._by_name)

    def get(self, name: str) -> RecordSchema:
        """The schema of ``name`` (full Avro name)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise SchemaError(f"unknown schema {name!r}") from None

    def by_fingerprint(self, fp: bytes) -> RecordSchema | None:
        """The current schema whose single-object-encoding fingerprint is ``fp``, if known."""
        return self._by_fp.get(fp)

    def writer_by_fingerprint(self, fp: bytes) -> RecordSchema | None:
        """The schema data with fingerprint ``fp`` was written with: a current one, or an earlier version kept in
        ``schemas/history`` (so records written before an upgrade still decode after it)."""
        return self._by_fp.get(fp) or self._history.get(fp)

    def history(self) -> list[RecordSchema]:
        """The earlier versions kept readable."""
        return sorted(self._history.values(), key=lambda r: (r.name, r.path.name))


def history_file_name(full_name: str, fp: bytes) -> str:
    """``<Name>.<fingerprint hex>.json`` of an earlier version of ``full_name``."""
    return f"{full_name.rsplit('.', 1)[-1]}.{fp.hex()}.json"


@lru_cache(maxsize=4)
def load_schemas(directory: Path = SCHEMAS_DIR) -> SchemaSet:
    """The schema set of ``directory`` (cached)."""
    return SchemaSet(directory)
