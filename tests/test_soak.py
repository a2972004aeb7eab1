"""Soak: a million keys resynced, 200,000 live changes, a second full resync. Run with `make soak`."""

from __future__ import annotations

import asyncio
import gc
import random
import resource
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from datasync import ChangeEvent, DataSync, Plugin, ResyncEvent
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.codecs import BytesCodec
from datasync.settings import KafkaSettings, SyncSettings

KEYS = 1_000_000
LIVE = 200_000
pytestmark = pytest.mark.soak


class Mirror(Plugin):
    """Keeps the latest revision per key and checks that no change is applied twice or skipped."""

    def __init__(self) -> None:
        self.view: dict[str, bytes] = {}
        self.last: dict[int, int] = {}  # partition -> last revision seen
        self.duplicates = 0
        self.changes = 0

    async def resync(self, event: ResyncEvent) -> None:
        self.view.clear()  # let go of the old view before building the new one
        self.view.update((kv.key, kv.raw_value) for items in event.values.values() for kv in items)
        self.last = {p: n - 1 for (_, p), n in event.positions.items()}

    async def change(self, event: ChangeEvent) -> None:
        for ch in event.changes:
            if ch.revision <= self.last.get(ch.partition, -1):
                self.duplicates += 1
            self.last[ch.partition] = ch.revision
            self.changes += 1
            if ch.op == "put":
                self.view[ch.key] = ch.value
            else:
                del self.view[ch.key]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        pending: list[Any] = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def test_soak(bootstrap: str, topic: str) -> None:
    rng = random.Random(42)
    truth = {f"k{i:07d}": b"v%d-%s" % (i, b"x" * 60) for i in range(KEYS)}
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), SyncSettings(fetch_max_records=10_000))
    engine.add_topic(TopicSpec(name=topic, partitions=3, value="bytes"), BytesCodec())
    mirror = Mirror()
    engine.watch("mirror", mirror, {topic: [""]})
    await prepare_topics(engine.kafka, [TopicSpec(name=topic, partitions=3)], create=True)
    await produce(bootstrap, topic, ((k.encode(), v) for k, v in truth.items()))
    await engine.start()
    try:
        async with asyncio.timeout(300):
            await engine.wait_ready()
        assert mirror.view == truth
        gc.collect()
        after_first_resync = rss_bytes()

        expected_changes = 0

        def live() -> Iterator[tuple[bytes, bytes | None]]:
            """The live traffic, applied to the ground truth as it is produced (nothing kept)."""
            nonlocal expected_changes
            for n in range(LIVE):
                key = f"k{rng.randrange(KEYS + 50_000):07d}"
                if rng.random() < 0.2:
                    if truth.pop(key, None) is not None:
                        expected_changes += 1
                    yield key.encode(), None
                else:
                    truth[key] = value = b"live-%d" % n
                    expected_changes += 1
                    yield key.encode(), value

        await produce(bootstrap, topic, live())
        async with asyncio.timeout(300):
            await engine.wait_for(lambda: mirror.changes >= expected_changes)
        await asyncio.sleep(1)
        assert mirror.view == truth and mirror.changes == expected_changes and mirror.duplicates == 0

        gc.collect()
        first = rss_bytes()
        engine.request_resync("soak: second full resync")
        async with asyncio.timeout(300):
            await engine.wait_for(lambda: engine.generation == 2)
            await engine.wait_ready()
        gc.collect()
        second = rss_bytes()
        assert mirror.view == truth
        mib = 2**20
        print(f"\nRSS after the first resync {after_first_resync / mib:.0f} MiB, after live traffic "
              f"{first / mib:.0f} MiB, after a second full resync {second / mib:.0f} MiB")  # fmt: skip
        assert second <= after_first_resync * 1.10, f"RSS grew from {after_first_resync} to {second} bytes"
    finally:
        await engine.stop()
