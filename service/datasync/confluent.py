"""Avro in the Confluent wire format: byte ``0``, a 4-byte big-endian schema id, the binary body.

It is what Confluent-compatible serializers write (Kafka clients, Connect,
ksqlDB...). The writer schema comes from a schema registry by id
(``datasync.registry``) and is resolved against the reader schema from
``schemas/``, so records of older schema versions still decode.

Decoding is synchronous and does no I/O, as every codec's: whoever decodes
records fresh from Kafka first awaits ``prepare_decode`` with their bytes
(``Ingest.prepare`` does, per batch), which loads the ids not seen yet and
waits out an unreachable registry instead of rejecting the records. Encoding
needs the schema's id under its subject: ``prepare_encode`` looks it up, or
registers it, once (the engine calls it at start for published topics; the
HTTP and CLI write paths before writing).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from io import BytesIO
from typing import Any, Literal

from fastavro import schemaless_reader, schemaless_writer

from datasync.conform import conform
from datasync.errors import DecodeError, EncodeError
from datasync.registry import RegistryClient
from datasync.schemas import Schema, SchemaStore, definition

HEADER = struct.Struct(">bI")  # magic byte 0, schema id

SubjectStrategy = Literal["topic", "record", "topic_record"]


def subject_name(strategy: SubjectStrategy, topic: str, record: str) -> str:
    """The subject a value schema is registered under, as the usual serializers name it."""
    if strategy == "topic":
        return f"{topic}-value"
    if strategy == "record":
        return record
    return f"{topic}-{record}"


class RegistryCodec:
    """Values of one topic in the Confluent wire format; ``reader`` None decodes with the writer's schema."""

    def __init__(self, client: RegistryClient, topic: str, reader: Schema | None = None) -> None:
        self.client = client
        self.topic = topic
        self.reader = reader
        self.spec = "registry" if reader is None else f"registry:{reader.fullname}"
        self._reader_parsed = None if reader is None else reader.parsed
        self._reader_fingerprint = None if reader is None else reader.fingerprint
        self._header: bytes | None = None  # once the schema id for writing is known

    @property
    def subject(self) -> str | None:
        """Where publishing registers or looks up the reader schema (None: this codec cannot write)."""
        if self.reader is None:
            return None
        return subject_name(self.client.settings.subject_strategy, self.topic, self.reader.fullname)

    async def prepare_decode(self, raws: Iterable[bytes | None], retry: bool = True) -> None:
        """Load the writer schemas these records name; with ``retry``, wait for an unreachable registry."""
        ids = {raw[1:5] for raw in raws if raw and raw[0] == 0 and len(raw) >= HEADER.size}
        if ids:
            await self.client.load((int.from_bytes(i, "big") for i in ids), retry)

    async def prepare_encode(self, attempts: int = 3) -> None:
        """Look up (or register) the reader schema under its subject, once."""
        if self._header is not None or self.reader is None or self.subject is None:
            return
        schema_id = await self.client.id_for(self.subject, definition(self.reader), attempts)
        self._header = HEADER.pack(0, schema_id)

    def decode(self, raw: bytes) -> Any:
        if len(raw) < HEADER.size or raw[0] != 0:
            raise DecodeError("not the Confluent wire format (no magic byte 0 and schema id)")
        writer = self.client.cached(HEADER.unpack_from(raw)[1])
        if isinstance(writer, str):
            raise DecodeError(writer)
        stream = BytesIO(raw)
        stream.seek(HEADER.size)
        reader = None if writer.fingerprint == self._reader_fingerprint else self._reader_parsed
        try:
            value = schemaless_reader(stream, writer.parsed, reader)
        except Exception as exc:  # fastavro raises EOFError, ValueError, SchemaResolutionError...
            raise DecodeError(f"invalid Avro body for schema id {writer.id} ({writer.fullname}): {exc!r}") from exc
        if stream.tell() != len(raw):
            raise DecodeError(f"{len(raw) - stream.tell()} trailing bytes after schema id {writer.id} body")
        return value

    def encode(self, value: Any) -> bytes:
        if self.reader is None:
            raise EncodeError("this topic accepts any registered schema: name the one to write (registry:NAME)")
        if self._header is None:
            raise EncodeError(f"the schema id of subject {self.subject} is not known yet (registry not reached)")
        conform(value, self.reader)  # unknown fields refused, not dropped
        stream = BytesIO()
        stream.write(self._header)
        schemaless_writer(stream, self.reader.parsed, value)
        return stream.getvalue()


def registry_codec(name: str, store: SchemaStore, registry: RegistryClient | None, topic: str) -> RegistryCodec:
    """The codec of a bindings ``value: registry[:NAME]``; raises ValueError meant for the operator."""
    if registry is None:
        raise ValueError("a registry codec needs a schema registry: set DATASYNC_REGISTRY__URLS")
    reader = store.get(name) if name else None
    if name and reader is None:
        raise ValueError(f"unknown Avro schema {name!r} (known: {', '.join(store.names()) or 'none'})")
    return RegistryCodec(registry, topic, reader)


async def prepare_decode(codec: object, raws: Iterable[bytes | None], retry: bool = True) -> None:
    """Before decoding records of ``codec``: load what it needs from outside (no-op for most codecs);
    with ``retry``, wait for a registry that is away."""
    if isinstance(codec, RegistryCodec):
        await codec.prepare_decode(raws, retry)


async def prepare_encode(codec: object, attempts: int = 3) -> None:
    """Before encoding with ``codec``: resolve what it needs from outside (no-op for most codecs)."""
    if isinstance(codec, RegistryCodec):
        await codec.prepare_encode(attempts)
