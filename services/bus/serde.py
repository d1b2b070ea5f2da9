"""Avro binary serialisation with the schema's identity on every message.

Two framings:

* **Avro single-object encoding** (default): ``C3 01`` + 8-byte CRC-64-AVRO fingerprint (little-endian) + body.
  The fingerprint names the schema; no registry is needed because every service ships the same ``schemas/``.
* **Confluent wire format** when a schema registry URL is configured: ``00`` + 4-byte big-endian schema id + body.
  Schemas are registered under ``<topic>-value``; ids read back from the registry must resolve to a schema we know
  (by canonical fingerprint), otherwise the message is refused.

Decoding is bounded: the message size is checked first, every schema was linted so no container item encodes to zero
bytes (a few hostile bytes cannot declare a billion free elements), and the body must be consumed exactly.
"""

from __future__ import annotations

import io
import struct
from datetime import datetime, timedelta, timezone
from collections.abc import Mapping, Sequence
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from pydantic import ValidationError

from pilothouse.bus.errors import DecodeError, OversizedMessage, RecordInvalid, RetryableError, SchemaError
from pilothouse.bus.records import RECORDS, AvroRecord
from pilothouse.bus.schemas import RecordSchema, SchemaSet, load_schemas

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


class _Writer:
    """Writes records of one schema: with fastavro's parsed schema, or, where the schema's only logical types are
    timestamps in its own fields (the case of every pilothouse record), with the same schema read as plain longs,
    after turning those fields' datetimes into milliseconds here. The bytes are the same; fastavro's logical-type
    path cost 17 of the 28 us of writing an AlertReceived."""

    __slots__ = ("parsed", "plain", "stamps")

    def __init__(self, schema: dict, parsed: Any, named: dict) -> None:
        from fastavro import parse_schema

        self.parsed = parsed
        self.stamps = _timestamp_fields(schema)
        self.plain = None
        if self.stamps is not None:
            try:
                self.plain = parse_schema(_without_logical_types(schema), named)
            except Exception:  # noqa: BLE001 - e.g. it names a type another part defined: fastavro converts
                self.stamps = None

    def write(self, buf: io.BytesIO, obj: dict) -> None:
        if self.stamps is not None:
            converted = None
            for name in self.stamps:
                value = obj.get(name)
                if isinstance(value, datetime):
                    if value.tzinfo is None:  # local time: fastavro's own conversion decides what it means
                        converted = None
                        break
                    if converted is None:
                        converted = dict(obj)
                    converted[name] = (value - _EPOCH) // _MS
            else:
                schemaless_writer(buf, self.plain, obj if converted is None else converted,
                                  strict_allow_default=True)
                return
        schemaless_writer(buf, self.parsed, obj, strict_allow_default=True)


_SpliceRuns = list[tuple[_Writer | None, list[str], str | None]]


def _timestamp_fields(schema: Any) -> tuple[str, ...] | None:
    """The names of a record schema's timestamp-millis fields (nullable ones too); None if it is not a record or a
    logical type sits anywhere else (inside an array, a map, a nested record) or is not a timestamp-millis."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    names = []
    for f in schema["fields"]:
        alternatives = f["type"] if isinstance(f["type"], list) else [f["type"]]
        stamp = [isinstance(a, dict) and a.get("type") == "long" and a.get("logicalType") == "timestamp-millis"
                 for a in alternatives]
        if _has_logical_type([a for a, is_stamp in zip(alternatives, stamp) if not is_stamp]):
            return None
        if any(stamp):
            names.append(f["name"])
    return tuple(names)


def _has_logical_type(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "logicalType" in schema or any(_has_logical_type(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_logical_type(v) for v in schema)
    return False


class Decoded:
    """A decoded message: which schema, the plain dict, and (built on first use) its pydantic model."""

    __slots__ = ("schema", "data", "_record")

    def __init__(self, schema: RecordSchema, data: dict):
        self.schema = schema
        self.data = data
        self._record: AvroRecord | None = None

    @property
    def record(self) -> AvroRecord:
        """The pydantic twin; raises DecodeError if the decoded data violates a model constraint."""
        if self._record is None:
            try:
                self._record = RECORDS[self.schema.name].model_validate(self.data)
            except ValidationError as e:
                raise DecodeError(f"{self.schema.name}: decoded record is invalid: {e.errors()[0]['msg']}") from e
        return self._record


class Serde:
    """Encode pydantic records to framed Avro bytes and back, with size bounds and validation."""

    def __init__(
        self,
        schemas: SchemaSet | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        registry: Any | None = None,
    ):
        """``registry``: a confluent_kafka SchemaRegistryClient (``mock://`` works) to use the Confluent framing."""
        self.schemas = schemas or load_schemas()
        self.max_message_bytes = max_message_bytes
        self.registry = registry
        self._ids_by_name: dict[tuple[str, str], int] = {}
        self._schema_by_id: dict[int, RecordSchema] = {}
        self._splits: dict[tuple[str, frozenset[str]], Any] = {}
        self._writers: dict[str, _Writer] = {}
        self._projections: dict[tuple[bytes, tuple[str, ...], bool], tuple[Any, Any]] = {}

    # -- encoding ---------------------------------------------------------------------------------------------
    def encode(self, record: AvroRecord, *, topic: str | None = None) -> bytes:
        """Serialise ``record``; raises RecordInvalid / OversizedMessage."""
        return self.encode_dict(type(record).AVRO_NAME, record.model_dump(), topic=topic)

    def encode_dict(self, name: str, obj: dict, *, topic: str | None = None) -> bytes:
        """Serialise a plain dict against schema ``name`` (the hot path: no pydantic round trip)."""
        rs = self.schemas.get(name)
        buf = self._framed(rs, topic)
        try:
            self._writer(rs).write(buf, obj)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RecordInvalid(f"{rs.name}: {e}") from e
        return self._bounded(rs, buf.getvalue())

    def _writer(self, rs: RecordSchema) -> _Writer:
        writer = self._writers.get(rs.name)
        if writer is None:
            writer = self._writers[rs.name] = _Writer(rs.expanded, rs.parsed, {})
        return writer

    def _framed(self, rs: RecordSchema, topic: str | None) -> io.BytesIO:
        """A buffer holding the framing header of a record of ``rs``."""
        buf = io.BytesIO()
        if self.registry is not None:
            if topic is None:
                raise RecordInvalid("the Confluent wire format needs the topic (subject <topic>-value)")
            buf.write(CONFLUENT_MAGIC + struct.pack(">I", self._registered_id(topic, rs)))
        else:
            buf.write(SINGLE_OBJECT_MAGIC + rs.fingerprint)
        return buf

    def _bounded(self, rs: RecordSchema, data: bytes) -> bytes:
        if len(data) > self.max_message_bytes:
            raise OversizedMessage(
                f"{rs.name} encodes to {len(data)} bytes, above the {self.max_message_bytes}-byte limit"
            )
        return data

    def encode_item(self, name: str, field: str, obj: Any) -> bytes:
        """The Avro body of one item of the array field ``field`` of record ``name``: a piece for
        :meth:`encode_spliced`. Raises RecordInvalid."""
        _, items = self._splice_plan(name, (field,))
        buf = io.BytesIO()
        try:
            items[field].write(buf, obj)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RecordInvalid(f"{name}.{field}[]: {e}") from e
        return buf.getvalue()

    def encode_spliced(self, name: str, obj: dict, spliced: Mapping[str, Sequence[bytes]], *,
                       topic: str | None = None) -> bytes:
        """Serialise ``obj`` with its array fields named in ``spliced`` given as items already encoded by
        :meth:`encode_item` (field -> items): the same bytes as :meth:`encode_dict` of the whole record (Avro writes
        a record as its fields in order and an array as count, items, 0). For records that carry long, slowly
        changing lists (an incident's evidence and fingerprints): each item is encoded once, not once per version.
        Raises RecordInvalid / OversizedMessage."""
        rs = self.schemas.get(name)
        runs, _ = self._splice_plan(name, tuple(spliced))
        buf = self._framed(rs, topic)
        try:
            for writer, names, field in runs:
                if writer is not None:
                    writer.write(buf, {k: obj[k] for k in names if k in obj})
                if field is not None:
                    items = spliced[field]
                    if items:
                        buf.write(_zigzag_varint(len(items)))
                        buf.write(b"".join(items))
                    buf.write(b"\x00")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RecordInvalid(f"{rs.name}: {e}") from e
        return self._bounded(rs, buf.getvalue())

    def _splice_plan(self, name: str, spliced: tuple[str, ...]) -> tuple[_SpliceRuns, dict[str, _Writer]]:
        """How to write record ``name`` with the array fields ``spliced`` given as encoded items (cached): runs of
        (writer of the plain fields before a spliced field, their names, that field; None after the last one), and
        the item writer of each spliced field."""
        key = (name, frozenset(spliced))
        if key not in self._splits:
            from fastavro import parse_schema

            rs = self.schemas.get(name)
            fields = rs.expanded["fields"]
            for field in spliced:
                at = [f for f in fields if f["name"] == field]
                if not at or not isinstance(at[0]["type"], dict) or at[0]["type"].get("type") != "array":
                    raise RecordInvalid(f"{name} has no array field {field!r}")
            namespace, base = rs.name.rsplit(".", 1)
            named: dict = {}  # shared, in field order: a later part may use a type an earlier part defined
            plain: dict = {}  # the same, for the writers' schemas without logical types
            runs: _SpliceRuns = []
            items: dict[str, _Writer] = {}
            run: list[dict] = []
            for f in [*fields, None]:
                if f is not None and f["name"] not in spliced:
                    run.append(f)
                    continue
                writer = None
                if run:
                    part = {"type": "record", "name": f"{base}__spliced__{len(runs)}", "namespace": namespace,
                            "fields": run}
                    writer = _Writer(part, parse_schema(part, named), plain)
                runs.append((writer, [r["name"] for r in run], None if f is None else f["name"]))
                run = []
                if f is not None:
                    item_schema = f["type"]["items"]
                    items[f["name"]] = _Writer(item_schema, parse_schema(item_schema, named), plain)
            self._splits[key] = (runs, items)
        return self._splits[key]

    def _registered_id(self, topic: str, rs: RecordSchema) -> int:
        key = (topic, rs.name)
        if key not in self._ids_by_name:
            from confluent_kafka.schema_registry import Schema  # only with a registry configured
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                sid = self.registry.register_schema(f"{topic}-value", Schema(rs.canonical, "AVRO"))
            except SchemaRegistryError as e:
                raise RetryableError(f"schema registry refused {rs.name} for {topic}: {e}") from e
            self._ids_by_name[key] = sid
            self._schema_by_id[sid] = rs
        return self._ids_by_name[key]

    # -- decoding ---------------------------------------------------------------------------------------------
    def decode(self, data: bytes | None, *, expected: str | None = None) -> Decoded:
        """Parse framed bytes; raises DecodeError / OversizedMessage with a precise reason.

        ``expected``: the full Avro name the topic carries; any other known schema is refused too.
        """
        writer, rs, offset = self._header(data, expected)
        return Decoded(rs, _read_body(data, offset, writer.parsed, None if writer is rs else rs.parsed, rs.name))

    def _header(self, data: bytes | None, expected: str | None) -> tuple[RecordSchema, RecordSchema, int]:
        """The writer's schema, the current version of it (a record an earlier version wrote resolves to it) and
        where the body starts; refuses tombstones, oversized messages and a record other than ``expected``."""
        if data is None:
            raise DecodeError("null value (tombstone) where a record was expected")
        if len(data) > self.max_message_bytes:
            raise OversizedMessage(f"message of {len(data)} bytes is above the {self.max_message_bytes}-byte limit")
        writer, offset = self._resolve_schema(data)
        rs = self.schemas.get(writer.name)
        if expected is not None and rs.name != expected:
            raise DecodeError(f"record {rs.name} is not the type this topic carries ({expected})")
        return writer, rs, offset

    def decode_fields(self, data: bytes, fields: tuple[str | tuple[str, tuple], ...], *, expected: str | None = None,
                      millis: bool = False) -> dict:
        """Only ``fields`` of a framed record, as a dict: Avro schema resolution skips the other fields without
        building them (a reader that needs an incident's alert fingerprints, not its evidence). A field given as
        ``(name, subfields)`` is a record, or an array of records, read with only those of its fields (the same
        rules, nested). Raises DecodeError (also for a record other than ``expected``, as :meth:`decode`).

        ``millis``: timestamps as the integers on the wire (milliseconds since the epoch), not datetimes (every
        logical type as its underlying Avro value: the schemas use only timestamp-millis); the
        datetime conversion (fastavro's, in Python) was two thirds of decoding an AlertReceived (31 -> 14 us)."""
        writer, _, offset = self._header(data, expected)
        key = (writer.fingerprint, fields, millis)
        if key not in self._projections:
            from fastavro import parse_schema

            name = writer.name.rsplit(".", 1)
            full = writer.expanded
            try:
                projection = {**_projection(full, fields), "name": name[-1], "namespace": name[0]}
                if millis:
                    full, projection = _without_logical_types(full), _without_logical_types(projection)
                self._projections[key] = (parse_schema(full) if millis else writer.parsed, parse_schema(projection))
            except Exception as e:  # noqa: BLE001 - e.g. a kept field names a type defined in a skipped one
                raise DecodeError(f"{writer.name}: cannot project onto {fields}: {e}") from e
        body_writer, reader = self._projections[key]
        return _read_body(data, offset, body_writer, reader, writer.name)

    def _resolve_schema(self, data: bytes) -> tuple[RecordSchema, int]:
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError(f"single-object header truncated ({len(data)} bytes)")
            rs = self.schemas.writer_by_fingerprint(bytes(data[2:10]))
            if rs is None:
                raise DecodeError(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
            return rs, 10
        if data[:1] == CONFLUENT_MAGIC and self.registry is not None:
            if len(data) < 5:
                raise DecodeError(f"Confluent header truncated ({len(data)} bytes)")
            (sid,) = struct.unpack(">I", data[1:5])
            return self._schema_for_id(sid), 5
        raise DecodeError(f"unknown framing (first bytes {bytes(data[:2]).hex() or 'empty'})")

    def _schema_for_id(self, sid: int) -> RecordSchema:
        if sid not in self._schema_by_id:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                schema = self.registry.get_schema(sid)
            except SchemaRegistryError as e:
                raise DecodeError(f"schema id {sid} is not in the registry: {e}") from e
            from fastavro.schema import fingerprint as _fp
            from fastavro.schema import to_parsing_canonical_form

            import json

            try:
                canonical = to_parsing_canonical_form(json.loads(schema.schema_str))
            except (ValueError, SchemaError, Exception) as e:  # noqa: BLE001 - any parse failure is a decode error
                raise DecodeError(f"schema id {sid} is not valid Avro: {e}") from e
            rs = self.schemas.writer_by_fingerprint(bytes.fromhex(_fp(canonical, "CRC-64-AVRO"))[::-1])
            if rs is None:
                raise DecodeError(f"schema id {sid} is not one of our schemas")
            self._schema_by_id[sid] = rs
        return self._schema_by_id[sid]


def _zigzag_varint(n: int) -> bytes:
    """An Avro long (zigzag, then base-128 varint)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _projection(record: dict, fields: tuple[str | tuple[str, tuple], ...]) -> dict:
    """The reader schema of ``record`` (expanded) with only ``fields``; ``(name, subfields)`` projects a record or
    array-of-records field in turn. Raises ValueError for a field that cannot be projected so."""
    wanted = {f if isinstance(f, str) else f[0]: None if isinstance(f, str) else f[1] for f in fields}
    kept = []
    for f in record["fields"]:
        if f["name"] not in wanted:
            continue
        sub, t = wanted[f["name"]], f["type"]
        if sub is None:
            kept.append(f)
        elif isinstance(t, dict) and t.get("type") == "record":
            kept.append({**f, "type": _projection(t, sub)})
        elif isinstance(t, dict) and t.get("type") == "array" and isinstance(t["items"], dict) \
                and t["items"].get("type") == "record":
            kept.append({**f, "type": {**t, "items": _projection(t["items"], sub)}})
        else:
            raise ValueError(f"field {f['name']!r} is not a record or an array of records")
    return {**{k: v for k, v in record.items() if k in ("type", "name", "namespace")}, "fields": kept}


def _without_logical_types(schema: Any) -> Any:
    """A schema whose values read as their underlying Avro types (the bytes on the wire are the same)."""
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(v) for v in schema]
    return schema


def _read_body(data: bytes, offset: int, writer: Any, reader: Any, name: str) -> dict:
    """The record body at ``offset``, written with ``writer``, read as ``reader`` (None: the same); it must use
    every byte. Raises DecodeError."""
    buf = io.BytesIO(data)
    buf.seek(offset)
    try:
        obj = schemaless_reader(buf, writer, reader)
    except (EOFError, StopIteration, ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError,
            UnicodeDecodeError, struct.error) as e:
        raise DecodeError(f"{name}: body does not decode: {type(e).__name__}: {e}") from e
    if buf.tell() != len(data):
        raise DecodeError(f"{name}: {len(data) - buf.tell()} trailing bytes after the record")
    return obj
