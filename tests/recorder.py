"""A test plugin that records every event and keeps the view it implies."""

from __future__ import annotations

from typing import Any

from datasync import ChangeEvent, Plugin, ResyncEvent


class Recorder(Plugin):
    def __init__(
        self, name: str = "recorder", journal: list[tuple[str, str]] | None = None, fail_resyncs: int = 0
    ) -> None:
        self.name = name
        self.journal = journal if journal is not None else []
        self.fail_resyncs = fail_resyncs
        self.resyncs: list[dict[str, dict[str, Any]]] = []
        self.changes: list[Any] = []
        self.view: dict[str, Any] = {}
        self.stale_prev: list[Any] = []  # changes whose prev_value was not what this plugin had

    async def resync(self, event: ResyncEvent) -> None:
        self.journal.append(("resync", self.name))
        if self.fail_resyncs > 0:
            self.fail_resyncs -= 1
            raise RuntimeError(f"{self.name}: resync refused")
        grouped = {prefix: {kv.key: kv.value for kv in items} for prefix, items in event.values.items()}
        self.resyncs.append(grouped)
        self.view = {k: v for items in grouped.values() for k, v in items.items()}

    async def change(self, event: ChangeEvent) -> None:
        self.journal.append(("change", self.name))
        for ch in event.changes:
            self.changes.append(ch)
            if ch.prev_value != self.view.get(ch.key):
                self.stale_prev.append(ch)
            if ch.op == "put":
                self.view[ch.key] = ch.value
            else:
                self.view.pop(ch.key, None)
