"""Two engines of one group in one process, on the real broker: what a revocation does to queued changes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from datasync import ChangeEvent, DataSync, ResyncEvent, fleet, snapshot
from datasync.bindings import TopicSpec
from datasync.codecs import StringCodec
from datasync.settings import GroupSettings, KafkaSettings, SnapshotSettings
from datasync.snapshotfile import path_of, read_entries
from datasync.table import partition_of, value_of

from conftest import FAST, create, put_all
from recorder import Recorder

SNAPSHOTS = SnapshotSettings(interval_s=0, after_rebuild=True, on_shutdown=True)


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

    def make(topic: str, group: str | None, state: Path | None = None) -> DataSync:
        settings = GroupSettings(id=group, session_timeout_ms=6000, heartbeat_interval_ms=1000)
        engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), FAST.model_copy(
            update={"shutdown_timeout_s": 1.0}), group=settings, state_dir=state, snapshot=SNAPSHOTS)  # fmt: skip
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


async def take_a_partition(member: Callable[..., DataSync], a: DataSync, topic: str, group: str) -> DataSync:
    """A second member joins; returns once each owns one of the two partitions."""
    b = member(topic, group)
    await b.start()
    async with asyncio.timeout(40):
        await b.wait_for(lambda: len(owned(a, topic)) == 1 and owned(a, topic) | owned(b, topic) == {0, 1})
    return b


async def alone_from(member: Callable[..., DataSync], topic: str, state: Path) -> DataSync:
    """A start without a group (it reads both partitions) from ``state``'s snapshots, once ready."""
    engine = member(topic, None, state)
    engine.watch("view", Recorder("view"), {topic: [""]})
    await engine.start()
    async with asyncio.timeout(60):
        await engine.wait_ready()
    return engine


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The state directory of member "a"."""
    return tmp_path / "a"


def contents(engine: DataSync, topic: str) -> dict[str, str]:
    return {key: value_of(packed).decode() for key, packed in engine.table(topic).data.items()}


async def test_a_snapshot_write_spanning_a_reassignment_never_saves_a_partition_without_its_keys(
    member: Callable[..., DataSync],
    producer: AIOKafkaProducer,
    topic: str,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The write after "a"'s first read is held before it reads the table while "b" joins and takes a
    partition (whose keys "a" drops): no file may be finished for it with those keys missing. A
    later start loads what "a" saved, with headers that name the topic's partition count (2), not
    the number of partitions "a" owned at shutdown (1)."""
    going_on = asyncio.Event()
    real_blocking = snapshot._blocking

    async def held_at_open(fn: Callable[..., Any], *args: Any) -> Any:
        if getattr(fn, "__name__", "") == "open":  # the files are opened before the table is read
            await going_on.wait()
        return await real_blocking(fn, *args)

    monkeypatch.setattr(snapshot, "_blocking", held_at_open)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = member(topic, group, state)
    await create(a)
    expected = {f"k{i}-p{i % 2}": str(i) for i in range(200)}
    await put_all(producer, topic, [(key, value, int(key[-1])) for key, value in expected.items()])
    a.watch("view", Recorder("view"), {topic: [""]})
    await a.start()
    async with asyncio.timeout(30):
        await a.wait_for(lambda: owned(a, topic) == {0, 1} and a._snapshots is not None and a._snapshots.writing)
    await take_a_partition(member, a, topic, group)
    kept = owned(a, topic)
    going_on.set()  # a write still running would now read the table and finish its files
    async with asyncio.timeout(10):
        await a.wait_for(lambda: a._snapshots is not None and not a._snapshots.writing)
    await a.stop()  # the shutdown snapshot: of the partition "a" owns now

    for p in range(2):
        path = path_of(state, topic, p)
        if path.exists():
            header, entries = read_entries(path)
            keys = {key for key in expected if key.endswith(f"-p{p}")}
            assert header.partitions == 2
            assert set(entries) == keys, f"the snapshot of partition {p} lacks {len(keys - set(entries))} keys"
            assert {partition_of(packed) for packed in entries.values()} == {p}
    assert path_of(state, topic, next(iter(kept))).exists()

    c = await alone_from(member, topic, state)
    assert contents(c, topic) == expected
    assert c._snapshots is not None
    loaded = {int(p): s["from"] for p, s in c._snapshots.describe(topic)["partitions"].items()}
    assert loaded[next(iter(kept))] == "snapshot"


async def test_a_partition_regained_and_stopped_during_its_read_is_not_saved_half_read(
    member: Callable[..., DataSync],
    producer: AIOKafkaProducer,
    topic: str,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "a" loses a partition to "b", regains it when "b" leaves, and is stopped half-way through
    reading it again (its keys are dropped, its position is mid-log): the shutdown snapshot must
    not save it so, or a later start would skip the records before that position."""
    half_read = asyncio.Event()
    real_read = fleet._read

    async def signalling_read(
        reader: Any, partitions: list[Any], tables: Any, ingest: Any, interrupted: Callable[[], bool]
    ) -> bool:
        checks = 0

        def check() -> bool:
            nonlocal checks
            checks += 1
            if checks == 2:  # one batch of the regained partition read
                half_read.set()
            return interrupted()

        return await real_read(reader, partitions, tables, ingest, check)

    monkeypatch.setattr(fleet, "_read", signalling_read)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = member(topic, group, state)
    await create(a)
    filler = "x" * 10_000  # 1,200 of them per partition: several fetches (4 MiB each) to read one
    expected = {f"k{i}-p{i % 2}": f"{i}{filler}" for i in range(2400)}
    await put_all(producer, topic, [(key, value, int(key[-1])) for key, value in expected.items()])
    a.watch("view", Recorder("view"), {topic: [""]})
    await a.start()
    async with asyncio.timeout(60):
        await a.wait_for(lambda: owned(a, topic) == {0, 1} and topic in a.metrics.snapshot_taken)
    b = await take_a_partition(member, a, topic, group)
    await b.stop()  # "a" regains the partition and reads it again
    async with asyncio.timeout(40):
        await half_read.wait()
    await a.stop()  # as on SIGTERM: the read stops half-way, then the shutdown snapshot is written

    c = await alone_from(member, topic, state)
    assert contents(c, topic) == expected
