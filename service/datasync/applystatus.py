"""Apply status: each key's result in a plugin, published to a status topic keyed like the source.

The value is ``{status: ok|error, error, revision, plugin, ts_ms}``; a later
success overwrites an error, and a key deleted from the source gets a
tombstone, so a compacted status topic holds one current line per key.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable

from datasync.api import ChangeEvent, PluginError, ResyncEvent
from datasync.errors import EncodeError
from datasync.publish import Publisher, PublishError

log = logging.getLogger("datasync.status")

CHUNK = 10_000


class ApplyStatus:
    def __init__(self, publisher: Publisher, plugin: str) -> None:
        self._publisher = publisher
        self._plugin = plugin

    async def resynced(self, event: ResyncEvent, error: BaseException | None) -> None:
        keys = ((kv.key, kv.revision) for items in event.values.values() for kv in items)
        await self._publish(self._lines(keys, error))

    async def changed(self, event: ChangeEvent, error: BaseException | None) -> None:
        named = set(error.keys) if isinstance(error, PluginError) and error.keys else None
        failed = {c.key for c in event.changes} if error is not None and named is None else (named or set())
        lines = [
            (c.key, self._value(c.revision, repr(error)))
            if c.key in failed
            else (c.key, None if c.op == "delete" else self._value(c.revision, None))
            for c in event.changes
            if c.op != "release"  # the key's new owner reports it
        ]
        await self._publish(lines)

    def _lines(self, keys: Iterable[tuple[str, int]], error: BaseException | None) -> Iterable[tuple[str, object]]:
        """One line per key: an error names its keys (PluginError) or fails them all; the rest are ok."""
        named = set(error.keys) if isinstance(error, PluginError) and error.keys else None
        for key, revision in keys:
            failed = error is not None and (named is None or key in named)
            yield key, self._value(revision, repr(error) if failed else None)

    def _value(self, revision: int, error: str | None) -> dict[str, object]:
        return {
            "status": "ok" if error is None else "error",
            "error": error,
            "revision": revision,
            "plugin": self._plugin,
            "ts_ms": int(time.time() * 1000),
        }

    async def _publish(self, lines: Iterable[tuple[str, object]]) -> None:
        """Publish in chunks; a failure is logged, never raised into the engine."""
        iterator = iter(lines)
        while chunk := list(itertools.islice(iterator, CHUNK)):
            try:
                await self._publisher.put_many(chunk)
            except (PublishError, EncodeError) as exc:
                log.error("plugin %s: apply status not published: %s", self._plugin, exc)
                return
