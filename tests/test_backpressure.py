"""Fire-and-forget publishing: a plugin with too many sends pending waits; the others do not (no broker)."""

from __future__ import annotations

import asyncio

from datasync import publish
from datasync.metrics import Metrics
from datasync.publish import Publishing
from datasync.settings import KafkaSettings


async def test_only_the_plugin_with_too_many_pending_sends_waits() -> None:
    publishing = Publishing(KafkaSettings(), Metrics())
    acked = asyncio.Event()

    async def send() -> None:
        await acked.wait()  # the broker has not acknowledged yet

    async def flooding_plugin() -> None:  # its delivery task: spawns, then waits for room
        for _ in range(publish.MAX_IN_FLIGHT):
            publishing.spawn(send(), None)
        await publishing.room()

    async def quiet_plugin() -> None:
        publishing.spawn(send(), None)
        await publishing.room()

    flooding = asyncio.create_task(flooding_plugin())
    async with asyncio.timeout(5):
        await asyncio.create_task(quiet_plugin())  # not held back by the other's sends
    await asyncio.sleep(0.1)
    assert not flooding.done()
    acked.set()
    async with asyncio.timeout(5):
        await flooding
    await publishing.stop()
