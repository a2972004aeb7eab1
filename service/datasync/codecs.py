"""Value codecs: Avro (single-object encoding), JSON, UTF-8 strings and raw bytes.

The default Avro wire form is the Avro specification's *single-object
encoding*: ``C3 01``, the writer schema's 8-byte CRC-64-AVRO fingerprint
(little-endian), then the binary body. It needs no registry service, and the
fingerprint lets readers resolve records written with an older schema.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Protocol

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import validate

from datasync import avrowalk
from datasync.avrowalk import HEADER_SIZE, MAGIC, NotCompiled, Program, compile_program
from datasync.confluent import registry_codec
from datasync.conform import conform
from datasync.errors import DecodeError, EncodeError
from datasync.registry import RegistryClient
from datasync.schemas import Schema, SchemaStore


class Codec(Protocol):
    """Turns a record value's bytes into a Python value and back."""

    spec: str

    def decode(self, raw: bytes) -> Any: ...

    def encode(self, value: Any) -> bytes: ...


class BytesCodec:
    spec = "bytes"

    def decode(self, raw: bytes) -> Any:
        return raw

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray):
            raise EncodeError(f"bytes codec needs bytes, got {type(value).__name__}")
        return bytes(value)


class StringCodec:
    spec = "string"

    def decode(self, raw: bytes) -> Any:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"not UTF-8: {exc}") from exc

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise EncodeError(f"string codec needs str, got {type(value).__name__}")
        return value.encode()


class JsonCodec:
    """JSON documents; with a schema name, each value must also match that Avro schema."""

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema
        self.spec = "json" if schema is None else f"json:{schema.fullname}"

    def decode(self, raw: bytes) -> Any:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise DecodeError(f"invalid JSON: {exc!r}") from exc
        self._check(value, DecodeError)
        return value

    def encode(self, value: Any) -> bytes:
        if self.schema is not None:
            conform(value, self.schema)
        try:
            return json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise EncodeError(f"not JSON-serialisable: {exc}") from exc

    def _check(self, value: Any, error: type[ValueError]) -> None:
        if self.schema is not None:
            try:
                validate(value, self.schema.parsed, raise_errors=True)
            except Exception as exc:  # fastavro's ValidationError and friends
                raise error(f"does not match {self.schema.fullname}: {exc}") from exc


class AvroCodec:
    """Avro single-object encoding; ``reader`` None means "decode with the writer's schema".

    Records whose writer schema needs no resolution (it is the reader, or there is no
    reader) and has no logical types are checked and decoded by ``datasync.avrowalk``
    (``programs``, by fingerprint); the others by fastavro with schema resolution.
    """

    def __init__(self, store: SchemaStore, reader: Schema | None = None) -> None:
        self._writers = store.by_fingerprint
        self.reader = reader
        self.spec = "avro" if reader is None else f"avro:{reader.fullname}"
        self.programs: dict[bytes, Program] = {}
        compiled: dict[int, Program] = {}  # a schema's fingerprint and its aliases share one program
        for fp, writer in store.by_fingerprint.items():
            if reader is None or writer is reader:
                try:
                    if id(writer) not in compiled:
                        compiled[id(writer)] = compile_program(writer.parsed, writer.fullname)
                    self.programs[fp] = compiled[id(writer)]
                except NotCompiled:
                    pass

    @property
    def writer_fingerprints(self) -> list[bytes]:
        """The schemas this codec decodes (a snapshot is only valid for the same set)."""
        return sorted(self._writers)

    def decode(self, raw: bytes) -> Any:
        if raw[:2] != MAGIC or len(raw) < HEADER_SIZE:
            raise DecodeError("not Avro single-object encoding (no C3 01 header)")
        writer = self._writers.get(raw[2:HEADER_SIZE])
        if writer is None:
            raise DecodeError(f"unknown Avro schema fingerprint {raw[2:HEADER_SIZE].hex()}")
        program = self.programs.get(raw[2:HEADER_SIZE])
        if program is not None:
            try:
                return avrowalk.decode(program, raw)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
        reader = self.reader
        stream = BytesIO(raw)
        stream.seek(HEADER_SIZE)
        try:
            if reader is None or reader is writer:
                value = schemaless_reader(stream, writer.parsed, None)
            else:
                value = schemaless_reader(stream, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises EOFError, ValueError, SchemaResolutionError...
            raise DecodeError(f"invalid Avro body for {writer.fullname}: {exc!r}") from exc
        if stream.tell() != len(raw):
            raise DecodeError(f"{len(raw) - stream.tell()} trailing bytes after {writer.fullname} body")
        return value

    def encode(self, value: Any, schema: Schema | None = None) -> bytes:
        schema = schema or self.reader
        if schema is None:
            raise EncodeError("this topic accepts any known Avro schema: name the one to write")
        conform(value, schema)
        stream = BytesIO()
        stream.write(MAGIC)
        stream.write(schema.fingerprint)
        schemaless_writer(stream, schema.parsed, value)
        return stream.getvalue()


def codec_for(spec: str, store: SchemaStore, registry: RegistryClient | None = None, topic: str = "") -> Codec:
    """Build the codec named by a bindings ``value:`` field (``registry:`` ones need the registry client).

    Raises ValueError with a message meant for the operator.
    """
    kind, _, name = spec.partition(":")
    if kind == "registry":
        return registry_codec(name, store, registry, topic)
    if kind in ("bytes", "string") and not name:
        return BytesCodec() if kind == "bytes" else StringCodec()
    if kind in ("avro", "json"):
        schema = None
        if name:
            schema = store.get(name)
            if schema is None:
                known = ", ".join(store.names()) or "none"
                raise ValueError(f"unknown Avro schema {name!r} (known: {known})")
        if kind == "json":
            return JsonCodec(schema)
        return AvroCodec(store, schema)
    raise ValueError(f"unknown codec {spec!r}: use avro[:Name], registry[:Name], json[:Name], string or bytes")
