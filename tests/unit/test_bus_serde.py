"""Serde: every record round-trips; hostile, oversized and foreign bytes are refused with a reason."""

from __future__ import annotations

import io
import struct
import tracemalloc
from datetime import datetime, timedelta, timezone

import pytest
from fastavro import schemaless_writer

from pilothouse.bus.errors import DecodeError, OversizedMessage, RecordInvalid
from pilothouse.bus.records import RECORDS
from pilothouse.bus.schemas import load_schemas
from pilothouse.bus.serde import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, Serde
from tests.avro_samples import sample


def _instance(name: str):
    return RECORDS[name].model_validate(sample(load_schemas().get(name).expanded))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_record_round_trips(name):
    serde = Serde()
    record = _instance(name)
    data = serde.encode(record)
    assert data[:2] == SINGLE_OBJECT_MAGIC
    assert data[2:10] == load_schemas().get(name).fingerprint
    decoded = serde.decode(data, expected=name)
    assert decoded.record == record


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_timestamps_written_as_milliseconds_here_give_fastavros_bytes(name):
    """The writer turns timestamp fields into milliseconds itself (fastavro's logical-type path was slow): the
    bytes must be fastavro's own, for instants before and after the epoch, in any offset, and for naive datetimes
    (left to fastavro)."""
    serde = Serde()
    rs = load_schemas().get(name)
    data = _instance(name).model_dump()
    stamps = [k for k, v in data.items() if isinstance(v, datetime)]
    instants = [datetime(2026, 11, 26, 6, 30, 1, 123000, tzinfo=timezone.utc),
                datetime(1969, 7, 20, 20, 17, 40, 999000, tzinfo=timezone(timedelta(hours=-5))),
                datetime(2031, 1, 1, 0, 0, 0, 1000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                datetime(2026, 1, 1, 12, 0, 0)]
    for instant in instants:
        obj = {**data, **{k: instant for k in stamps}}
        assert serde.encode_dict(name, obj)[10:] == _fastavro(rs.parsed, obj)
    assert serde.encode_dict(name, data)[10:] == _fastavro(rs.parsed, data)


def _fastavro(parsed, obj) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, parsed, obj, strict_allow_default=True)
    return buf.getvalue()


def test_decoder_refuses_the_wrong_type_for_a_topic():
    serde = Serde()
    data = serde.encode(_instance("pilothouse.sensing.AlertReceived"))
    with pytest.raises(DecodeError, match="not the type this topic carries"):
        serde.decode(data, expected="pilothouse.policy.ActionAuthorized")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "unknown framing"),
        (None, "tombstone"),
        (b"{\"json\": true}", "unknown framing"),
        (SINGLE_OBJECT_MAGIC + b"\x00" * 8 + b"abc", "unknown schema fingerprint"),
        (SINGLE_OBJECT_MAGIC + b"\x01\x02", "truncated"),
    ],
)
def test_foreign_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        Serde().decode(data)


def test_truncated_and_padded_bodies_are_refused():
    serde = Serde()
    data = serde.encode(_instance("pilothouse.sensing.IncidentUpdated"))
    with pytest.raises(DecodeError, match="does not decode"):
        serde.decode(data[:-5])
    with pytest.raises(DecodeError, match="trailing bytes"):
        serde.decode(data + b"\x00")


def test_six_bytes_declaring_a_huge_array_do_not_exhaust_memory():
    """A header plus a varint count of ~1e9 elements: the decoder must fail fast with bounded memory."""
    serde = Serde()
    fp = load_schemas().get("pilothouse.reasoning.DroppedClaim").fingerprint
    # DroppedClaim = {text: string, evidence_ids: array<string>, reason: string}
    hostile = SINGLE_OBJECT_MAGIC + fp + b"\x00" + b"\xfe\xff\xff\xff\x07"  # "" then array count 2^30-1
    assert len(hostile) - 10 == 6
    tracemalloc.start()
    with pytest.raises(DecodeError):
        serde.decode(hostile)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000, f"decoder allocated {peak} bytes for a 16-byte message"


def test_oversized_messages_are_refused_both_ways():
    serde = Serde(max_message_bytes=300)
    big = RECORDS["pilothouse.sensing.AlertReceived"].model_validate(
        {**sample(load_schemas().get("pilothouse.sensing.AlertReceived").expanded), "summary": "x" * 1000})
    with pytest.raises(OversizedMessage, match="300-byte limit"):
        serde.encode(big)
    with pytest.raises(OversizedMessage, match="above the 300-byte limit"):
        serde.decode(b"\xc3\x01" + b"\x00" * 400)


def test_encode_refuses_values_the_schema_cannot_hold():
    serde = Serde()
    with pytest.raises(RecordInvalid):
        serde.encode_dict("pilothouse.sensing.RedactionFinding", {"kind": "x", "count": "many"})
    with pytest.raises(RecordInvalid):
        serde.encode_dict("pilothouse.sensing.RedactionFinding", {"kind": "x"})
    with pytest.raises(ValueError):  # the pydantic twin bounds Avro ints to 32 bits
        RECORDS["pilothouse.sensing.RedactionFinding"](kind="x", count=2**40)


def test_confluent_wire_format_through_the_mock_registry():
    from confluent_kafka.schema_registry import SchemaRegistryClient

    registry = SchemaRegistryClient.new_client({"url": "mock://pilothouse-test"})
    serde = Serde(registry=registry)
    record = _instance("pilothouse.policy.ActionAuthorized")
    data = serde.encode(record, topic="pilothouse.policy.authorized-actions.v1")
    assert data[:1] == CONFLUENT_MAGIC
    (sid,) = struct.unpack(">I", data[1:5])
    assert registry.get_schema(sid).schema_type == "AVRO"
    # A fresh reader that only knows the registry resolves the id and decodes.
    reader = Serde(registry=registry)
    assert reader.decode(data).record == record
    # An id the registry does not know is refused.
    with pytest.raises(DecodeError, match="not in the registry"):
        reader.decode(CONFLUENT_MAGIC + struct.pack(">I", 999_999) + data[5:])
    # A schema registered by someone else that is not ours is refused.
    from confluent_kafka.schema_registry import Schema

    foreign = registry.register_schema("other-value", Schema('{"type":"record","name":"Foreign","fields":[]}', "AVRO"))
    with pytest.raises(DecodeError, match="not one of our schemas"):
        reader.decode(CONFLUENT_MAGIC + struct.pack(">I", foreign))


def _array_fields() -> list[tuple[str, str]]:
    out = []
    for name in sorted(RECORDS):
        for f in load_schemas().get(name).expanded["fields"]:
            if isinstance(f["type"], dict) and f["type"].get("type") == "array":
                out.append((name, f["name"]))
    return out


@pytest.mark.parametrize(("name", "field"), _array_fields())
@pytest.mark.parametrize("n", [0, 1, 64, 300])
def test_a_spliced_array_encodes_to_the_same_bytes_as_the_whole_record(name, field, n):
    serde = Serde()
    whole = _instance(name).model_dump()
    assert whole[field], "the sample must hold an item to repeat"
    whole[field] = [whole[field][0]] * n
    items = [serde.encode_item(name, field, item) for item in whole[field]]
    spliced = serde.encode_spliced(name, {k: v for k, v in whole.items() if k != field}, {field: items})
    assert spliced == serde.encode_dict(name, whole)
    assert serde.decode(spliced).data[field] == serde.decode(serde.encode_dict(name, whole)).data[field]


@pytest.mark.parametrize("name", sorted({name for name, _ in _array_fields()}))
def test_every_array_field_spliced_at_once_encodes_to_the_same_bytes(name):
    """Several spliced fields, adjacent or apart, first or last: the runs of plain fields between them are written
    in order (an IncidentUpdated splices its fingerprints and its evidence)."""
    serde = Serde()
    whole = _instance(name).model_dump()
    fields = [f for n, f in _array_fields() if n == name]
    for k, field in enumerate(fields):
        whole[field] = whole[field][:1] * (k + 2)
    pieces = {f: [serde.encode_item(name, f, item) for item in whole[f]] for f in fields}
    plain = {k: v for k, v in whole.items() if k not in pieces}
    assert serde.encode_spliced(name, plain, pieces) == serde.encode_dict(name, whole)
    assert serde.encode_spliced(name, plain, dict(reversed(pieces.items()))) == serde.encode_dict(name, whole)
    some = dict(list(pieces.items())[:1])
    assert serde.encode_spliced(name, {**plain, **{f: whole[f] for f in fields if f not in some}},
                                some) == serde.encode_dict(name, whole)


def test_splicing_needs_an_array_field_and_valid_pieces():
    serde = Serde()
    with pytest.raises(RecordInvalid, match="no array field"):
        serde.encode_spliced("pilothouse.sensing.IncidentUpdated", {}, {"title": []})
    with pytest.raises(RecordInvalid, match="no array field"):
        serde.encode_spliced("pilothouse.sensing.IncidentUpdated", {}, {"evidence": [], "nope": []})
    with pytest.raises(RecordInvalid):
        serde.encode_item("pilothouse.sensing.IncidentUpdated", "evidence", {"kind": "alert"})


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_projection_decodes_the_fields_it_names_as_a_full_decode_does(name):
    serde = Serde()
    data = serde.encode(_instance(name))
    full = serde.decode(data).data
    fields = tuple(list(full)[::2])
    try:
        got = serde.decode_fields(data, fields)
    except DecodeError as e:  # a kept field that uses a type defined in a skipped one: refused, with a reason
        assert "cannot project" in str(e)
        return
    assert got == {k: full[k] for k in fields}
    with pytest.raises(DecodeError, match="trailing bytes"):
        serde.decode_fields(data + b"\x00", fields)
    # timestamps as the milliseconds on the wire; everything else the same
    millis = serde.decode_fields(data, fields, millis=True, expected=name)
    assert millis == {k: _as_millis(full[k]) for k in fields}
    other = next(n for n in sorted(RECORDS) if n != name)
    with pytest.raises(DecodeError, match="not the type this topic carries"):
        serde.decode_fields(data, fields, expected=other)


def _as_millis(value):
    """A decoded value with every datetime as milliseconds since the epoch (what ``millis=True`` reads)."""
    if isinstance(value, datetime):
        return (value - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    if isinstance(value, dict):
        return {k: _as_millis(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_millis(v) for v in value]
    return value
