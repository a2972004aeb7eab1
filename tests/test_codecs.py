"""Codecs and the schema store: pure logic, no broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasync.codecs import AvroCodec, BytesCodec, JsonCodec, StringCodec, codec_for
from datasync.errors import ConfigError, DecodeError, EncodeError
from datasync.schemas import SchemaStore

V1 = {
    "type": "record",
    "name": "Interface",
    "namespace": "demo",
    "fields": [{"name": "name", "type": "string"}, {"name": "mtu", "type": "int"}],
}
V2 = {
    "type": "record",
    "name": "Interface",
    "namespace": "demo",
    "fields": [
        {"name": "name", "type": "string"},
        {"name": "mtu", "type": "int"},
        {"name": "enabled", "type": "boolean", "default": True},
    ],
}


@pytest.fixture
def store(tmp_path: Path) -> SchemaStore:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "Interface.avsc").write_text(json.dumps(V2))
    (tmp_path / "demo" / "Interface.v1.avsc").write_text(json.dumps(V1))
    (tmp_path / "demo" / "Link.avsc").write_text(
        json.dumps(
            {"type": "record", "name": "Link", "namespace": "demo", "fields": [{"name": "a", "type": "demo.Interface"}]}
        )
    )
    return SchemaStore.load(tmp_path)


def test_single_object_encoding_layout(store: SchemaStore) -> None:
    codec = AvroCodec(store, store.get("demo.Interface"))
    raw = codec.encode({"name": "eth0", "mtu": 9000, "enabled": False})
    assert raw[:2] == b"\xc3\x01" and raw[2:10] == store.get("demo.Interface").fingerprint  # type: ignore[union-attr]
    assert codec.decode(raw) == {"name": "eth0", "mtu": 9000, "enabled": False}


def test_fingerprint_matches_the_avro_spec() -> None:
    # CRC-64-AVRO of the canonical form "int" is 0x7275d51a3f395c8f (Avro spec test vector), little-endian on the wire
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO")) == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_old_writer_schema_resolves_to_the_reader(store: SchemaStore) -> None:
    old = next(s for s in store.by_fingerprint.values() if s.source.endswith("Interface.v1.avsc"))
    raw = AvroCodec(store).encode({"name": "eth1", "mtu": 1500}, old)
    assert AvroCodec(store, store.get("demo.Interface")).decode(raw) == {"name": "eth1", "mtu": 1500, "enabled": True}
    assert AvroCodec(store).decode(raw) == {"name": "eth1", "mtu": 1500}  # no reader: writer's view


def test_references_between_files(store: SchemaStore) -> None:
    codec = AvroCodec(store, store.get("demo.Link"))
    value = {"a": {"name": "x", "mtu": 1, "enabled": True}}
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"plain", "no C3 01 header"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown Avro schema fingerprint"),
    ],
)
def test_bad_avro_is_a_decode_error(store: SchemaStore, raw: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        AvroCodec(store, store.get("demo.Interface")).decode(raw)


def test_truncated_and_trailing_bytes(store: SchemaStore) -> None:
    codec = AvroCodec(store, store.get("demo.Interface"))
    raw = codec.encode({"name": "eth0", "mtu": 9000, "enabled": True})
    with pytest.raises(DecodeError):
        codec.decode(raw[:-3])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(raw + b"\x00")


def test_encode_rejects_a_value_that_does_not_match(store: SchemaStore) -> None:
    with pytest.raises(EncodeError, match=r"demo\.Interface"):
        AvroCodec(store, store.get("demo.Interface")).encode({"name": "eth0", "mtu": "big"})


def test_json_with_and_without_schema(store: SchemaStore) -> None:
    assert JsonCodec().decode(b'{"a": 1}') == {"a": 1}
    with pytest.raises(DecodeError, match="invalid JSON"):
        JsonCodec().decode(b"{nope")
    checked = JsonCodec(store.get("demo.Interface"))
    assert checked.decode(b'{"name": "x", "mtu": 1, "enabled": true}')["mtu"] == 1
    with pytest.raises(DecodeError, match="does not match"):
        checked.decode(b'{"name": "x"}')


def test_string_and_bytes() -> None:
    assert StringCodec().decode(StringCodec().encode("é")) == "é"
    with pytest.raises(DecodeError):
        StringCodec().decode(b"\xff")
    assert BytesCodec().decode(b"\x00") == b"\x00"


def test_codec_for(store: SchemaStore) -> None:
    assert codec_for("avro:demo.Interface", store).spec == "avro:demo.Interface"
    assert codec_for("avro", store).spec == "avro"
    with pytest.raises(ValueError, match=r"unknown Avro schema 'demo\.Nope'"):
        codec_for("avro:demo.Nope", store)
    with pytest.raises(ValueError, match="unknown codec"):
        codec_for("protobuf", store)


def test_broken_schema_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "Bad.avsc").write_text('{"type": "record", "name": "Bad", "fields": [{"name": "x", "type": "nope"}]}')
    with pytest.raises(ConfigError, match=r"Bad\.avsc"):
        SchemaStore.load(tmp_path)
    (tmp_path / "Bad.avsc").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read schema"):
        SchemaStore.load(tmp_path)


def test_pathological_json_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        JsonCodec().decode(b"[" * 100_000)  # RecursionError inside the parser


def test_fingerprint_covers_types_from_other_files(tmp_path: Path) -> None:
    """A record referring to another file's type changes fingerprint when that type changes."""
    link = {"type": "record", "name": "Link", "namespace": "demo", "fields": [{"name": "a", "type": "demo.Interface"}]}
    prints = []
    for interface in (V1, V2):
        d = tmp_path / str(len(prints))
        (d / "demo").mkdir(parents=True)
        (d / "demo" / "Interface.avsc").write_text(json.dumps(interface))
        (d / "demo" / "Link.avsc").write_text(json.dumps(link))
        prints.append(SchemaStore.load(d).get("demo.Link").fingerprint)  # type: ignore[union-attr]
    assert prints[0] != prints[1]


def test_change_envelope_is_derived_for_every_record(store: SchemaStore) -> None:
    envelope = store.get("demo.InterfaceChange")
    assert envelope is not None
    codec = AvroCodec(store, envelope)
    value = {
        "op": "u",
        "key": "config/eth0",
        "before": {"name": "eth0", "mtu": 1500, "enabled": True},
        "after": {"name": "eth0", "mtu": 9000, "enabled": True},
        "source": {"topic": "t", "partition": 1, "offset": 42},
        "ts_ms": 1_700_000_000_000,
    }
    assert codec.decode(codec.encode(value)) == value
    deleted = {**value, "op": "d", "after": None}
    assert codec.decode(codec.encode(deleted))["after"] is None
    with pytest.raises(EncodeError):
        codec.encode({**value, "op": "x"})


def test_envelope_uses_the_reader_version(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "Interface-2023.avsc").write_text(json.dumps(V1))  # sorts first, an old version
    (tmp_path / "demo" / "Interface.avsc").write_text(json.dumps(V2))
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("demo.InterfaceChange"))
    after = {"name": "eth0", "mtu": 9000, "enabled": False}
    value = {"op": "c", "key": "k", "before": None, "after": after, "source": {"topic": "t", "partition": 0,
             "offset": 1}, "ts_ms": 0}  # fmt: skip
    assert codec.decode(codec.encode(value))["after"] == after


ADDRESS_V1 = {
    "type": "record",
    "name": "Address",
    "namespace": "demo",
    "fields": [{"name": "street", "type": "string"}],
}
ADDRESS_V2 = {**ADDRESS_V1, "fields": [*ADDRESS_V1["fields"], {"name": "city", "type": "string", "default": ""}]}


def test_references_resolve_to_the_reader_not_an_older_version(tmp_path: Path) -> None:
    """``archive/Address.avsc``, an older ``demo.Address``, sorts before the reader ``demo/Address.avsc``."""
    person = {
        "type": "record",
        "name": "Person",
        "namespace": "demo",
        "fields": [{"name": "home", "type": "demo.Address"}],
    }
    for path, schema in [("archive/Address.avsc", ADDRESS_V1), ("demo/Address.avsc", ADDRESS_V2),
                         ("demo/Person.avsc", person)]:  # fmt: skip
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(json.dumps(schema))
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("demo.Person"))
    value = {"home": {"street": "Main St", "city": "Springfield"}}
    assert codec.decode(codec.encode(value)) == value
    old = next(s for s in store.by_fingerprint.values() if s.source == str(tmp_path / "archive/Address.avsc"))
    address = AvroCodec(store, store.get("demo.Address"))  # records of the older version still decode
    assert address.decode(address.encode({"street": "Elm St"}, old)) == {"street": "Elm St", "city": ""}


def test_a_name_defined_twice_without_its_reader_file_is_an_error(tmp_path: Path) -> None:
    for path, schema in [("archive/Address.avsc", ADDRESS_V1), ("current/Address.avsc", ADDRESS_V2)]:
        (tmp_path / path).parent.mkdir()
        (tmp_path / path).write_text(json.dumps(schema))
    with pytest.raises(ConfigError) as err:
        SchemaStore.load(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'current/Address.avsc'}: demo.Address is also defined in {tmp_path / 'archive/Address.avsc'}: "
        f"put its reader schema in {tmp_path / 'demo/Address.avsc'}"
    )


def test_top_level_union_referring_to_another_file(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "Interface.avsc").write_text(json.dumps(V2))
    (tmp_path / "Maybe.avsc").write_text(json.dumps(["null", "demo.Interface"]))
    store = SchemaStore.load(tmp_path)
    assert len({s.fullname for s in store.by_fingerprint.values()}) >= 2


def test_poison_bodies_are_decode_errors(store: SchemaStore) -> None:
    codec = AvroCodec(store, store.get("demo.Interface"))
    header = codec.encode({"name": "eth0", "mtu": 1, "enabled": True})[:10]
    for body, reason in [
        (b"\x05eth0\x02\x01", "negative length -3"),
        (b"\x08eth0\x02", "truncated"),
        (b"\x08eth0\x02\x02", "boolean byte 2"),
        (b"\x08eth0\x02\x01\x00", "1 trailing bytes"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            codec.decode(header + body)


def test_logical_types_decode_with_fastavro(tmp_path: Path) -> None:
    (tmp_path / "D.avsc").write_text(
        '{"type":"record","name":"D","fields":[{"name":"day","type":{"type":"int","logicalType":"date"}}]}'
    )
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("D"))
    assert not codec.programs  # not compiled: fastavro decodes (and converts) these
    raw = codec.encode({"day": 19000})
    assert str(codec.decode(raw)["day"]) == "2022-01-08"
    with pytest.raises(DecodeError):
        codec.decode(raw[:10] + b"\xfe\xff\xff\xff\x0f")  # a date beyond the calendar
