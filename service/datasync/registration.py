"""A plugin's subscription to key prefixes of table topics (the concept's ``Watch``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

from datasync.api import Change, Plugin
from datasync.applystatus import ApplyStatus
from datasync.status import PluginStatus
from datasync.table import StateTable

ResyncMode = Literal["full", "delta"]


class Registration:
    """Returned by ``DataSync.watch``; ``close()`` ends this registration only."""

    def __init__(
        self,
        name: str,
        plugin: Plugin,
        watches: Mapping[str, Sequence[str]],
        settings: Mapping[str, Any],
        resync_mode: ResyncMode,
        apply_status: ApplyStatus | None,
        on_close: Callable[[Registration], Awaitable[None]],
    ) -> None:
        self.name = name
        self.plugin = plugin
        self.watches = {topic: tuple(prefixes) for topic, prefixes in watches.items()}
        self.settings = settings
        self.resync_mode = resync_mode
        self.apply_status = apply_status
        self.status = PluginStatus()
        self.due = 0.0  # monotonic time of the next resync attempt
        self.started = False
        # In delta mode, the tables the plugin was in sync with before a rebuild.
        self.delta_base: dict[str, StateTable] | None = None
        # In delta mode, with a group: the puts and releases an assignment change made.
        self.handover: list[Change] | None = None
        # A change was skipped since the last resync: the plugin's view is not the table's.
        self.diverged = False
        self._on_close = on_close

    async def close(self) -> None:
        """Stop delivering events to this plugin (others are unaffected) and stop it."""
        await self._on_close(self)
