"""The Avro walk: compiled and pure-Python walks agree, poison bodies are rejected, values decode
as fastavro decodes them. Pure logic, no broker."""

from __future__ import annotations

import math
import random
from io import BytesIO
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from datasync import avrowalk
from datasync.avrowalk import NotCompiled, Program, compile_program
from datasync.bindings import TopicSpec
from datasync.codecs import BytesCodec
from datasync.ingest import Ingest
from datasync.metrics import Metrics
from datasync.table import StateTable

try:
    from datasync import _avrowalk as compiled
except ImportError:  # built without a C compiler: only the pure-Python walk is tested
    compiled = None  # type: ignore[assignment]
needs_compiled = pytest.mark.skipif(compiled is None, reason="built without a C compiler")
CHECKS = [avrowalk.check_py, avrowalk.decode_py, *([compiled.check, compiled.decode] if compiled else [])]

SCHEMA = parse_schema(
    {
        "type": "record",
        "name": "x.A",
        "fields": [
            {"name": "i", "type": "int"},
            {"name": "l", "type": "long"},
            {"name": "b", "type": "boolean"},
            {"name": "f", "type": "float"},
            {"name": "d", "type": "double"},
            {"name": "s", "type": "string"},
            {"name": "by", "type": "bytes"},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["P", "Q", "R"]}},
            {"name": "fx", "type": {"type": "fixed", "name": "F", "size": 3}},
            {"name": "u", "type": ["null", "string", "long", "E"]},
            {"name": "a", "type": {"type": "array", "items": "x.A"}},  # recursion
            {"name": "m", "type": {"type": "map", "values": ["null", "F"]}},
            {"name": "n", "type": "null"},
        ],
    }
)
PROGRAM = compile_program(SCHEMA, "x.A")


def encode(value: Any, schema: Any = SCHEMA) -> bytes:
    out = BytesIO()
    out.write(b"\xc3\x01" + bytes(8))
    schemaless_writer(out, schema, value)
    return out.getvalue()


def sample(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {
        "i": rng.randint(-(2**31), 2**31 - 1),
        "l": rng.randint(-(2**63), 2**63 - 1),
        "b": rng.random() < 0.5,
        "f": rng.choice([1.5, -0.25, math.inf]),
        "d": rng.random(),
        "s": rng.choice(["", "abc", "héllo", "日本"]),
        "by": rng.randbytes(rng.randrange(4)),
        "e": rng.choice("PQR"),
        "fx": b"abc",
        "u": rng.choice([None, "x", 5, "Q"]),
        "a": [sample(rng, depth + 1) for _ in range(rng.randrange(3))] if depth < 2 else [],
        "m": {rng.choice(["k", "é", ""]): rng.choice([None, b"xyz"]) for _ in range(rng.randrange(3))},
        "n": None,
    }


def outcome(function: Any, program: Program, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", function(program, raw)
    except ValueError as exc:
        return "invalid", str(exc)


@needs_compiled
def test_compiled_and_python_walks_agree_on_valid_and_mutated_bodies() -> None:
    rng = random.Random(12)
    seen = {"ok": 0, "invalid": 0}
    for _ in range(300):
        value = sample(rng)
        raw = encode(value)
        assert compiled.decode(PROGRAM, raw) == avrowalk.decode_py(PROGRAM, raw) == value
        bodies = [raw[:n] for n in range(len(raw))] + [raw + b"\x00"]
        for _ in range(20):
            mutated = bytearray(raw)
            mutated[rng.randrange(10, len(raw))] = rng.randrange(256)
            bodies.append(bytes(mutated))
        for body in bodies:
            checked = outcome(compiled.check, PROGRAM, body)
            assert checked == outcome(avrowalk.check_py, PROGRAM, body), body.hex()
            decoded = outcome(compiled.decode, PROGRAM, body)
            seen[checked[0]] += 1
            if checked[0] == "invalid":
                assert decoded == checked
            else:  # whatever the walk accepts, fastavro reads to the same value, to the last byte
                stream = BytesIO(body[10:])
                assert repr(decoded[1]) == repr(schemaless_reader(stream, SCHEMA, None))
                assert stream.tell() == len(body) - 10
    assert seen["ok"] > 1000 and seen["invalid"] > 1000


def body(schema: Any, payload: bytes) -> tuple[Program, bytes]:
    return compile_program(parse_schema(schema), "T"), b"\xc3\x01" + bytes(8) + payload


ENUM = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
INT64_MIN = b"\xff" * 9 + b"\x01"  # the varint of -2**63, a block count whose magnitude is no int64
POISON = [
    ("string", b"\x08abc", "truncated at byte 10"),
    ("string", b"\x03abc", "negative length -2 at byte 10"),
    ("bytes", b"\x05ab", "negative length -3 at byte 10"),
    ("string", b"\x04\xff\xfe", "invalid UTF-8 at byte 10"),
    ({"type": "fixed", "name": "F", "size": 4}, b"abc", "truncated at byte 10"),
    ("double", b"\x00" * 7, "truncated at byte 10"),
    ("boolean", b"\x02", "boolean byte 2 at byte 10"),
    ("int", b"\x80\x80\x80\x80\x10", "int out of range at byte 10"),
    ("long", b"\xff" * 10 + b"\x01", "varint overflows 64 bits at byte 10"),
    ("long", b"\xff", "truncated at byte 10"),
    (ENUM, b"\x04", "enum index 2 not in 0..1 at byte 10"),
    (ENUM, b"\x01", "enum index -1 not in 0..1 at byte 10"),
    (["null", "int"], b"\x04", "union index 2 not in 0..1 at byte 10"),
    (["null", "int"], b"\x01", "union index -1 not in 0..1 at byte 10"),
    ({"type": "array", "items": "int"}, b"\x04\x02\x80", "truncated at byte 12"),
    ({"type": "array", "items": "int"}, b"\x03\x06\x02\x04\x00", "block size 3 does not match its items at byte 10"),
    ({"type": "array", "items": "int"}, b"\x06\x02\x04", "block count 3 exceeds the bytes left at byte 10"),
    ({"type": "array", "items": "double"}, b"\x04" + bytes(15), "block count 2 exceeds the bytes left at byte 10"),
    (
        {"type": "array", "items": "null"},
        b"\xfe\xff\xff\xff\x0f\x00",
        "block count 2147483647 exceeds 1000000 zero-size",
    ),
    ({"type": "array", "items": "null"}, INT64_MIN + b"\x00\x00", "block count 9223372036854775808 exceeds 1000000"),
    ({"type": "array", "items": "int"}, INT64_MIN + b"\x00\x00", "block count 9223372036854775808 exceeds the bytes"),
    ({"type": "map", "values": "null"}, INT64_MIN + b"\x00\x00", "block count 9223372036854775808 exceeds the bytes"),
    (
        {"type": "array", "items": "null"},
        b"\xfe" + b"\xff" * 8 + b"\x01\x00",
        "block count 9223372036854775807 exceeds",
    ),
    ({"type": "map", "values": "int"}, b"\x02\x02\xff\x02\x00", "invalid UTF-8 at byte 11"),
    ("int", b"\x02\x00", "1 trailing bytes after T body"),
]


@pytest.mark.parametrize("schema, payload, message", POISON)
def test_poison_bodies_are_rejected_with_the_reason(schema: Any, payload: bytes, message: str) -> None:
    program, raw = body(schema, payload)
    for check in CHECKS:
        with pytest.raises(ValueError, match=message):
            check(program, raw)


def test_nesting_is_bounded() -> None:
    schema = {"type": "record", "name": "L", "fields": [{"name": "next", "type": ["null", "L"]}]}
    program, raw = body(schema, b"\x02" * 2000 + b"\x00")
    for check in CHECKS:
        with pytest.raises(ValueError, match="nesting deeper than 200"):
            check(program, raw)


def test_logical_types_and_unknown_names_are_left_to_fastavro() -> None:
    with pytest.raises(NotCompiled, match="logical type"):
        compile_program(parse_schema({"type": "int", "logicalType": "date"}), "d")
    with pytest.raises(NotCompiled, match="unresolved"):
        compile_program("x.Unknown", "x.Unknown")


def record(key: bytes | None, value: bytes | None, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 1, offset, 1_700_000_000_000 + offset, 0, key, value, None, 0, 0, ())


@needs_compiled
def test_compiled_and_python_folds_agree() -> None:
    good = encode(sample(random.Random(1)))
    unknown = b"\xc3\x01" + b"\x01" * 8 + b"\x00"

    def fallback(raw: bytes) -> None:
        raise ValueError(f"fallback refused {len(raw)} bytes")

    records = [
        record(b"a", good, 0),
        record(b"b", good[:-1], 1),  # truncated
        record(None, good, 2),
        record(b"\xff", good, 3),
        record(b"c", good + b"x" * 5000, 4),  # oversized
        record(b"d", unknown, 5),  # no program: the fallback decides
        record(b"a", None, 6),  # tombstone
        record(b"e", good, 7),
    ]
    programs = {bytes(8): PROGRAM}
    results = []
    for fold in (compiled.fold, avrowalk.fold_py):
        data: dict[str, bytes] = {}
        rejected, start = [], 0
        while (bad := fold(records, start, data, programs, fallback, 4096, True)) is not None:
            rejected.append(bad)
            start = bad[0] + 1
        results.append((data, rejected))
    assert results[0] == results[1]
    data, rejected = results[0]
    assert [(i, reason) for i, reason, _ in rejected] == [
        (1, "undecodable value"),
        (2, "null key"),
        (3, "key not UTF-8"),
        (4, "oversized value"),
        (5, "undecodable value"),
    ]
    assert rejected[4][2] == "fallback refused 11 bytes"
    assert list(data) == ["e"]
    assert data["e"] == avrowalk.pack(good, 7, 1, 1_700_000_000_007)


def test_rebuilt_tables_share_keys_with_the_previous_build() -> None:
    ingest = Ingest({"t": TopicSpec(name="t", partitions=1, value="bytes")}, {"t": BytesCodec()}, Metrics(), False)
    first = StateTable("t")
    ingest.fold_all(first, [record(b"config/k1", b"v", 0)])
    [kept] = first.data  # what a plugin got from the first build
    ingest.before_rebuild([first])
    second = StateTable("t")
    ingest.fold_all(second, [record(b"config/k1", b"w", 1)])
    [rebuilt] = second.data
    assert rebuilt == kept and rebuilt is kept


def varint(n: int) -> bytes:
    """``n`` as Avro writes an int or long (zigzag, 7 bits a byte)."""
    z, out = (n << 1) ^ (n >> 63), bytearray()
    while z > 0x7F:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    return bytes([*out, z])


def fastavro_reads(schema: Any, raw: bytes) -> tuple[bool, Any]:
    """Whether fastavro reads ``raw``'s body to its last byte, and the value it reads."""
    stream = BytesIO(raw[10:])
    try:
        value = schemaless_reader(stream, schema, None)
    except Exception:  # EOFError and whatever else a short body makes fastavro raise
        return False, None
    return stream.tell() == len(raw) - 10, value


EMPTY = {"type": "record", "name": "Empty", "fields": []}
ZERO_SIZE = [  # item types whose values take no bytes, and their value
    ("null", None),
    (EMPTY, {}),
    ({"type": "fixed", "name": "F0", "size": 0}, b""),
    (
        {"type": "record", "name": "N", "fields": [{"name": "e", "type": EMPTY}, {"name": "z", "type": "null"}]},
        {"e": {}, "z": None},
    ),
]
BLOCKS = [[], [5], [-5], [-3, 2, -1], [1] * 4]  # item counts of the blocks; negative: with the block's byte size


@pytest.mark.parametrize("kind", ["array", "map"])
@pytest.mark.parametrize("item, item_value", ZERO_SIZE, ids=["null", "empty", "fixed0", "nested"])
def test_zero_size_items_are_accepted_exactly_when_fastavro_reads_them(kind: str, item: Any, item_value: Any) -> None:
    collection = {"type": "array", "items": item} if kind == "array" else {"type": "map", "values": item}
    schema = parse_schema(
        {"type": "record", "name": "R", "fields": [{"name": "xs", "type": collection}, {"name": "n", "type": "int"}]}
    )
    program = compile_program(schema, "R")
    for blocks in BLOCKS:
        payload, keys = b"", iter(range(100))
        for count in blocks:
            items = b"".join(varint(2) + f"k{next(keys)}".encode() for _ in range(abs(count))) if kind == "map" else b""
            payload += varint(count) + (varint(len(items)) if count < 0 else b"") + items
        n = sum(map(abs, blocks))
        value = {"xs": [item_value] * n if kind == "array" else {f"k{i}": item_value for i in range(n)}, "n": 7}
        raw = b"\xc3\x01" + bytes(8) + payload + varint(0) + varint(7)
        assert fastavro_reads(schema, raw) == (True, value)
        for body in [raw[:n] for n in range(len(raw))] + [raw + b"\x00"]:
            accepted, read = fastavro_reads(schema, body)
            for check in CHECKS:
                assert outcome(check, program, body)[0] == ("ok" if accepted else "invalid"), (check, body.hex())
            for decode in (avrowalk.decode_py, *([compiled.decode] if compiled else [])):
                if accepted:
                    assert decode(program, body) == read
        folds = [avrowalk.fold_py, *([compiled.fold] if compiled else [])]
        for fold in folds:  # a valid record is folded, not refused
            data: dict[str, bytes] = {}
            assert fold([record(b"k", raw, 0)], 0, data, {bytes(8): program}, BytesCodec().decode, -1, False) is None
            assert list(data) == ["k"]


def test_zero_size_items_are_capped_in_the_whole_body() -> None:
    cap = avrowalk.MAX_EMPTY_ITEMS
    nulls = {"type": "array", "items": "null"}
    schema = {"type": "record", "name": "R", "fields": [{"name": "xs", "type": nulls}, {"name": "ys", "type": nulls}]}
    xs = varint(-(cap // 2)) + varint(0) + varint(cap - cap // 2 - 1) + varint(0)
    program, at_cap = body(schema, xs + varint(1) + varint(0))
    checks = [avrowalk.check_py, *([compiled.check] if compiled else [])]
    for check in checks:  # the walk does not build them, nor loop over them
        check(program, at_cap)
    program, over = body(schema, xs + varint(2) + varint(0))
    for check in CHECKS:
        with pytest.raises(ValueError, match=f"block count 2 exceeds {cap} zero-size items at byte {10 + len(xs)}"):
            check(program, over)
