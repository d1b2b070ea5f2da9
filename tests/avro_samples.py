"""Build a valid sample value for any Avro schema (test data for round trips; not used by the services)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

NOW = datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=timezone.utc)


def sample(schema: Any, named: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A deterministic sample value (first enum symbol, non-null union branch, one-element containers)."""
    named = {} if named is None else named
    if isinstance(schema, str):
        return {
            "string": "s", "long": 7, "int": 3, "double": 0.5, "float": 0.25, "boolean": True,
            "bytes": b"\x01", "null": None,
        }.get(schema) if schema in {"string", "long", "int", "double", "float", "boolean", "bytes", "null"} \
            else sample(named[schema], named, depth + 1)
    if isinstance(schema, list):
        branch = next((b for b in schema if b != "null"), "null")
        return sample(branch, named, depth)
    t = schema["type"]
    if schema.get("logicalType") == "timestamp-millis":
        return NOW
    if t == "record":
        named[schema["name"]] = schema
        return {f["name"]: sample(f["type"], named, depth + 1) for f in schema["fields"]}
    if t == "enum":
        named[schema["name"]] = schema
        return schema["symbols"][0]
    if t == "array":
        return [sample(schema["items"], named, depth + 1)]
    if t == "map":
        return {"k": sample(schema["values"], named, depth + 1)}
    if t == "fixed":
        return b"\x00" * schema["size"]
    return sample(t, named, depth)
