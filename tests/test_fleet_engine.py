"""Two engines of one group in one process, on the real broker: what a revocation does to queued changes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from datasync import ChangeEvent, DataSync, ResyncEvent
from datasync.bindings import TopicSpec
from datasync.codecs import StringCodec
from datasync.settings import GroupSettings, KafkaSettings

from conftest import FAST, create, put_all
from recorder import Recorder


class Timed(Recorder):
    """Records when each call started; its changes block until ``release`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()
        self.calls: list[tuple[float, str, set[int]]] = []  # (start, kind, partitions)

    async def resync(self, event: ResyncEvent) -> None:
        self.calls.append((time.monotonic(), "resync", {p for _, p in event.positions}))
        await super().resync(event)

    async def change(self, event: ChangeEvent) -> None:
        self.calls.append((time.monotonic(), "change", {c.partition for c in event.changes}))
        self.entered.set()
        await self.release.wait()
        await super().change(event)


@pytest.fixture
async def member(bootstrap: str) -> AsyncIterator[Callable[..., DataSync]]:
    engines: list[DataSync] = []

    def make(topic: str, group: str) -> DataSync:
        settings = GroupSettings(id=group, session_timeout_ms=6000, heartbeat_interval_ms=1000)
        engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), FAST.model_copy(
            update={"shutdown_timeout_s": 1.0}), group=settings)  # fmt: skip
        spec = TopicSpec(name=topic, partitions=2, value="string", sharding="partitioned")
        engine.add_topic(spec, StringCodec())
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def owned(engine: DataSync, topic: str) -> set[int]:
    status: dict[str, Any] | None = engine.group_status()
    return set(status["owned"][topic]) if status and status["state"] == "stable" else set()


async def test_revocation_drops_queued_changes_of_lost_partitions(
    member: Callable[..., DataSync], producer: AIOKafkaProducer, topic: str
) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = member(topic, group)
    await create(a)
    slow = Timed("slow")
    a.watch("slow", slow, {topic: [""]})
    await a.start()
    async with asyncio.timeout(30):
        await a.wait_for(lambda: owned(a, topic) == {0, 1} and slow.calls != [])
    slow.release.clear()
    await put_all(producer, topic, [("x0", "1", 0), ("x1", "1", 1)])
    async with asyncio.timeout(10):
        await slow.entered.wait()  # stuck in a change; what follows is queued behind it
    await put_all(producer, topic, [(f"k{i}-p{i % 2}", str(i), i % 2) for i in range(40)])
    async with asyncio.timeout(10):
        await a.wait_for(lambda: a.status()["slow"].queued > 2)

    b = member(topic, group)
    other = Timed("other")
    b.watch("other", other, {topic: [""]})
    await b.start()  # a rebalance: "a" drains what it can (1 s), then holds; its call in flight goes on
    async with asyncio.timeout(30):
        await a.wait_for(lambda: (a.group_status() or {}).get("state") == "rebalancing")
    await asyncio.sleep(1.5)
    released = time.monotonic()
    slow.release.set()  # the revocation completes once this call returns
    async with asyncio.timeout(40):
        await b.wait_for(lambda: owned(a, topic) | owned(b, topic) == {0, 1} and len(owned(b, topic)) == 1)
    lost = owned(b, topic)
    late = [(start - released, parts) for start, kind, parts in slow.calls
            if kind == "change" and start >= released and parts & lost]  # fmt: skip
    assert not late, f"changes of partition(s) {lost} delivered after their revocation: {late}"
    expected = {"x0": "1", "x1": "1", **{f"k{i}-p{i % 2}": str(i) for i in range(40)}}
    async with asyncio.timeout(20):
        await a.wait_for(lambda: {**slow.view, **other.view} == expected and not slow.view.keys() & other.view.keys())
    assert not slow.stale_prev and not other.stale_prev
