"""A Faust codec around :class:`pilothouse.bus.serde.Serde`: Faust has no Avro codec of its own.

Faust (faust-streaming, on aiokafka) is the sensing service's stream processor; the bus package stays the only place
that touches Avro. Register once, then name the codec in a topic::

    codec = register_avro_codec()                       # name "pilothouse-avro"
    topic = app.topic(name, value_serializer=codec)     # values in: pydantic records; out: framed Avro bytes

Decoding raises :class:`pilothouse.bus.errors.DecodeError` (or OversizedMessage) for bytes that are not a record
this topic carries. Faust would log and skip such a message, so a service that must dead-letter poison pills reads the
topic as ``raw`` and calls :meth:`AvroCodec.decode` itself (the sensing correlator does).
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from pilothouse.bus.records import AvroRecord
from pilothouse.bus.serde import Serde

CODEC_NAME = "pilothouse-avro"


class AvroCodec(codecs.Codec):
    """Framed Avro (single-object encoding, or the Confluent wire format with a registry) <-> pydantic records."""

    def __init__(self, serde: Serde | None = None, expected: str | None = None, **kwargs: Any) -> None:
        """``expected``: the full Avro name the topic carries; any other record is refused when decoding."""
        super().__init__(serde=serde, expected=expected, **kwargs)
        self.serde = serde or Serde()
        self.expected = expected

    def decode(self, data: bytes) -> AvroRecord:
        """Bytes -> validated pydantic record; raises DecodeError / OversizedMessage."""
        return self.serde.decode(data, expected=self.expected).record

    def encode(self, record: AvroRecord) -> bytes:
        """Record -> framed Avro bytes; raises RecordInvalid / OversizedMessage."""
        return self.serde.encode(record)

    def _loads(self, s: bytes) -> Any:
        return self.decode(s)

    def _dumps(self, s: Any) -> bytes:
        if isinstance(s, (bytes, bytearray)):  # already encoded (e.g. forwarded unchanged)
            return bytes(s)
        return self.encode(s)


def register_avro_codec(serde: Serde | None = None, name: str = CODEC_NAME) -> AvroCodec:
    """Create an AvroCodec and register it with Faust under ``name`` (idempotent per process); return it."""
    codec = AvroCodec(serde)
    codecs.register(name, codec)
    return codec
