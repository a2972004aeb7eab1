"""The plugin-facing contract: events, their items, and the Plugin base class.

This mirrors cn-infra's ``datasync_api.go``: a plugin receives one full RESYNC
event and then incremental CHANGE events. Returning from a handler is the
concept's ``Done(nil)``; raising is ``Done(err)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from datasync.codecs import Codec
from datasync.table import Entry

Op = Literal["put", "delete"]

_UNSET: Any = object()


class KeyValue:
    """One current key/value of a resync. The value is decoded on first access."""

    __slots__ = ("topic", "key", "_entry", "_codec", "_value")

    def __init__(self, topic: str, key: str, entry: Entry, codec: Codec) -> None:
        self.topic = topic
        self.key = key
        self._entry = entry
        self._codec = codec
        self._value = _UNSET

    @property
    def value(self) -> Any:
        if self._value is _UNSET:
            self._value = self._codec.decode(self._entry.value)
        return self._value

    @property
    def raw_value(self) -> bytes:
        return self._entry.value

    @property
    def revision(self) -> int:
        """The Kafka offset of the record that set this value."""
        return self._entry.offset

    @property
    def partition(self) -> int:
        return self._entry.partition

    @property
    def timestamp(self) -> int:
        """Record timestamp in milliseconds since the epoch."""
        return self._entry.timestamp

    def __repr__(self) -> str:
        return f"KeyValue({self.topic!r}, {self.key!r}, revision={self.revision})"


class KeyValues(Sequence[KeyValue]):
    """The key/values under one prefix, sorted by key, built lazily.

    Holding ``(key, entry)`` pairs instead of ready KeyValue objects keeps a
    resync of a million keys from allocating a million objects up front.
    """

    __slots__ = ("_topic", "_pairs", "_codec")

    def __init__(self, topic: str, pairs: list[tuple[str, Entry]], codec: Codec) -> None:
        self._topic = topic
        self._pairs = pairs
        self._codec = codec

    def __len__(self) -> int:
        return len(self._pairs)

    @overload
    def __getitem__(self, index: int) -> KeyValue: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[KeyValue]: ...
    def __getitem__(self, index: int | slice) -> KeyValue | Sequence[KeyValue]:
        if isinstance(index, slice):
            return KeyValues(self._topic, self._pairs[index], self._codec)
        key, entry = self._pairs[index]
        return KeyValue(self._topic, key, entry, self._codec)

    def __iter__(self) -> Iterator[KeyValue]:
        topic, codec = self._topic, self._codec
        for key, entry in self._pairs:
            yield KeyValue(topic, key, entry, codec)


class Change:
    """One incremental change of a key.

    ``prev_value`` is the previous value *of this key* in the state table (not
    the previous message of the stream); it is decoded on first access.
    """

    __slots__ = ("topic", "op", "key", "value", "revision", "partition", "timestamp", "_prev", "_codec")

    def __init__(
        self,
        topic: str,
        op: Op,
        key: str,
        value: Any,
        prev: Entry | None,
        revision: int,
        partition: int,
        timestamp: int,
        codec: Codec,
    ) -> None:
        self.topic = topic
        self.op = op
        self.key = key
        self.value = value
        self.revision = revision
        self.partition = partition
        self.timestamp = timestamp
        self._prev = prev
        self._codec = codec

    @property
    def prev_value(self) -> Any:
        return None if self._prev is None else self._codec.decode(self._prev.value)

    @property
    def prev_revision(self) -> int | None:
        return None if self._prev is None else self._prev.offset

    def __repr__(self) -> str:
        return f"Change({self.op} {self.topic!r} {self.key!r} revision={self.revision})"


@dataclass(frozen=True)
class ResyncEvent:
    """Every current key/value under the plugin's watched prefixes, grouped by prefix."""

    values: Mapping[str, Sequence[KeyValue]]

    def __len__(self) -> int:
        return sum(len(items) for items in self.values.values())


@dataclass(frozen=True)
class ChangeEvent:
    """A batch of changes, in per-partition offset order."""

    changes: Sequence[Change]


@dataclass
class PluginContext:
    """What a plugin gets at start: its name, its settings from the bindings, a logger."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("datasync.plugin"))


class Plugin:
    """Base class of plugins. Override ``resync`` and ``change``; the hooks are optional."""

    async def start(self, ctx: PluginContext) -> None:
        """Called once before the first resync."""

    async def resync(self, event: ResyncEvent) -> None:
        """Apply the full desired state. Raise to report failure (it will be retried)."""
        raise NotImplementedError

    async def change(self, event: ChangeEvent) -> None:
        """Apply a batch of incremental changes. Raise to report failure."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Called once at shutdown, after the last event."""
