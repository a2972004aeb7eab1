"""Delivery tasks without a broker (the logic is pure): a delivery task that dies is seen at once and
never leaves the engine waiting on its queue."""

from __future__ import annotations

import asyncio
import logging

import pytest

from datasync import PluginState, StringCodec
from datasync.api import Change
from datasync.calls import PluginCalls
from datasync.delivery import Deliveries
from datasync.metrics import Metrics
from datasync.registration import Registration
from datasync.settings import SyncSettings

from recorder import Recorder


def change(key: str, revision: int) -> Change:
    return Change("t", "put", key, key, None, revision, 0, 0, StringCodec())


async def closed(reg: Registration) -> None:
    pass


async def room(owner: str, pending: int) -> None:  # no publishing here
    pass


async def test_a_dead_delivery_task_is_logged_and_its_plugin_resynced(caplog: pytest.LogCaptureFixture) -> None:
    bugs = ["bug after the first batch"]
    delivered = asyncio.Event()

    async def on_step() -> None:  # a bug in the engine's callback kills the delivery task
        delivered.set()
        if bugs:
            raise RuntimeError(bugs.pop())

    plugin = Recorder("p")
    deliveries = Deliveries(PluginCalls(SyncSettings(), Metrics(), room), 1, 100, on_step, lambda reg: None)
    reg = Registration("p", plugin, {"t": [""]}, {}, "full", None, closed)
    deliveries.add(reg)
    reg.status.state = PluginState.READY
    async with asyncio.timeout(5):
        await deliveries.put(1, {reg: [change("a", 0)]})
        await delivered.wait()  # and the task dies
        delivered.clear()
        await deliveries.put(2, {reg: [change("b", 1), change("c", 2)]})  # over the bound: the engine waits
    died = [r for r in caplog.records if r.levelno == logging.ERROR and "delivery task" in r.getMessage()]
    assert len(died) == 1 and "p" in died[0].getMessage() and died[0].exc_info is not None
    assert reg.status.state is PluginState.RESYNCING and reg.diverged  # its view misses what was dropped
    assert "bug after the first batch" in (reg.status.last_error or "")
    assert deliveries.queued(reg) == 0
    assert [c.key for c in plugin.changes] == ["a"]

    reg.status.state = PluginState.READY  # resynced: it gets changes again, from a new delivery task
    async with asyncio.timeout(5):
        await deliveries.put(3, {reg: [change("f", 5)]})
        await delivered.wait()
    assert [c.key for c in plugin.changes] == ["a", "f"]
    deliveries.halt()
    await deliveries.stop()
