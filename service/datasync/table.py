"""The per-topic state table: the last value of every key, as raw bytes.

Values are kept encoded (and decoded when a plugin reads them) so that memory
stays close to the size of the data: a decoded Avro record costs several times
its wire size in Python objects.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """The current state of one key: its encoded value and where it came from."""

    value: bytes
    offset: int
    partition: int
    timestamp: int


class StateTable:
    """Last value per key of one topic. A tombstone removes the key."""

    __slots__ = ("topic", "_data")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._data: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str) -> Entry | None:
        return self._data.get(key)

    def put(self, key: str, entry: Entry) -> Entry | None:
        """Store ``entry`` and return the entry it replaced."""
        data = self._data
        prev = data.get(key)
        data[key] = entry
        return prev

    def delete(self, key: str) -> Entry | None:
        """Remove ``key`` and return its last entry (None if it was unknown)."""
        return self._data.pop(key, None)

    def under(self, prefix: str) -> list[tuple[str, Entry]]:
        """The (key, entry) pairs whose key starts with ``prefix``, sorted by key."""
        return sorted(item for item in self._data.items() if item[0].startswith(prefix))

    def snapshot(self) -> dict[str, Entry]:
        """A shallow copy, for tests and tools that compare states."""
        return dict(self._data)
