"""The snapshot file format on its own: round trips, and every kind of damage is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasync.snapshotfile import MAGIC, Header, SnapshotError, SnapshotWriter, encode_block, read_entries, read_header
from datasync.table import pack

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


@pytest.mark.parametrize(
    "blocks",
    [
        [["a", "b"], ["c"]],
        [["with\0nul", "", "\0", "ü\0é", "plain"]],  # NUL inside keys: read by their lengths
        [[f"k{i}" for i in range(5000)]],
        [],
    ],
)
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
