"""A plugin for the shutdown test: republishes every change fire-and-forget and logs how many at stop."""

from __future__ import annotations

from datasync import ChangeEvent, Plugin, PluginContext, ResyncEvent


class Echo(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.out = ctx.publisher("echo")
        self.log = ctx.logger
        self.sent = 0

    async def resync(self, event: ResyncEvent) -> None:
        pass

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            self.out.put_nowait(ch.key, {"n": self.sent, "s": "echo"})
            self.sent += 1

    async def stop(self) -> None:
        self.log.info("echo sent %d", self.sent)
