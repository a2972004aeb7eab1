"""The plugin-facing contract: events, their items, and the Plugin base class.

This mirrors cn-infra's ``datasync_api.go``: a plugin receives one full RESYNC
event and then incremental CHANGE events. Returning from a handler is the
concept's ``Done(nil)``; raising is ``Done(err)``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, starmap
from typing import TYPE_CHECKING, Any, Literal, overload

from datasync.codecs import Codec
from datasync.publish import Publisher
from datasync.settings import KafkaSettings
from datasync.table import Entry, Packed, StateTable, value_of

if TYPE_CHECKING:
    from datasync.views import TableView

# "release" only with a group, in delta mode: the key moved to another member (it still exists).
Op = Literal["put", "delete", "release"]

# (start positions, end positions) -> batches of the changes in between; see datasync.replay
Replay = Callable[[Mapping[tuple[str, int], int], Mapping[tuple[str, int], int]], AsyncGenerator[list["Change"], None]]

_UNSET: Any = object()


class _PyKeyValue:
    """One current key/value of a resync. The value is decoded on first access.

    The pure-Python ``KeyValue``, used when its C twin ``datasync._keyvalue`` was not built: a
    resync hands plugins a KeyValue per key, and building 950,000 of these takes 0.42 s, against
    0.15 s (mostly the table lookups) for the compiled ones.
    """

    __slots__ = ("topic", "key", "_packed", "_codec", "_value")

    def __init__(self, topic: str, key: str, packed: Packed, codec: Codec) -> None:
        self.topic = topic
        self.key = key
        self._packed = packed
        self._codec = codec
        self._value = _UNSET

    @property
    def value(self) -> Any:
        if self._value is _UNSET:
            self._value = self._codec.decode(value_of(self._packed))
        return self._value

    @property
    def raw_value(self) -> bytes:
        return value_of(self._packed)

    @property
    def revision(self) -> int:
        """The Kafka offset of the record that set this value."""
        return Entry.unpack(self._packed).offset

    @property
    def partition(self) -> int:
        return Entry.unpack(self._packed).partition

    @property
    def timestamp(self) -> int:
        """Record timestamp in milliseconds since the epoch."""
        return Entry.unpack(self._packed).timestamp

    def __repr__(self) -> str:
        return f"KeyValue({self.topic!r}, {self.key!r}, revision={self.revision})"

    def __copy__(self) -> _PyKeyValue:
        """A copy (shallow or deep) shares the codec (configuration, not data) and decodes its own value."""
        return type(self)(self.topic, self.key, self._packed, self._codec)

    def __deepcopy__(self, memo: dict[int, Any]) -> _PyKeyValue:
        return self.__copy__()

    def __reduce__(self) -> tuple[Any, ...]:
        """Not pickled: it holds its topic's codec, and a registry codec holds credentials."""
        raise TypeError("a KeyValue is not pickled (it holds its topic's codec): keep kv.key and kv.value")


def _py_keyvalues(topic: str, codec: Codec, keys: list[str], data: Mapping[str, Packed]) -> Iterator[_PyKeyValue]:
    """The KeyValue of each of ``keys``, its state looked up in ``data`` as it goes."""
    for key in keys:
        yield _PyKeyValue(topic, key, data[key], codec)


if TYPE_CHECKING:  # the stub (_keyvalue.pyi) types both twins
    from datasync._keyvalue import KeyValue as KeyValue
    from datasync._keyvalue import keyvalues
else:
    try:  # the compiled twins, if pip built them
        from datasync._keyvalue import KeyValue, keyvalues
    except ImportError:  # built without a C compiler
        KeyValue, keyvalues = _PyKeyValue, _py_keyvalues


# A topic, its codec, keys in order and the table's mapping to look their states up in.
Segment = tuple[str, Codec, list[str], Mapping[str, Packed]]


class KeyValues(Sequence[KeyValue]):
    """The key/values under one prefix (of each watched topic, in turn), built lazily.

    It holds the sorted keys and looks each state up as it goes, so a resync
    of a million keys allocates no per-key objects up front. It reads the live
    table: use it during the ``resync`` call, which the table does not change.
    """

    __slots__ = ("_segments", "_len")

    def __init__(self, segments: list[Segment]) -> None:
        self._segments = segments
        self._len = sum(len(keys) for _, _, keys, _ in segments)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> KeyValue: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[KeyValue]: ...
    def __getitem__(self, index: int | slice) -> KeyValue | Sequence[KeyValue]:
        if isinstance(index, slice):
            return self._slice(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        for topic, codec, keys, data in self._segments:
            if index < len(keys):
                return KeyValue(topic, keys[index], data[keys[index]], codec)
            index -= len(keys)
        raise IndexError(index)

    def __iter__(self) -> Iterator[KeyValue]:
        return chain.from_iterable(starmap(keyvalues, self._segments))  # a Segment is keyvalues' arguments

    def _slice(self, index: slice) -> list[KeyValue]:
        """Only the KeyValues in the slice are built (a page of a million keys costs a page)."""
        start, stop, step = index.indices(self._len)
        if step != 1:
            return list(self)[index]
        out: list[KeyValue] = []
        for topic, codec, keys, data in self._segments:
            if start < len(keys) and stop > 0:
                out.extend(keyvalues(topic, codec, keys[max(start, 0) : stop], data))
            start, stop = start - len(keys), stop - len(keys)
        return out


def resync_values(
    watches: Mapping[str, Sequence[str]], tables: Mapping[str, StateTable], codecs: Mapping[str, Codec]
) -> dict[str, KeyValues]:
    """A resync's ``values``: per watched prefix, the current key/values of each topic watched with it."""
    segments: dict[str, list[Segment]] = {}
    for topic, prefixes in watches.items():
        table, codec = tables[topic], codecs[topic]
        for prefix in prefixes:
            segments.setdefault(prefix, []).append((topic, codec, table.keys_under(prefix), table.data))
    return {prefix: KeyValues(parts) for prefix, parts in segments.items()}


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
        prev: Packed | None,
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
        return None if self._prev is None else self._codec.decode(value_of(self._prev))

    @property
    def prev_revision(self) -> int | None:
        return None if self._prev is None else Entry.unpack(self._prev).offset

    def __repr__(self) -> str:
        return f"Change({self.op} {self.topic!r} {self.key!r} revision={self.revision})"


@dataclass(frozen=True)
class ResyncEvent:
    """Every current key/value under the plugin's watched prefixes, grouped by prefix.

    ``positions`` says how far the snapshot goes: for each watched
    ``(topic, partition)``, the offset of the first record it does not include.
    """

    values: Mapping[str, Sequence[KeyValue]]
    positions: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(items) for items in self.values.values())


@dataclass(frozen=True)
class ChangeEvent:
    """A batch of changes, in per-partition offset order."""

    changes: Sequence[Change]


@dataclass
class PluginContext:
    """What a plugin gets at start: its name and settings, a logger, publishers, what it watches.

    ``kafka`` and ``replay`` are for plugins that talk to Kafka themselves and
    must see history, as the built-in changefeed does. ``table(topic)`` reads
    other tables (see ``datasync.views``).
    """

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("datasync.plugin"))
    publishers: Mapping[str, Publisher] = field(default_factory=dict)
    watches: Mapping[str, Sequence[str]] = field(default_factory=dict)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    replay: Replay | None = None
    tables: Mapping[str, TableView] = field(default_factory=dict)

    def publisher(self, name: str) -> Publisher:
        try:
            return self.publishers[name]
        except KeyError:
            raise KeyError(f"no publisher {name!r} (declared: {', '.join(self.publishers) or 'none'})") from None

    def table(self, topic: str) -> TableView:
        """Read-only current values of a table topic (any topic a plugin watches), e.g. to check references."""
        try:
            return self.tables[topic]
        except KeyError:
            raise KeyError(f"no table {topic!r} (tables: {', '.join(self.tables) or 'none'})") from None


class PluginError(Exception):
    """Raise it to say which keys failed; other exceptions fail every key of the event."""

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class Plugin:
    """Base class of plugins. Override ``resync`` and ``change``; the hooks are optional.

    A CHANGE event that keeps failing is skipped after its retries. Plugins that
    must never skip one (the changefeed) set ``resync_after_failed_change`` and
    get a full RESYNC instead.
    """

    resync_after_failed_change = False

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
