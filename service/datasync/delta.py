"""Delta-mode resyncs: the changes that turn a plugin's view of the old tables into the new ones.

A plugin declared with ``resync_mode="delta"`` that was in sync when the tables were rebuilt
(after a fault) gets these changes instead of a full RESYNC: usually none, or a few.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from datasync.api import Change, Op
from datasync.codecs import Codec
from datasync.table import Entry, StateTable, same_value, value_of


def differences(
    watches: Mapping[str, Sequence[str]],
    old: Mapping[str, StateTable],
    new: Mapping[str, StateTable],
    codecs: Mapping[str, Codec],
    holds: Callable[[str, int], bool],
) -> list[Change]:
    """The changes from ``old`` to ``new`` under the watched prefixes, sorted by key per topic.

    A key gone from ``new`` is a ``delete``, or a ``release`` if its partition is not held any
    more (``holds(topic, partition)`` false: another fleet member has it now). Raises DecodeError
    if a new value cannot be decoded (a registry schema not loaded): the caller resyncs in full.
    """
    changes: list[Change] = []
    for topic, prefixes in watches.items():
        codec = codecs[topic]
        old_items = {k: e for p in prefixes for k, e in old[topic].under(p)}
        new_items = {k: e for p in prefixes for k, e in new[topic].under(p)}
        for key in sorted(old_items.keys() | new_items.keys()):
            before, after = old_items.get(key), new_items.get(key)
            if after is None:
                assert before is not None
                was = Entry.unpack(before)  # the tombstone itself may be compacted away: the last revision seen
                gone: Op = "delete" if holds(topic, was.partition) else "release"
                changes.append(Change(topic, gone, key, None, before, was.offset, was.partition, was.timestamp, codec))
            elif before is None or not same_value(before, value_of(after)):
                now = Entry.unpack(after)
                changes.append(Change(topic, "put", key, codec.decode(now.value), before, now.offset,
                                      now.partition, now.timestamp, codec))  # fmt: skip
    return changes
