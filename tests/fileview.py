"""A plugin for crash tests: keeps its view of the keys in a JSON file another process can read.

With ``journal``, every event is also appended to that file, one line each: ``resync N``, ``put KEY``,
``delete KEY``, ``release KEY``, and ``stale KEY`` for a change whose previous value was not the view's.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from datasync import ChangeEvent, Plugin, PluginContext, ResyncEvent


class FileView(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.path = Path(ctx.settings["path"])
        self.resync_delay = float(ctx.settings.get("resync_delay_s", 0))
        self.view: dict[str, Any] = {}
        journal = ctx.settings.get("journal")
        self.journal = Path(journal) if journal else None

    async def resync(self, event: ResyncEvent) -> None:
        (self.path.parent / "resync-started").touch()
        await asyncio.sleep(self.resync_delay)
        self.view = {kv.key: kv.value for items in event.values.values() for kv in items}
        self._log([f"resync {len(self.view)}"])
        self._save()

    async def change(self, event: ChangeEvent) -> None:
        lines = []
        for ch in event.changes:
            if ch.prev_value != self.view.get(ch.key):
                lines.append(f"stale {ch.key}")
            lines.append(f"{ch.op} {ch.key}")
            if ch.op == "put":
                self.view[ch.key] = ch.value
            else:  # delete, or release: the key moved to another member
                self.view.pop(ch.key, None)
        self._log(lines)
        self._save()

    def _log(self, lines: list[str]) -> None:
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write("".join(line + "\n" for line in lines))

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.view))
        os.replace(tmp, self.path)
