"""A plugin for crash tests: keeps its view of the keys in a JSON file another process can read."""

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

    async def resync(self, event: ResyncEvent) -> None:
        (self.path.parent / "resync-started").touch()
        await asyncio.sleep(self.resync_delay)
        self.view = {kv.key: kv.value for items in event.values.values() for kv in items}
        self._save()

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.op == "put":
                self.view[ch.key] = ch.value
            else:
                self.view.pop(ch.key, None)
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.view))
        os.replace(tmp, self.path)
