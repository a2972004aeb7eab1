"""Rebalance rules that need no broker: an interrupted handover is finished, holding delivery is idempotent."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from aiohttp import web

from datasync.api import Change, ChangeEvent
from datasync.bindings import TopicSpec
from datasync.calls import PluginCalls
from datasync.delivery import Deliveries
from datasync.fleet import Fleet, Handover
from datasync.keylist import readable_table
from datasync.metrics import Metrics
from datasync.registration import Registration
from datasync.settings import GroupSettings, KafkaSettings, SyncSettings
from datasync.status import PluginState

from conftest import eventually


def test_an_interrupted_handover_is_finished_even_if_the_next_assignment_is_what_the_tables_hold() -> None:
    topics = {"a": TopicSpec(name="a", partitions=4, value="string", sharding="partitioned")}
    fleet = Fleet(KafkaSettings(), GroupSettings(id="g"), topics, Metrics(), lambda: None)
    # {0,1,2,3} -> {0,1,2,4} was interrupted while reading 4: 3 dropped, 4 not read, the handover pending
    fleet.held = frozenset({0, 1, 2})
    fleet._pending = Handover(moved={"a"}, released={"a": []})
    fleet.slots = frozenset({0, 1, 2})  # the next assignment
    assert fleet.moved  # the plugins still have to be resynced without partition 3
    fleet._pending = None
    assert not fleet.moved


def test_a_partitioned_table_is_not_read_over_http_while_its_partitions_move() -> None:
    """From a revocation to the end of the read of the gained partitions, the table lacks keys
    this member is about to own: key reads answer 503 (retry) rather than a wrong 404."""
    topics = {"a": TopicSpec(name="a", partitions=4, value="string", sharding="partitioned"),
              "r": TopicSpec(name="r", partitions=4, value="string")}  # fmt: skip
    fleet = Fleet(KafkaSettings(), GroupSettings(id="g"), topics, Metrics(), lambda: None)
    engine = SimpleNamespace(running=True, rebuilding=False, handing_over=fleet.handing_over, codec=lambda t: "codec",
                             table=lambda t: f"table {t}")  # fmt: skip
    fleet.held = fleet.slots = frozenset({0, 1})
    assert readable_table(engine, "a") == ("table a", "codec")
    fleet.revoking = True  # revoked, the next assignment not known yet
    for moment in ("revoked", "assigned"):
        answer = readable_table(engine, "a")
        assert isinstance(answer, web.Response) and answer.status == 503 and b"moving" in answer.body, moment
        assert readable_table(engine, "r") == ("table r", "codec")  # replicated: every partition is read
        fleet.revoking, fleet.slots = False, frozenset({0, 1, 2})  # assigned; partition 2 not read yet
    fleet.held = fleet.slots  # read
    assert readable_table(engine, "a") == ("table a", "codec")


class Slow:
    async def change(self, event: ChangeEvent) -> None:
        await asyncio.sleep(0.3)


async def test_holding_delivery_again_does_not_wait_for_a_drain_again() -> None:
    async def step() -> None:
        pass

    async def close(reg: Registration) -> None:
        pass

    async def room(plugin: str, most: int) -> None:
        pass

    deliveries = Deliveries(PluginCalls(SyncSettings(), Metrics(), room), 100, 1, step, lambda reg: None)
    reg = Registration("p", Slow(), {"t": ("",)}, {}, "full", None, close)
    reg.status.state = PluginState.READY
    deliveries.add(reg)
    change = Change("t", "put", "k", 1, None, 0, 0, 0, None)
    for seq in (1, 2, 3):
        await deliveries.put(seq, {reg: [change]})
    await asyncio.sleep(0)
    await deliveries.hold(0.5)  # the queue cannot drain in time: the rest waits
    started = time.monotonic()
    for _ in range(3):  # the engine loops while the assignment has not come
        await deliveries.hold(0.5)
    assert time.monotonic() - started < 0.5 and deliveries.queued(reg) >= 1
    deliveries.resume()

    async def drained() -> bool:
        return deliveries.queued(reg) == 0

    async with asyncio.timeout(5):
        await eventually(drained, 0.05)
    deliveries.halt()
    await deliveries.stop()


def assigned_fleet() -> Fleet:
    topics = {"a": TopicSpec(name="a", partitions=2, value="string", sharding="partitioned")}
    fleet = Fleet(KafkaSettings(), GroupSettings(id="g"), topics, Metrics(), lambda: None)
    fleet.held = fleet.slots = frozenset({0, 1})
    return fleet


async def test_a_revocation_after_stop_returns_at_once_and_records_nothing() -> None:
    """Closing the group consumer may revoke once more after stop(): that must not wait for the engine."""
    fleet = assigned_fleet()
    await fleet.stop()
    async with asyncio.timeout(1):
        await fleet._on_revoke()
    assert not fleet.revoking and fleet._since is None


async def test_a_revocation_while_the_engine_stops_waits_until_it_stopped() -> None:
    """Calls in flight may still end: the partitions are handed over only once the engine stopped."""
    fleet = assigned_fleet()
    fleet.stopping = True  # what the engine's stop() does first
    revoking = asyncio.create_task(fleet._on_revoke())
    await asyncio.sleep(0.05)
    assert not revoking.done() and not fleet.revoking
    await fleet.stop()  # the engine task has ended
    async with asyncio.timeout(1):
        await revoking


async def test_the_engine_waits_for_the_assignment_without_polling() -> None:
    fleet = assigned_fleet()
    revoking = asyncio.create_task(fleet._on_revoke())
    await asyncio.sleep(0)
    assert fleet.rebalancing and not revoking.done()  # it waits for the engine to deliver nothing
    waiting = asyncio.create_task(fleet.wait_assignment())  # the engine, holding delivery
    async with asyncio.timeout(1):
        await revoking
    await asyncio.sleep(0.5)
    assert not waiting.done()  # no periodic wake-ups: it ends on the assignment
    async with asyncio.timeout(1):
        await fleet._on_revoke()  # another revocation meanwhile: the engine still delivers nothing
    fleet._on_assign(frozenset({1}))
    async with asyncio.timeout(1):
        await waiting
    assert not fleet.rebalancing

    revoking = asyncio.create_task(fleet._on_revoke())  # delivering again: the next revocation waits
    await asyncio.sleep(0.05)
    assert not revoking.done()
    waiting = asyncio.create_task(fleet.wait_assignment())
    async with asyncio.timeout(1):
        await revoking
    fleet.stopping = True  # a stop request ends the wait
    async with asyncio.timeout(1):
        await waiting
