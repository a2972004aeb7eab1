"""The plugin test kit (datasync.testing), and the example plugins tested with it: no broker involved."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from datasync import ChangeEvent, Plugin, PluginContext, PluginError, PluginState, ResyncEvent
from datasync.errors import EncodeError
from datasync.testing import Harness, change_event, resync_event

from examples.demo import Interfaces, Routes
from recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]
IF, RT = "config/vpp/v2/interfaces/", "config/vpp/v2/routes/"


def interface(name: str, mtu: int = 1500) -> dict[str, Any]:
    return {"name": name, "mtu": mtu}


def route(dst: str, via: str) -> dict[str, Any]:
    return {"dst_network": dst, "next_hop": "10.0.0.254", "outgoing_interface": via}


@pytest.fixture
async def demo() -> Any:
    async with Harness(schemas=ROOT / "schemas") as h:
        h.topic("demo.interfaces", "avro:demo.Interface")
        h.topic("demo.routes", "avro:demo.Route")
        h.plugin("interfaces", Interfaces(), {"demo.interfaces": [IF]})
        h.plugin("routes", Routes(), {"demo.routes": [RT]}, after=["interfaces"])  # as in topics/demo.yaml
        yield h


async def test_demo_routes_check_interfaces_through_the_table(demo: Harness) -> None:
    interfaces, routes = demo.plugin_named("interfaces"), demo.plugin_named("routes")
    await demo.start({
        "demo.interfaces": {IF + "eth0": interface("eth0"), IF + "eth1": interface("eth1")},
        "demo.routes": {RT + "r1": route("10.1.0.0/16", "eth1"), RT + "r2": route("10.2.0.0/16", "eth9")},
    })  # fmt: skip
    assert isinstance(interfaces, Interfaces) and isinstance(routes, Routes)
    # values come through the real codec: the schema's defaults are filled in
    assert interfaces.interfaces["eth0"] == {"name": "eth0", "enabled": True, "mtu": 1500, "ip_addresses": []}
    assert routes.unresolved == {RT + "r2"}

    await demo.put("demo.interfaces", IF + "eth9", interface("eth9"))
    await demo.put("demo.routes", RT + "r2", route("10.2.0.0/16", "eth9"))  # the same value: no change
    assert routes.unresolved == {RT + "r2"}
    await demo.put("demo.routes", RT + "r2", route("10.2.0.0/24", "eth9"))  # re-checked: eth9 exists now
    assert routes.unresolved == set() and sorted(interfaces.interfaces) == ["eth0", "eth1", "eth9"]
    await demo.write([("demo.interfaces", IF + "eth1", None), ("demo.routes", RT + "r3", route("10.3.0.0/16", "eth1"))])
    assert "eth1" not in interfaces.interfaces and routes.unresolved == {RT + "r3"}
    await demo.delete("demo.routes", RT + "r3")
    assert routes.unresolved == set() and sorted(routes.routes) == [RT + "r1", RT + "r2"]
    assert demo.status("routes").changes_applied == 3 and demo.status("interfaces").state is PluginState.READY


async def test_values_that_do_not_match_the_schema_are_refused(demo: Harness) -> None:
    await demo.start()
    with pytest.raises(EncodeError, match=r"demo\.Interface"):
        await demo.put("demo.interfaces", IF + "x", {"name": 7})


class Flaky(Recorder):
    """Fails its first resyncs, and changes of keys starting with ``bad``; publishes what it applies."""

    async def start(self, ctx: PluginContext) -> None:
        self.out = ctx.publisher("mirror")

    async def resync(self, event: ResyncEvent) -> None:
        await super().resync(event)
        await self.out.put_many(list(self.view.items()))

    async def change(self, event: ChangeEvent) -> None:
        bad = [c.key for c in event.changes if c.key.startswith("bad")]
        if bad:
            raise PluginError("refused", keys=bad)
        await super().change(event)
        for c in event.changes:
            self.out.put_nowait(c.key, c.value)


async def test_the_engine_rules_apply() -> None:
    journal: list[tuple[str, str]] = []
    async with Harness() as h:
        h.publisher("mirror", "out")
        h.publisher("status", "status")
        first = Recorder("first", journal, fail_resyncs=1)
        flaky = Flaky("flaky", journal, fail_resyncs=1)
        h.plugin("first", first, {"in": ["a/"]})
        h.plugin("flaky", flaky, {"in": ["a/", "bad"]}, status="status")
        await h.start({"in": {"a/1": 1, "b/1": 2}})
        # both failed their first resync: nobody is ready, nothing is delivered yet
        assert journal == [("resync", "first"), ("resync", "flaky")]
        assert h.status("flaky").state is PluginState.RESYNCING and "refused" in (h.status("flaky").last_error or "")
        await h.put("in", "a/2", 3)  # a step: changes to nobody, then the retries, in declared order
        assert journal[2:] == [("resync", "first"), ("resync", "flaky")]
        assert first.view == flaky.view == {"a/1": 1, "a/2": 3}
        assert h.published("mirror") == [("a/1", 1), ("a/2", 3)]

        await h.write([("in", "a/1", 10), ("in", "b/2", 0), ("in", "a/1", 10), ("in", "bad/1", 5)])
        assert [(c.key, c.prev_value, c.revision) for c in first.changes] == [("a/1", 1, 3)]
        # flaky's change failed every attempt: skipped, recorded, apply status per key
        assert h.status("flaky").change_failures == 1 and "refused" in (h.status("flaky").last_error or "")
        assert h.metrics.plugin_failures.labels("flaky", "change")._value.get() == h.sync.change_max_attempts
        status = dict(h.published("status"))
        assert status["bad/1"]["status"] == "error" and status["a/1"]["status"] == "ok"

        await h.delete("in", "a/2")
        await h.delete("in", "never")  # a delete of an unknown key is no change
        assert [(c.op, c.key, c.prev_value) for c in first.changes[1:]] == [("delete", "a/2", 3)]
        assert h.published("mirror")[-1] == ("a/2", None)
        assert dict(h.table("in")) == {"a/1": 10, "b/1": 2, "b/2": 0, "bad/1": 5}

        await h.resync({"in": {"a/9": 9}})
        assert first.view == {"a/9": 9} and h.status("first").state is PluginState.READY
    assert journal[-1] == ("resync", "flaky")


class Picky(Plugin):
    resync_after_failed_change = True

    def __init__(self) -> None:
        self.resyncs = 0

    async def resync(self, event: ResyncEvent) -> None:
        self.resyncs += 1
        if self.resyncs > 2:
            raise RuntimeError("never again")

    async def change(self, event: ChangeEvent) -> None:
        raise RuntimeError("no")


async def test_failed_changes_can_mean_a_resync_and_failing_resyncs_are_retried() -> None:
    async with Harness() as h:
        plugin = Picky()
        h.plugin("picky", plugin, {"t": [""]})
        await h.start()
        await h.put("t", "k", 1)  # the change fails: picky asks for a full resync instead
        assert plugin.resyncs == 2 and h.status("picky").state is PluginState.READY
        await h.put("t", "k", 2)
        for _ in range(h.sync.resync_max_attempts):
            await h.step()
        assert h.status("picky").state is PluginState.FAILED  # visible, and still retried
        plugin.resyncs = 0  # it recovers
        await h.step()
        assert h.status("picky").state is PluginState.READY and h.status("picky").last_error is None


def test_events_from_plain_values() -> None:
    event = resync_event({"t": {"b": {"x": 1}, "a": [1, 2], "z/1": None}}, watch={"t": ["", "z/"]})
    assert [(kv.key, kv.value, kv.revision) for kv in event.values[""]] == [("a", [1, 2], 1), ("b", {"x": 1}, 0)]
    assert len(event.values["z/"]) == 0 and event.positions == {("t", 0): 3}
    changes = change_event([("t", "a", 2), ("t", "b", None), ("t", "a", 2)], before={"t": {"a": 1, "b": 5}})
    assert [(c.op, c.key, c.value, c.prev_value) for c in changes.changes] == [
        ("put", "a", 2, 1),
        ("delete", "b", None, 5),
    ]
    kv = event.values[""][0]
    kv.value.append(3)  # a plugin mutating its value does not change the next read
    assert resync_event({"t": {"a": [1, 2]}}).values[""][0].value == [1, 2]


class Slow(Recorder):
    async def change(self, event: ChangeEvent) -> None:
        await asyncio.sleep(0.05)
        await super().change(event)


async def test_after_orders_the_changes_of_independent_plugins() -> None:
    journal: list[tuple[str, str]] = []
    async with Harness() as h:
        h.plugin("slow", Slow("slow", journal), {"t": [""]})
        h.plugin("fast", Recorder("fast", journal), {"t": [""]})
        h.plugin("later", Recorder("later", journal), {"t": [""]}, after=["slow"])
        await h.start()
        await h.put("t", "k", 1)
        changes = [name for kind, name in journal if kind == "change"]
        assert changes == ["fast", "slow", "later"]  # fast does not wait for slow; later does
        with pytest.raises(ValueError, match="not registered before"):
            h.plugin("early", Recorder(), {"t": [""]}, after=["nobody"])
