"""The snapshot file of one (topic, partition): a small header, then the table's packed entries.

Layout (integers little-endian)::

    MAGIC (8 bytes) | header length (u32) | header (JSON) |
    blocks: entries n (u32), key text bytes (u32), value bytes (u32),
            n key lengths in characters (u32), n value lengths (u32), keys (UTF-8, NUL between), values |
    an empty block (n = 0) | entries (u64) | CRC-32 of every byte before it (u32)

A block holds a few thousand entries, so the writer never builds more than that in memory and
the reader adds a block to a table in one call (``fill_block``: one decode of the keys, then
each key and value cut straight into the table's dict). ``datasync._snapblock`` is that call
compiled (built by ``pip install`` when a C compiler is there); ``fill_block_py`` is the
pure-Python fallback giving the same results. Values are the table's packed states (value +
offset/timestamp/partition trailer), unchanged.

Files are written under a temporary name, fsynced and renamed: a reader sees a whole file or
the previous one. A file that is torn anyway (a disk that lies, a copy cut short) fails the
length or checksum checks and raises ``SnapshotError``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import accumulate, pairwise
from pathlib import Path
from sys import intern
from typing import BinaryIO

from datasync.table import Packed

FORMAT_VERSION = 1
MAGIC = b"DSSNAP\r\n"
SUFFIX = ".snap"
TMP_SUFFIX = ".snap.tmp"
_LENGTH = struct.Struct("<I")
_BLOCK = struct.Struct("<III")
_ENTRIES = struct.Struct("<Q")
_LITTLE = sys.byteorder == "little"
_SEPARATOR = "\0"
_READ_SIZE = 1 << 20
if array("I").itemsize != 4:  # pragma: no cover - every platform CPython supports today
    raise ImportError("snapshots need 4-byte unsigned ints in array('I')")


class SnapshotError(Exception):
    """A snapshot that cannot be used; ``reason`` is a short fixed word (a metric label)."""

    def __init__(self, reason: str, detail: str, partial: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.partial = partial  # entries were added before the error was found


@dataclass(frozen=True)
class Header:
    """What a snapshot covers and for which bindings it was written."""

    topic: str
    partition: int
    partitions: int  # the topic's partition count when written
    codec: str  # the codec identity (spec, schema fingerprints, value limit)
    position: int  # first offset not included
    since_ms: int  # every record at or after ``position`` was appended after this (unix ms)
    written_ms: int
    probe: tuple[int, int, str] | None = None  # offset, timestamp, key of one record it holds
    format: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def path_of(directory: Path, topic: str, partition: int) -> Path:
    return directory / topic / f"{partition}{SUFFIX}"


def _lengths(items: list[str] | list[bytes]) -> bytes:
    lengths = array("I", map(len, items))
    if not _LITTLE:  # pragma: no cover
        lengths.byteswap()
    return lengths.tobytes()


def _parse_lengths(raw: bytes) -> array[int]:
    lengths = array("I")
    lengths.frombytes(raw)
    if not _LITTLE:  # pragma: no cover
        lengths.byteswap()
    return lengths


def encode_block(keys: list[str], values: list[Packed]) -> list[bytes]:
    """One block of entries, as pieces to write in order.

    Keys are joined with NUL, so that reading splits them in one call; their lengths are stored
    too, for keys that contain a NUL themselves.
    """
    text = _SEPARATOR.join(keys).encode()
    body = b"".join(values)
    return [_BLOCK.pack(len(keys), len(text), len(body)), _lengths(keys), _lengths(values), text, body]


class SnapshotWriter:
    """Writes one partition's file; ``append`` and ``finish`` block on I/O (run them in a thread)."""

    def __init__(self, path: Path, header: Header) -> None:
        self.path = path
        self.tmp = path.with_name(path.name.removesuffix(SUFFIX) + TMP_SUFFIX)
        self.entries = 0
        self.size = 0
        self._crc = 0
        self._file: BinaryIO | None = None
        self._header = header.encode()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # closed by finish() or discard()
        self.append([MAGIC, _LENGTH.pack(len(self._header)), self._header], 0)

    def append(self, pieces: list[bytes], entries: int) -> None:
        assert self._file is not None
        crc, write = self._crc, self._file.write
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
            write(piece)
            self.size += len(piece)
        self._crc = crc
        self.entries += entries

    def finish(self) -> None:
        """Terminate, checksum, fsync, rename over the previous snapshot, fsync the directory."""
        assert self._file is not None
        self.append([_BLOCK.pack(0, 0, 0), _ENTRIES.pack(self.entries)], 0)
        self._file.write(_LENGTH.pack(self._crc))
        self.size += _LENGTH.size
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.path)
        fsync_directory(self.path.parent)

    def discard(self) -> None:
        """Drop an unfinished file (a failed or cancelled write)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        return _header(f.read, lambda _raw: None)


def _header(read: Callable[[int], bytes], seen: Callable[[bytes], None]) -> Header:
    magic = read(len(MAGIC))
    if magic != MAGIC:
        raise SnapshotError("format", "not a datasync snapshot file")
    raw_length = read(_LENGTH.size)
    (length,) = _LENGTH.unpack(raw_length) if len(raw_length) == _LENGTH.size else (-1,)
    raw = read(length) if 0 <= length <= 1 << 20 else b""
    if len(raw) != length:
        raise SnapshotError("truncated", "header cut short")
    for piece in (magic, raw_length, raw):
        seen(piece)
    try:
        fields = json.loads(raw)
        if fields.get("format") != FORMAT_VERSION:
            raise SnapshotError("version", f"format {fields.get('format')!r}, this version reads {FORMAT_VERSION}")
        probe = fields.pop("probe", None)
        return Header(**fields, probe=None if probe is None else (int(probe[0]), int(probe[1]), str(probe[2])))
    except SnapshotError:
        raise
    except (ValueError, TypeError) as exc:
        raise SnapshotError("format", f"bad header: {exc}") from exc


class SnapshotReader:
    """Reads one file: ``verify`` checks the whole file's checksum and returns its header (blocking:
    run it in a thread); then ``blocks`` yields the blocks one at a time, and filling one into a
    table is short enough to run on the event loop.

    An error found after ``verify`` (only a bug in the writer could cause one after the checksum
    passed) raises SnapshotError with ``partial`` set: the entries added before were wrong too.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # closed by close()
        self._size = os.fstat(self._file.fileno()).st_size

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def verify(self) -> Header:
        f = self._file
        _verify_checksum(f, self._size)
        f.seek(0)
        return _header(f.read, lambda _raw: None)

    def blocks(self) -> Iterator[Block]:
        """After ``verify``: each block as read, to be filled into a table before the next one."""
        total = 0
        while True:
            n, text_bytes, value_bytes = _BLOCK.unpack(self._take(_BLOCK.size))
            if n == 0:
                break
            key_lengths, value_lengths = self._take(4 * n), self._take(4 * n)
            yield Block(n, self._take(text_bytes), key_lengths, value_lengths, self._take(value_bytes))
            total += n
        (count,) = _ENTRIES.unpack(self._take(_ENTRIES.size))
        if count != total or self._file.tell() != self._size - _LENGTH.size:
            raise SnapshotError("corrupt", f"{total} entries, the end says {count}", partial=True)

    def _take(self, n: int) -> bytes:
        f = self._file
        raw = f.read(n) if n <= self._size - f.tell() else b""  # never allocate what a bad length claims
        if len(raw) != n:
            raise SnapshotError("corrupt", f"a length points {n - len(raw)} bytes past the end", partial=True)
        return raw


@dataclass(frozen=True, slots=True)
class Block:
    """One block's pieces as read; its lengths are checked when it is filled."""

    n: int
    text: bytes  # the keys, UTF-8, NUL between
    key_lengths: bytes  # n u32, in characters
    value_lengths: bytes  # n u32
    body: bytes  # the values, back to back

    def fill(self, data: dict[str, Packed], interned: bool) -> None:
        """Add the block's entries to ``data``, keys interned if ``interned`` (as the table's are)."""
        with _corrupt():
            fill_block(data, self.n, self.text, self.key_lengths, self.value_lengths, self.body, interned)

    def values(self) -> list[Packed]:
        """The block's values, for a look before filling (a registry codec loads their schemas)."""
        with _corrupt():
            return _values(self.n, self.value_lengths, self.body)


@contextmanager
def _corrupt() -> Iterator[None]:
    """A block that does not add up is a corrupt snapshot (some of which may be in the table)."""
    try:
        yield
    except ValueError as exc:
        raise SnapshotError("corrupt", str(exc), partial=True) from exc


def fill_block_py(
    data: dict[str, Packed],
    n: int,
    text: bytes,
    key_lengths: bytes,
    value_lengths: bytes,
    body: bytes,
    interned: bool,
    /,
) -> int:
    """Add a block's n entries to ``data`` and return n; raise ValueError, before adding any, if
    its pieces do not match: the lengths must add up to the values' bytes and to the keys'
    characters with a NUL after every key but the last (keys may hold NULs: they are cut by
    their lengths), and the keys must be UTF-8. The compiled fill checks in the same order."""
    values = _values(n, value_lengths, body)
    keys = _keys(n, text, key_lengths)
    data.update(zip(map(intern, keys) if interned else keys, values, strict=True))
    return n


def _values(n: int, value_lengths: bytes, body: bytes) -> list[Packed]:
    if n < 1:
        raise ValueError(f"a block holds at least one entry, not {n}")
    lengths = _counted(n, value_lengths, "value")
    if (total := sum(lengths)) != len(body):
        raise ValueError(f"value lengths add up to {total} bytes, the values are {len(body)}")
    return [body[a:b] for a, b in pairwise(accumulate(lengths, initial=0))]


def _keys(n: int, text: bytes, key_lengths: bytes) -> list[str]:
    lengths = _counted(n, key_lengths, "key")
    try:
        keys = text.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"keys are not UTF-8: {exc}") from exc
    if (chars := sum(lengths) + n - 1) != len(keys):
        raise ValueError(f"key lengths and NULs add up to {chars} characters, the keys are {len(keys)}")
    split = keys.split(_SEPARATOR)
    if len(split) == n and array("I", map(len, split)) == lengths:
        return split
    starts = list(accumulate((length + 1 for length in lengths), initial=0))  # some key holds a NUL
    for i, end in enumerate(starts[1:-1]):
        if keys[end - 1] != _SEPARATOR:
            raise ValueError(f"no NUL after key {i}: a key length is wrong")
    return [keys[a : a + length] for a, length in zip(starts, lengths, strict=False)]


def _counted(n: int, raw: bytes, what: str) -> array[int]:
    if len(raw) != 4 * n:
        raise ValueError(f"{n} entries but {len(raw)} bytes of {what} lengths")
    return _parse_lengths(raw)


FillBlock = Callable[[dict[str, Packed], int, bytes, bytes, bytes, bytes, bool], int]
fill_block: FillBlock = fill_block_py
try:  # the compiled fill, if pip built it
    from datasync import _snapblock
except ImportError:  # built without a C compiler: the pure-Python fill above
    COMPILED = False
else:
    fill_block = _snapblock.fill
    COMPILED = True


def read_entries(path: Path) -> tuple[Header, dict[str, Packed]]:
    """A whole file at once (for tools and tests); blocking."""
    entries: dict[str, Packed] = {}
    with SnapshotReader(path) as reader:
        header = reader.verify()
        for block in reader.blocks():
            block.fill(entries, interned=False)
    return header, entries


def _verify_checksum(f: BinaryIO, size: int) -> None:
    """CRC-32 of every byte but the last four, against those four."""
    if size < len(MAGIC) + _LENGTH.size:
        raise SnapshotError("truncated", f"{size} bytes")
    crc, left = 0, size - _LENGTH.size
    while left:
        raw = f.read(min(left, _READ_SIZE))
        if not raw:
            raise SnapshotError("truncated", "the file shrank while it was read")
        crc = zlib.crc32(raw, crc)
        left -= len(raw)
    if _LENGTH.unpack(f.read(_LENGTH.size))[0] != crc:
        raise SnapshotError("checksum", "CRC-32 mismatch (torn or damaged)")
