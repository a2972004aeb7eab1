"""Example plugins: an in-memory "router" that applies interfaces, then routes over them.

``Routes`` checks that a route's outgoing interface exists by reading the
interfaces table through its context (``ctx.table``): no state is shared
between the two plugins.
"""

from __future__ import annotations

from typing import Any

from datasync import ChangeEvent, Plugin, PluginContext, ResyncEvent
from datasync.views import TableView

INTERFACES_TOPIC = "demo.interfaces"
INTERFACES_PREFIX = "config/vpp/v2/interfaces/"  # + interface name


class Interfaces(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.log = ctx.logger
        self.interfaces: dict[str, dict[str, Any]] = {}  # name -> configuration, as "applied"

    async def resync(self, event: ResyncEvent) -> None:
        self.interfaces = {kv.value["name"]: kv.value for items in event.values.values() for kv in items}
        self.log.info("resync: %d interfaces: %s", len(self.interfaces), sorted(self.interfaces))

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.op == "put":
                self.interfaces[ch.value["name"]] = ch.value
                mtu = (ch.prev_value or {}).get("mtu")
                self.log.info("put %s (rev %d): mtu %s -> %s", ch.key, ch.revision, mtu, ch.value["mtu"])
            else:
                self.interfaces.pop(ch.prev_value["name"], None)
                self.log.info("delete %s (rev %d), was %s", ch.key, ch.revision, ch.prev_value)


class Routes(Plugin):
    async def start(self, ctx: PluginContext) -> None:
        self.log = ctx.logger
        self.interfaces: TableView = ctx.table(ctx.settings.get("interfaces_topic", INTERFACES_TOPIC))
        self.routes: dict[str, dict[str, Any]] = {}
        self.unresolved: set[str] = set()  # keys of routes whose interface does not exist (yet)

    async def resync(self, event: ResyncEvent) -> None:
        self.routes = {kv.key: kv.value for items in event.values.values() for kv in items}
        self.unresolved = set()
        self.log.info("resync: %d routes", len(self.routes))
        for key, route in self.routes.items():
            self._check(key, route)

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.op == "put":
                self.routes[ch.key] = ch.value
                self.log.info("put %s (rev %d): %s via %s", ch.key, ch.revision, ch.value["dst_network"],
                              ch.value["outgoing_interface"])  # fmt: skip
                self._check(ch.key, ch.value)
            else:
                self.routes.pop(ch.key, None)
                self.unresolved.discard(ch.key)
                self.log.info("delete %s (rev %d)", ch.key, ch.revision)

    def _check(self, key: str, route: dict[str, Any]) -> None:
        if INTERFACES_PREFIX + route["outgoing_interface"] in self.interfaces:
            self.unresolved.discard(key)
            return
        self.unresolved.add(key)
        self.log.warning("route %s refers to unknown interface %s", route["dst_network"], route["outgoing_interface"])
