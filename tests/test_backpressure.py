"""Fire-and-forget publishing: a plugin with too many sends pending is refused more; the others are not (no broker)."""

from __future__ import annotations

import asyncio

import pytest

from datasync import publish
from datasync.metrics import Metrics
from datasync.publish import Delivery, PublishError, Publishing
from datasync.settings import KafkaSettings


class Unacknowledged(Publishing):
    """Sends that wait until ``acked`` is set, as if the broker had not acknowledged them yet."""

    def __init__(self) -> None:
        super().__init__(KafkaSettings(), Metrics(), shutdown_timeout_s=10)
        self.acked = asyncio.Event()

    async def send_many(self, name: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[Delivery]:
        await self.acked.wait()
        return [Delivery(topic, 0, 0) for _ in records]


async def test_only_the_plugin_with_too_many_pending_sends_is_held_back() -> None:
    """Plugins resync one after another in the engine's task: each plugin has its own limit all the same."""
    publishing = Unacknowledged()

    def send(plugin: str) -> None:
        with publish.calling(plugin):
            publishing.spawn("out", "t", (b"k", b"v"), None)

    for _ in range(publish.MAX_IN_FLIGHT):
        send("flood")
    with pytest.raises(PublishError, match="plugin flood: publisher out: 5000 put_nowait sends wait"):
        send("flood")  # nothing sent
    send("quiet")  # same task, another plugin
    async with asyncio.timeout(5):
        await publishing.room("quiet", publish.MAX_IN_FLIGHT - 1)
    flooding = asyncio.create_task(publishing.room("flood", 0))
    await asyncio.sleep(0.1)
    assert not flooding.done() and len(publishing._in_flight) == publish.MAX_IN_FLIGHT + 1
    publishing.acked.set()
    async with asyncio.timeout(5):
        await flooding
    await publishing.stop()
