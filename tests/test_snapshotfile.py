"""The snapshot file format on its own: round trips, and every kind of damage is refused; the
compiled and pure-Python block fills agree."""

from __future__ import annotations

import json
import random
import re
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from datasync import snapshotfile
from datasync.snapshotfile import (
    MAGIC,
    Block,
    FillBlock,
    Header,
    SnapshotError,
    SnapshotWriter,
    encode_block,
    read_entries,
    read_header,
)
from datasync.table import pack

try:
    from datasync import _snapblock as compiled
except ImportError:  # built without a C compiler: only the pure-Python fill is tested
    compiled = None  # type: ignore[assignment]
FILLS: list[FillBlock] = [snapshotfile.fill_block_py, *([compiled.fill] if compiled else [])]
HEADER = Header("t", 0, 1, "string", position=7, since_ms=1, written_ms=2, probe=(3, 4, "k"))


def write(path: Path, blocks: list[list[str]]) -> dict[str, bytes]:
    writer = SnapshotWriter(path, HEADER)
    writer.open()
    entries: dict[str, bytes] = {}
    for n, keys in enumerate(blocks):
        values = [pack(f"value of {key!r}".encode(), n, 0, 1000 + n) for key in keys]
        writer.append(encode_block(keys, values), len(keys))
        entries.update(zip(keys, values, strict=True))
    writer.finish()
    return entries


@pytest.fixture(params=FILLS, ids=lambda fill: fill.__module__)
def each_fill(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block fill in turn, as the one the reader uses."""
    monkeypatch.setattr(snapshotfile, "fill_block", request.param)


@pytest.mark.parametrize(
    "blocks",
    [
        [["a", "b"], ["c"]],
        [["with\0nul", "", "\0", "ü\0é", "plain"]],  # NUL inside keys: read by their lengths
        [["ü", "中文", "🙂x🙂", "", "a\0🙂\0"]],  # 2-, 3- and 4-byte characters
        [[f"k{i}" for i in range(5000)]],
        [],
    ],
)
@pytest.mark.usefixtures("each_fill")
def test_round_trip(tmp_path: Path, blocks: list[list[str]]) -> None:
    path = tmp_path / "0.snap"
    entries = write(path, blocks)
    header, loaded = read_entries(path)
    assert header == HEADER == read_header(path)
    assert loaded == entries and list(loaded) == list(entries)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_discarded_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "0.snap"
    entries = write(path, [["a"]])
    writer = SnapshotWriter(path, HEADER)
    writer.open()
    writer.append(encode_block(["b"], [pack(b"x", 1, 0, 1)]), 1)
    writer.discard()
    assert read_entries(path)[1] == entries and not writer.tmp.exists()


def damaged(raw: bytes, how: str) -> bytes:
    if how == "truncated":
        return raw[:-3]
    if how == "extended":
        return raw + b"\0"
    body = bytearray(raw)
    body[len(body) // 2] ^= 0x40
    return bytes(body)


@pytest.mark.parametrize("how", ["truncated", "extended", "flipped"])
def test_damage_is_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "0.snap"
    write(path, [[f"key-{i}" for i in range(200)]])
    path.write_bytes(damaged(path.read_bytes(), how))
    with pytest.raises(SnapshotError) as caught:
        read_entries(path)
    assert caught.value.reason == "checksum" and not caught.value.partial


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "0.snap"
    fields = json.loads(HEADER.encode())
    fields["format"] = 99
    header = json.dumps(fields).encode()
    path.write_bytes(MAGIC + len(header).to_bytes(4, "little") + header)
    with pytest.raises(SnapshotError, match="format 99") as caught:
        read_header(path)
    assert caught.value.reason == "version"
    path.write_bytes(b"something else entirely")
    with pytest.raises(SnapshotError) as caught:
        read_header(path)
    assert caught.value.reason == "format"


def block(keys: list[str], values: list[bytes]) -> Block:
    _, key_lengths, value_lengths, text, body = encode_block(keys, values)
    return Block(len(keys), text, key_lengths, value_lengths, body)


def fill_with(fill: FillBlock, data: dict[str, bytes], b: Block, interned: bool = False) -> int:
    return fill(data, b.n, b.text, b.key_lengths, b.value_lengths, b.body, interned)


def test_the_fills_agree_on_every_kind_of_key() -> None:
    keys = ["plain", "", "é", "中文", "🙂", "x\0y", "\0", "ü\0🙂\0", "last"]  # 2-, 3-, 4-byte characters, NULs
    values = [b"", b"v", b"\0", b"", b"\xff" * 300, b"", b"z", b"", b"end"]
    expected = {"before": b"kept", **dict(zip(keys, values, strict=True))}
    for fill in FILLS:
        data = {"before": b"kept", "plain": b"replaced"}
        assert fill_with(fill, data, block(keys, values)) == len(keys)
        assert data == expected and list(data) == list(expected)
        assert all(type(key) is str for key in data) and all(type(value) is bytes for value in data.values())


@pytest.mark.parametrize("interned", [True, False])
def test_keys_are_interned_only_when_asked(interned: bool) -> None:
    keys = [f"interned-{i}-{'é' * i}" for i in range(3)]
    canonical = [sys.intern("".join(key)) for key in keys]  # equal strings, made and interned first
    for fill in FILLS:
        data: dict[str, bytes] = {}
        fill_with(fill, data, block(keys, [b"v"] * 3), interned)
        assert [key is known for key, known in zip(data, canonical, strict=True)] == [interned] * 3


GOOD = block(["ab", "é", "c"], [b"1", b"22", b""])
CORRUPT = {
    "no entries": (replace(GOOD, n=0), "a block holds at least one entry, not 0"),
    "value lengths cut": (replace(GOOD, value_lengths=GOOD.value_lengths[:-1]), "3 entries but 11 bytes of value"),
    "values short": (replace(GOOD, body=b"12"), "value lengths add up to 3 bytes, the values are 2"),
    "key lengths cut": (replace(GOOD, key_lengths=GOOD.key_lengths[4:]), "3 entries but 8 bytes of key lengths"),
    "not UTF-8": (replace(GOOD, text=b"ab\0\xe9\0c"), "keys are not UTF-8: 'utf-8' codec can't decode byte 0xe9"),
    "lengths in bytes": (
        replace(GOOD, key_lengths=struct.pack("<3I", 2, 2, 1)),
        "key lengths and NULs add up to 7 characters, the keys are 6",
    ),
    "lengths shifted": (replace(GOOD, key_lengths=struct.pack("<3I", 1, 2, 1)), "no NUL after key 0"),
    "a huge length": (
        replace(GOOD, key_lengths=struct.pack("<3I", 0xFFFFFFFF, 1, 1)),
        "key lengths and NULs add up to 4294967299 characters",
    ),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_a_block_that_does_not_add_up_is_refused_by_both_fills_alike(case: str) -> None:
    bad, message = CORRUPT[case]
    errors = []
    for fill in FILLS:
        data = {"before": b"kept"}
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            fill_with(fill, data, bad)
        assert data == {"before": b"kept"}  # nothing added
        errors.append(str(caught.value))
    assert len(set(errors)) == 1


@pytest.mark.parametrize("case", CORRUPT)
@pytest.mark.usefixtures("each_fill")
def test_the_reader_calls_a_block_that_does_not_add_up_corrupt(case: str) -> None:
    bad, message = CORRUPT[case]
    with pytest.raises(SnapshotError, match=re.escape(message)) as caught:
        bad.fill({}, interned=False)
    assert caught.value.reason == "corrupt" and caught.value.partial


def test_values_before_filling() -> None:
    assert GOOD.values() == [b"1", b"22", b""]
    with pytest.raises(SnapshotError, match="value lengths add up") as caught:
        CORRUPT["values short"][0].values()
    assert caught.value.reason == "corrupt" and caught.value.partial


@pytest.mark.skipif(compiled is None, reason="built without a C compiler")
def test_the_fills_agree_on_damaged_blocks() -> None:
    good = block(["ab", "é", "", "中\0文", "🙂", "x"], [b"1", b"22", b"", b"4444", b"", b"6"])
    rng = random.Random(7)
    for _ in range(2000):
        piece = rng.choice(["text", "key_lengths", "value_lengths"])
        raw = bytearray(getattr(good, piece))
        raw[rng.randrange(len(raw))] = rng.choice([0, 1, 2, 0x80, 0xE4, 0xF0, 0xFF, rng.randrange(256)])
        damaged = replace(good, **{piece: bytes(raw)})
        outcomes = []
        for fill in FILLS:
            data: dict[str, bytes] = {}
            try:
                outcomes.append(fill_with(fill, data, damaged))
            except ValueError as exc:
                outcomes.append(str(exc))
            outcomes.append(data)
        assert outcomes[:2] == outcomes[2:], damaged


@pytest.mark.usefixtures("each_fill")
def test_a_file_with_a_block_that_does_not_add_up_is_corrupt_after_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "0.snap"
    writer = SnapshotWriter(path, HEADER)
    writer.open()
    writer.append(encode_block(["a"], [b"1"]), 1)
    pieces = encode_block(["ab", "c"], [b"1", b"2"])
    pieces[1] = struct.pack("<2I", 1, 2)  # key lengths a writer's bug got wrong
    writer.append(pieces, 2)
    writer.finish()
    with pytest.raises(SnapshotError, match="no NUL after key 0") as caught:
        read_entries(path)
    assert caught.value.reason == "corrupt" and caught.value.partial
