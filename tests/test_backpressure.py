"""Fire-and-forget publishing: a plugin with too many sends pending waits; the others do not (no broker)."""

from __future__ import annotations

import asyncio

from datasync import publish
from datasync.metrics import Metrics
from datasync.publish import Delivery, Publishing
from datasync.settings import KafkaSettings


class Unacknowledged(Publishing):
    """Sends that wait until ``acked`` is set, as if the broker had not acknowledged them yet."""

    def __init__(self) -> None:
        super().__init__(KafkaSettings(), Metrics(), shutdown_timeout_s=10)
        self.acked = asyncio.Event()

    async def send_many(self, name: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[Delivery]:
        await self.acked.wait()
        return [Delivery(topic, 0, 0) for _ in records]


async def test_only_the_plugin_with_too_many_pending_sends_waits() -> None:
    publishing = Unacknowledged()
    acked = publishing.acked

    async def flooding_plugin() -> None:  # its delivery task: spawns, then waits for room
        for _ in range(publish.MAX_IN_FLIGHT):
            publishing.spawn("flood", "t", (b"k", b"v"), None)
        await publishing.room()

    async def quiet_plugin() -> None:
        publishing.spawn("quiet", "t", (b"k", b"v"), None)
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
