"""Avro bodies checked without building Python objects, and decoded in one pass.

A writer schema is compiled once into a small program (a flat list of
opcodes, see ``compile_program``). Walking it over a record's bytes checks
everything the binary format can get wrong (truncation, negative lengths,
union and enum indexes, booleans, int ranges, over-long varints, invalid UTF-8,
array and map block sizes, trailing bytes) and creates no objects, so a table
rebuild validates every record at the speed of reading it. The same walk can
build the value, replacing fastavro on the hot path.

``datasync._avrowalk`` is the compiled walk (built by ``pip install`` when a C
compiler is there); this module is the pure-Python fallback giving the same
results, and decoding with fastavro after the check. Schemas with logical
types are not compiled: their values are decoded by fastavro, as before.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from io import BytesIO
from sys import intern
from typing import Any, NamedTuple

from fastavro import schemaless_reader

from datasync.table import pack

MAGIC = b"\xc3\x01"
HEADER_SIZE = 10
MAX_DEPTH = 200  # nested records/arrays/maps/unions; deeper bodies are rejected (within Python's recursion limit)
# Array items that take no bytes (null, a record of no fields, a fixed of size 0) in one body: their
# count is not bounded by the body's length, so a few crafted bytes could otherwise ask for 2**63.
MAX_EMPTY_ITEMS = 1_000_000

NULL, BOOLEAN, INT, LONG, FLOAT, DOUBLE, BYTES, STRING, FIXED, ENUM, RECORD, ARRAY, MAP, UNION = range(14)
_PRIMITIVES = {
    "null": NULL,
    "boolean": BOOLEAN,
    "int": INT,
    "long": LONG,
    "float": FLOAT,
    "double": DOUBLE,
    "bytes": BYTES,
    "string": STRING,
}


class Program(NamedTuple):
    """A compiled writer schema. The compiled walk reads ``code`` and ``name`` (and ``consts``)."""

    code: bytes  # the opcodes as native int32
    name: str  # the writer schema's full name, for messages
    consts: tuple[tuple[str, ...], ...]  # record field names and enum symbols, by index
    ops: tuple[int, ...]  # the opcodes, for the pure-Python walk
    schema: Any  # the parsed writer schema, for the pure-Python decode (fastavro)


class NotCompiled(Exception):
    """The schema uses something the walk does not cover (a logical type, an unresolved name)."""


def compile_program(parsed: Any, name: str) -> Program:
    """Compile a fastavro-parsed schema. Raises NotCompiled.

    Layout, one node per type at its offset: ``NULL``..``STRING`` alone;
    ``FIXED size``; ``ENUM count consts_index``; ``RECORD count consts_index
    field...``; ``ARRAY item item_size``; ``MAP value item_size``; ``UNION
    count branch...`` (children as offsets; a named type is laid out once, so
    recursion is a back reference). ``item_size`` is the fewest bytes one item
    (with a map's key) can take: a block's count is bounded by the bytes left
    when it is at least 1, by ``MAX_EMPTY_ITEMS`` when it is 0.
    """
    named: dict[str, Any] = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    ops: list[int] = []
    consts: list[tuple[str, ...]] = []
    placed: dict[str, int] = {}
    nodes: list[int] = []  # every node's offset

    def node(schema: Any) -> int:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                nodes.append(len(ops))
                ops.append(_PRIMITIVES[schema])
                return len(ops) - 1
            if schema in placed:
                return placed[schema]
            if schema not in named:
                raise NotCompiled(f"unresolved type {schema}")
            return node(named[schema])
        at = len(ops)
        if isinstance(schema, list):
            nodes.append(at)
            ops.extend([UNION, len(schema), *[0] * len(schema)])
            for i, branch in enumerate(schema):
                ops[at + 2 + i] = node(branch)
            return at
        if "logicalType" in schema:
            raise NotCompiled(f"logical type {schema['logicalType']}")
        kind = schema["type"]
        if kind in ("record", "error"):
            fields = schema["fields"]
            placed[schema["name"]] = at
            consts.append(tuple(f["name"] for f in fields))
            ops.extend([RECORD, len(fields), len(consts) - 1, *[0] * len(fields)])
            for i, field in enumerate(fields):
                ops[at + 3 + i] = node(field["type"])
        elif kind == "enum":
            placed[schema["name"]] = at
            consts.append(tuple(schema["symbols"]))
            ops.extend([ENUM, len(schema["symbols"]), len(consts) - 1])
        elif kind == "fixed":
            placed[schema["name"]] = at
            ops.extend([FIXED, schema["size"]])
        elif kind in ("array", "map"):
            ops.extend([ARRAY if kind == "array" else MAP, 0, 0])
            ops[at + 1] = node(schema["items"] if kind == "array" else schema["values"])
        else:
            return node(kind)  # {"type": "int"} and the like
        nodes.append(at)
        return at

    node(parsed)
    sizes = _min_sizes(ops, nodes)
    for at in nodes:
        if ops[at] in (ARRAY, MAP):
            ops[at + 2] = int(min(sizes[ops[at + 1]] + (ops[at] == MAP), _INT32_MAX))
    return Program(array("i", ops).tobytes(), name, tuple(consts), tuple(ops), parsed)


_SIZES = {NULL: 0, BOOLEAN: 1, INT: 1, LONG: 1, FLOAT: 4, DOUBLE: 8, BYTES: 1, STRING: 1, ENUM: 1, ARRAY: 1, MAP: 1}
_INT32_MAX = 2**31 - 1


def _min_sizes(ops: list[int], nodes: list[int]) -> dict[int, float]:
    """The fewest bytes a value of each node takes (inf: a type with no finite value, like a record
    holding itself). Recursive types make this a fixpoint: start from inf and lower until nothing
    changes (at most one round per node, as a smallest value never repeats a node on a path)."""
    sizes = dict.fromkeys(nodes, math.inf)

    def least(at: int) -> float:
        op = ops[at]
        if op == FIXED:
            return max(ops[at + 1], 0)  # a negative size is the walk's to reject
        if op == RECORD:
            return sum(sizes[f] for f in ops[at + 3 : at + 3 + ops[at + 1]])
        if op == UNION:
            return 1 + min((sizes[b] for b in ops[at + 2 : at + 2 + ops[at + 1]]), default=math.inf)
        return _SIZES[op]  # an array or map: at least the count 0 that ends its blocks

    changed = True
    while changed:
        changed = False
        for at in reversed(nodes):  # children are laid out after their parents: one round if no recursion
            if (n := least(at)) < sizes[at]:
                sizes[at], changed = n, True
    return sizes


# -- the pure-Python walk (the compiled one in _avrowalk.c mirrors it, message for message) ---------


class Invalid(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    start, value, shift = pos, 0, 0
    while True:
        if pos >= len(buf):
            raise Invalid(f"truncated at byte {start}")
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise Invalid(f"varint overflows 64 bits at byte {start}")
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7


def _length(buf: bytes, pos: int) -> tuple[int, int]:
    start = pos
    n, pos = _varint(buf, pos)
    if n < 0:
        raise Invalid(f"negative length {n} at byte {start}")
    if n > len(buf) - pos:
        raise Invalid(f"truncated at byte {start}")
    return n, pos


def _walk(ops: tuple[int, ...], at: int, buf: bytes, pos: int, depth: int, empty: list[int]) -> int:
    """The end of the value of node ``at`` at ``pos``; ``empty[0]``: the zero-size items still allowed."""
    op = ops[at]
    start = pos
    if op == NULL:
        return pos
    if op == BOOLEAN:
        if pos >= len(buf):
            raise Invalid(f"truncated at byte {start}")
        if buf[pos] > 1:
            raise Invalid(f"boolean byte {buf[pos]} at byte {start}")
        return pos + 1
    if op == INT or op == LONG:
        n, pos = _varint(buf, pos)
        if op == INT and not -(2**31) <= n < 2**31:
            raise Invalid(f"int out of range at byte {start}")
        return pos
    if op == FLOAT or op == DOUBLE or op == FIXED:
        size = 4 if op == FLOAT else 8 if op == DOUBLE else ops[at + 1]
        if size > len(buf) - pos:
            raise Invalid(f"truncated at byte {start}")
        return pos + size
    if op == BYTES or op == STRING:
        n, pos = _length(buf, pos)
        if op == STRING:
            try:
                buf[pos : pos + n].decode()
            except UnicodeDecodeError:
                raise Invalid(f"invalid UTF-8 at byte {start}") from None
        return pos + n
    if op == ENUM or op == UNION:
        i, pos = _varint(buf, pos)
        count = ops[at + 1]
        if not 0 <= i < count:
            what = "enum" if op == ENUM else "union"
            raise Invalid(f"{what} index {i} not in 0..{count - 1} at byte {start}")
        return pos if op == ENUM else _nested(ops, ops[at + 2 + i], buf, pos, depth, empty)
    if op == RECORD:
        for i in range(ops[at + 1]):
            pos = _nested(ops, ops[at + 3 + i], buf, pos, depth, empty)
        return pos
    # ARRAY or MAP: blocks of items, a count of 0 ends them
    item_size = ops[at + 2]
    while True:
        block = pos
        count, pos = _varint(buf, pos)
        if count == 0:
            return pos
        size = -1
        if count < 0:
            count = -count
            size, pos = _length(buf, pos)
        if item_size == 0:  # not bounded by the bytes left, so by MAX_EMPTY_ITEMS in the whole body
            if count > empty[0]:
                raise Invalid(f"block count {count} exceeds {MAX_EMPTY_ITEMS} zero-size items at byte {block}")
            empty[0] -= count
        elif count > (len(buf) - pos) // item_size:
            raise Invalid(f"block count {count} exceeds the bytes left at byte {block}")
        items = pos
        for _ in range(count):
            item = pos
            if op == MAP:
                pos = _key(buf, pos)
            pos = _nested(ops, ops[at + 1], buf, pos, depth, empty)
            if pos == item:  # the rest of the block would walk the same (no) bytes the same way
                break
        if size >= 0 and pos - items != size:
            raise Invalid(f"block size {size} does not match its items at byte {block}")


def _key(buf: bytes, pos: int) -> int:
    start = pos
    n, pos = _length(buf, pos)
    try:
        buf[pos : pos + n].decode()
    except UnicodeDecodeError:
        raise Invalid(f"invalid UTF-8 at byte {start}") from None
    return pos + n


def _nested(ops: tuple[int, ...], at: int, buf: bytes, pos: int, depth: int, empty: list[int]) -> int:
    if depth >= MAX_DEPTH:
        raise Invalid(f"nesting deeper than {MAX_DEPTH} at byte {pos}")
    return _walk(ops, at, buf, pos, depth + 1, empty)


def check_py(program: Program, raw: bytes) -> None:
    """Raise ValueError (with the reason) unless ``raw[HEADER_SIZE:]`` is one valid body."""
    try:
        if len(raw) < HEADER_SIZE:
            raise Invalid(f"truncated at byte {len(raw)}")
        end = _walk(program.ops, 0, raw, HEADER_SIZE, 0, [MAX_EMPTY_ITEMS])
    except Invalid as exc:
        raise ValueError(f"invalid Avro body for {program.name}: {exc}") from None
    if end != len(raw):
        raise ValueError(f"{len(raw) - end} trailing bytes after {program.name} body")


def decode_py(program: Program, raw: bytes) -> Any:
    """The value of a single-object-encoded record, after ``check``."""
    check_py(program, raw)
    stream = BytesIO(raw)
    stream.seek(HEADER_SIZE)
    return schemaless_reader(stream, program.schema, None)


Records = list[Any]  # aiokafka ConsumerRecords: .key, .value, .offset, .partition, .timestamp
Rejection = tuple[int, str, str]  # index in records, reason, detail
Programs = dict[bytes, Program]  # by writer schema fingerprint


def fold_py(
    records: Records,
    start: int,
    data: dict[str, bytes],
    programs: dict[bytes, Program] | None,
    fallback: Callable[[bytes], Any],
    limit: int,
    interned: bool,
) -> Rejection | None:
    """Fold ``records[start:]`` into ``data`` (key -> packed state, tombstones delete) until one
    cannot be applied; return it (index, reason, detail), or None once all are folded.

    Values are checked with their writer's program when ``programs`` has one, else
    with ``fallback`` (the codec's decode). ``limit`` < 0: no size limit. Keys are
    interned if ``interned``.
    """
    for i in range(start, len(records)):
        record = records[i]
        raw_key, raw = record.key, record.value
        if raw_key is None:
            return i, "null key", "a compacted topic needs keys"
        try:
            key = raw_key.decode()
        except UnicodeDecodeError as exc:
            return i, "key not UTF-8", str(exc)
        if interned:
            key = intern(key)
        if raw is None:
            data.pop(key, None)
            continue
        if 0 <= limit < len(raw):
            return i, "oversized value", f"{len(raw)} bytes > max_value_bytes {limit}"
        program = None
        if programs is not None and len(raw) >= HEADER_SIZE and raw[:2] == MAGIC:
            program = programs.get(raw[2:HEADER_SIZE])
        try:
            if program is not None:
                check_py(program, raw)
            else:
                fallback(raw)
        except Exception as exc:  # the check's ValueError, DecodeError, whatever a custom codec raises
            return i, "undecodable value", str(exc)
        data[key] = pack(raw, record.offset, record.partition, record.timestamp)
    return None


check: Callable[[Program, bytes], None] = check_py
decode: Callable[[Program, bytes], Any] = decode_py
Fold = Callable[[Records, int, dict[str, bytes], Programs | None, Callable[[bytes], Any], int, bool], Rejection | None]
fold: Fold = fold_py
try:  # the compiled walk, if pip built it
    from datasync import _avrowalk
except ImportError:  # built without a C compiler: the pure-Python walk above
    COMPILED = False
else:
    check, decode, fold = _avrowalk.check, _avrowalk.decode, _avrowalk.fold
    COMPILED = True
