"""Example plugins: an in-memory "router" that applies interfaces, then routes over them."""

from __future__ import annotations

import logging
from typing import Any

from datasync import ChangeEvent, Plugin, PluginContext, ResyncEvent

log = logging.getLogger("examples.demo")

# The configured interfaces, shared so that Routes can check its references.
INTERFACES: dict[str, dict[str, Any]] = {}


class Interfaces(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.log = ctx.logger

    async def resync(self, event: ResyncEvent) -> None:
        INTERFACES.clear()
        for prefix, items in event.values.items():
            for kv in items:
                INTERFACES[kv.value["name"]] = kv.value
            self.log.info("resync %s: %d interfaces: %s", prefix, len(items), sorted(INTERFACES))

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.op == "put":
                INTERFACES[ch.value["name"]] = ch.value
                self.log.info(
                    "%s %s (rev %d): mtu %s -> %s",
                    ch.op,
                    ch.key,
                    ch.revision,
                    (ch.prev_value or {}).get("mtu"),
                    ch.value["mtu"],
                )
            else:
                INTERFACES.pop(ch.prev_value["name"], None)
                self.log.info("delete %s (rev %d), was %s", ch.key, ch.revision, ch.prev_value)


class Routes(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.log = ctx.logger
        self.routes: dict[str, dict[str, Any]] = {}

    async def resync(self, event: ResyncEvent) -> None:
        self.routes = {kv.key: kv.value for items in event.values.values() for kv in items}
        self.log.info("resync: %d routes", len(self.routes))
        for route in self.routes.values():
            self._check(route)

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.op == "put":
                self.routes[ch.key] = ch.value
                self._check(ch.value)
                self.log.info(
                    "put %s (rev %d): %s via %s",
                    ch.key,
                    ch.revision,
                    ch.value["dst_network"],
                    ch.value["outgoing_interface"],
                )
            else:
                self.routes.pop(ch.key, None)
                self.log.info("delete %s (rev %d)", ch.key, ch.revision)

    def _check(self, route: dict[str, Any]) -> None:
        if route["outgoing_interface"] not in INTERFACES:
            self.log.warning(
                "route %s refers to unknown interface %s", route["dst_network"], route["outgoing_interface"]
            )
