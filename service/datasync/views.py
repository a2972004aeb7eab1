"""Read-only views of state tables, for plugins that depend on other topics' state.

A ``routes`` plugin checks that a route's interface exists by reading the
``interfaces`` table through ``ctx.table("demo.interfaces")`` instead of
sharing a dict with the ``interfaces`` plugin. A view always reads the
engine's *current* table (it follows rebuilds); values are decoded on access.

What "current" means: the engine folds a whole fetched batch into every
table before delivering its changes, plugin by plugin in declared order, so
during a call a plugin sees its own topics and the others as of that batch.
Use a view during ``resync``/``change`` calls: between them the tables move on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from datasync.api import KeyValue, KeyValues
from datasync.codecs import Codec
from datasync.table import StateTable


class TableView(Mapping[str, Any]):
    """``key -> current value`` of one topic (a read-only Mapping, keys in order), plus revisions."""

    def __init__(self, topic: str, tables: Callable[[], Mapping[str, StateTable]], codec: Codec) -> None:
        self.topic = topic
        self._tables = tables  # the engine's tables of the moment: a rebuild replaces them
        self._codec = codec

    def _table(self) -> StateTable:
        return self._tables()[self.topic]

    def __getitem__(self, key: str) -> Any:
        packed = self._table().data.get(key)
        if packed is None:
            raise KeyError(key)
        return KeyValue(self.topic, key, packed, self._codec).value

    def __contains__(self, key: object) -> bool:
        return key in self._table().data

    def __iter__(self) -> Iterator[str]:
        return iter(self._table().keys_under(""))

    def __len__(self) -> int:
        return len(self._table())

    def entry(self, key: str) -> KeyValue | None:
        """The key's value with its revision, partition and timestamp (None if absent)."""
        packed = self._table().data.get(key)
        return None if packed is None else KeyValue(self.topic, key, packed, self._codec)

    def under(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> KeyValues:
        """The entries whose key starts with ``prefix``, in key order; ``after`` and ``limit`` page through them."""
        table = self._table()
        return KeyValues([(self.topic, self._codec, table.keys_under(prefix, after, limit), table.data)])
