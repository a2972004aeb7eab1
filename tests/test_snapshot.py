"""Local snapshots against the real broker: used only when provably right, equal to a full read."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from test_crash import Service

from datasync import DataSync
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.codecs import Codec, JsonCodec, StringCodec
from datasync.metrics import Metrics
from datasync.settings import KafkaSettings, SnapshotSettings, SyncSettings
from datasync.snapshot import CHUNK_KEYS, Snapshots, _blocking, _Job, _KeysChanged, _steps
from datasync.snapshotfile import SnapshotReader, path_of, read_entries
from datasync.table import StateTable, pack

from conftest import eventually, put_all
from recorder import Recorder

# Compaction within seconds: small segments, any dirt is cleanable (the broker checks every second).
COMPACT_SOON = {"segment.ms": "200", "min.cleanable.dirty.ratio": "0.001", "min.compaction.lag.ms": "0"}
ONLY_AT_SHUTDOWN = SnapshotSettings(interval_s=0, after_rebuild=False, on_shutdown=True)

Engines = Callable[..., DataSync]


@pytest.fixture
async def engines(bootstrap: str) -> AsyncIterator[Engines]:
    made: list[DataSync] = []

    def make(
        topic: str,
        state: Path | None,
        config: dict[str, str] | None = None,
        codec: Codec | None = None,
        snapshot: SnapshotSettings = ONLY_AT_SHUTDOWN,
    ) -> DataSync:
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        engine = DataSync(kafka, SyncSettings(), state_dir=state, snapshot=snapshot)
        spec = TopicSpec(name=topic, partitions=3, value="string", config=config or {})
        engine.add_topic(spec, codec or StringCodec())
        engine.watch("view", Recorder(), {topic: [""]})
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.stop()


async def run_until_ready(engine: DataSync) -> None:
    await prepare_topics(engine.kafka, list(engine._topics.values()), create=True)
    await engine.start()
    async with asyncio.timeout(30):
        await engine.wait_ready()


async def table_after(engine: DataSync, topic: str) -> dict[str, bytes]:
    await run_until_ready(engine)
    data = dict(engine.table(topic).data)
    await engine.stop()
    return data


def loaded_from(engine: DataSync, topic: str) -> dict[str, str]:
    partitions = engine._snapshots.describe(topic)["partitions"] if engine._snapshots else {}
    return {p: s["from"] for p, s in partitions.items()}


async def raw_records(bootstrap: str, topic: str) -> int:
    """Records physically left in the topic (fewer than written once compaction ran)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        n = 0
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            n += sum(len(r) for r in (await consumer.getmany(timeout_ms=500)).values())
        return n
    finally:
        await consumer.stop()


def history(start: int, count: int) -> list[tuple[Any, ...]]:
    """Puts, overwrites and deletes over 400 keys; key i always goes to partition i % 3."""
    records: list[tuple[Any, ...]] = []
    for n in range(start, start + count):
        i = (n * 7) % 400
        value = None if n % 5 == 2 else f"v{n}"
        records.append((f"k{i:03d}", value, i % 3))
    return records


async def test_snapshot_and_catch_up_equal_a_full_read_after_deletes_overwrites_and_compaction(
    engines: Engines, producer: AIOKafkaProducer, bootstrap: str, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = engines(topic, state, COMPACT_SOON)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, history(0, 3000))
    before = await table_after(first, topic)  # stop() writes the snapshot
    assert all(path_of(state, topic, p).exists() for p in range(3))
    assert loaded_from(first, topic) == {"0": "full read", "1": "full read", "2": "full read"}

    # While it is down: overwrites, deletes (of keys in the snapshot), new keys, deleted keys back.
    written = 3000 + 2000
    await put_all(producer, topic, [*history(3000, 2000), *[(f"new{i}", f"n{i}", i % 3) for i in range(50)]])
    await put_all(producer, topic, [(f"k{i:03d}", None, i % 3) for i in range(0, 400, 11)])

    async def compacted() -> bool:
        # A record appended segment.ms after the active segment began rolls it, and only rolled
        # segments are cleaned: one tick could come too soon (CI failed so once), so tick each time.
        await put_all(producer, topic, [(f"tick{p}", "x", p) for p in range(3)])
        return await _compacted(bootstrap, topic, written)

    async with asyncio.timeout(60):  # compaction removed records the snapshot's replay would have read
        await eventually(compacted, interval=1.0)

    restarted = engines(topic, state, COMPACT_SOON)
    from_snapshot = await table_after(restarted, topic)
    assert loaded_from(restarted, topic) == {"0": "snapshot", "1": "snapshot", "2": "snapshot"}
    assert restarted.metrics.snapshot_partitions_loaded.labels(topic)._value.get() == 3
    load_s = restarted.metrics.snapshot_load_seconds.labels(topic)._value.get()
    assert restarted._snapshots is not None
    assert 0 < load_s == pytest.approx(restarted._snapshots.describe(topic)["seconds"], abs=1e-3)
    full = await table_after(engines(topic, None, COMPACT_SOON), topic)
    assert from_snapshot == full  # byte for byte: values, offsets, timestamps, partitions
    assert from_snapshot != before and any(k.startswith("new") for k in full)


async def _compacted(bootstrap: str, topic: str, written: int) -> bool:
    return await raw_records(bootstrap, topic) < written


async def test_a_snapshot_is_used_only_for_the_same_bindings(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    first = engines(topic, state)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, [(f"k{i}", '{"n": 1}', i % 3) for i in range(30)])
    await table_after(first, topic)
    other_codec = engines(topic, state, codec=JsonCodec())
    with caplog.at_level(logging.WARNING, logger="datasync.snapshot"):
        await table_after(other_codec, topic)
    assert loaded_from(other_codec, topic) == {"0": "full read", "1": "full read", "2": "full read"}
    reasons = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(reasons) == 3 and all("bindings: written for codec" in r for r in reasons), reasons
    assert other_codec.metrics.snapshot_rejected.labels(topic, "bindings")._value.get() == 3


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_a_damaged_file_is_detected_and_the_partition_read_in_full(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path, damage: str
) -> None:
    state = tmp_path / "state"
    first = engines(topic, state)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, [(f"k{i}", f"v{i}" * 20, i % 3) for i in range(300)])
    full = await table_after(first, topic)
    path = path_of(state, topic, 1)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(raw)
    again = engines(topic, state)
    assert await table_after(again, topic) == full
    assert loaded_from(again, topic) == {"0": "snapshot", "1": "full read", "2": "snapshot"}
    reason = again._snapshots.describe(topic)["partitions"]["1"]["reason"] if again._snapshots else ""
    assert reason.startswith("checksum: CRC-32 mismatch"), reason


async def test_a_snapshot_older_than_delete_retention_is_not_used(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = {"delete.retention.ms": "3000"}
    first = engines(topic, state, config)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, [(f"k{i}", f"v{i}", i % 3) for i in range(30)])
    await table_after(first, topic)
    fresh = engines(topic, state, config)
    await table_after(fresh, topic)
    assert loaded_from(fresh, topic) == {"0": "snapshot", "1": "snapshot", "2": "snapshot"}
    await asyncio.sleep(3.1)  # the snapshot fresh wrote at its stop is now older than delete.retention.ms
    late = engines(topic, state, config)
    await table_after(late, topic)
    assert loaded_from(late, topic) == {"0": "full read", "1": "full read", "2": "full read"}
    reason = late._snapshots.describe(topic)["partitions"]["0"]["reason"] if late._snapshots else ""
    assert reason.startswith("retention:") and "delete.retention.ms is 3000" in reason


async def test_a_topic_recreated_shorter_is_detected(
    engines: Engines, producer: AIOKafkaProducer, bootstrap: str, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = engines(topic, state)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, [(f"k{i}", f"v{i}", i % 3) for i in range(60)])
    await table_after(first, topic)
    await _delete(bootstrap, topic)
    recreated = engines(topic, state)
    await prepare_topics(recreated.kafka, list(recreated._topics.values()), create=True)
    await put_all(producer, topic, [("only", "one", 0)])
    assert await table_after(recreated, topic) == await table_after(engines(topic, None), topic)
    assert set(recreated.table(topic).data) == {"only"}
    reasons = recreated._snapshots.describe(topic)["partitions"] if recreated._snapshots else {}
    assert all(s["reason"].startswith("offsets:") for s in reasons.values()), reasons


async def test_an_unwritable_state_dir_is_counted_and_the_service_goes_on(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "not-a-dir"
    state.write_text("a file where the state directory should be")
    engine = engines(topic, state, snapshot=SnapshotSettings(interval_s=0.2))
    await run_until_ready(engine)
    failures = engine.metrics.snapshot_write_failures.labels(topic)
    async with asyncio.timeout(20):  # the periodic writes keep failing, and keep being counted
        await engine.wait_for(lambda: failures._value.get() >= 2)
    await put_all(producer, topic, [("k", "v", 0)])
    plugin = engine._registrations[0].plugin
    assert isinstance(plugin, Recorder)
    async with asyncio.timeout(20):
        await engine.wait_for(lambda: plugin.view.get("k") == "v")
    assert engine.running


async def test_periodic_snapshots_cover_live_changes_and_the_status_says_how_tables_were_loaded(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    periodic = SnapshotSettings(interval_s=0.3, after_rebuild=True, on_shutdown=False)
    engine = engines(topic, state, snapshot=periodic)
    await run_until_ready(engine)
    await put_all(producer, topic, [(f"k{i}", f"v{i}", i % 3) for i in range(90)])
    plugin = engine._registrations[0].plugin
    assert isinstance(plugin, Recorder)
    async with asyncio.timeout(20):
        await engine.wait_for(lambda: len(plugin.view) == 90)
    deadline = time.monotonic() + 20
    while sum(_keys_in(path_of(state, topic, p)) for p in range(3)) < 90:
        assert time.monotonic() < deadline, "no periodic snapshot covered the live changes"
        await asyncio.sleep(0.2)
    await engine.stop()
    again = engines(topic, state)
    await run_until_ready(again)
    status = (await again.topics_status())[topic]["loaded"]
    assert status["from"] == "snapshot" and set(status["partitions"]) == {"0", "1", "2"}
    assert len(again.table(topic)) == 90


def test_sigkill_during_a_snapshot_write_leaves_the_previous_snapshot_in_use(
    tmp_path: Path, bootstrap: str, topic: str
) -> None:
    """A real ``datasync run`` killed while it writes its shutdown snapshot: the next start removes
    the torn file, loads the previous snapshot and converges to the topic's state."""
    service = Service(tmp_path, bootstrap, topic)
    service.bindings(resync_delay_s=0)
    env = {"DATASYNC_STATE_DIR": str(tmp_path / "state"), "DATASYNC_SNAPSHOT__INTERVAL_S": "0"}
    keys = 100_000
    asyncio.run(_fill(bootstrap, topic, [(f"k{i}", b'{"n": %d}' % i) for i in range(keys)]))
    try:
        service.start(**env)
        snaps = [path_of(tmp_path / "state", topic, p) for p in range(3)]
        deadline = time.monotonic() + 90
        while not all(s.exists() for s in snaps):  # written once the plugin resynced
            assert time.monotonic() < deadline and service.process and service.process.poll() is None, service.log()
            time.sleep(0.1)
        changed = [(f"k{i}", None if i % 2 else b'{"n": -1}') for i in range(0, keys, 97)]
        asyncio.run(_fill(bootstrap, topic, changed))
        expected: dict[str, Any] = {f"k{i}": {"n": i} for i in range(keys)}
        for key, value in changed:
            if value is None:
                del expected[key]
            else:
                expected[key] = {"n": -1}
        service.wait_view(expected, timeout=90)
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)  # starts the shutdown snapshot...
        tmp = [s.with_name(f"{p}.snap.tmp") for p, s in enumerate(snaps)]
        deadline = time.monotonic() + 30
        while not any(t.exists() for t in tmp):
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.001)
        service.kill()  # ...and dies in the middle of it
        assert any(t.exists() for t in tmp), "the write finished before the kill"
        (tmp_path / "view.json").unlink()
        service.start(**env, DATASYNC_SNAPSHOT__AFTER_REBUILD="false")  # no new write to race with below
        service.wait_log("a snapshot write was interrupted", timeout=60)
        service.wait_log("3 of 3 partitions loaded from snapshots", timeout=60)
        service.wait_view(expected, timeout=90)
        assert not any(t.exists() for t in tmp)
    finally:
        if service.process is not None and service.process.poll() is None:
            service.process.terminate()
            service.process.wait(timeout=60)


async def _fill(bootstrap: str, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    await prepare_topics(
        KafkaSettings(bootstrap_servers=bootstrap), [TopicSpec(name=topic, partitions=3, value="json")], create=True
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k.encode(), value=v) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_a_topic_recreated_and_refilled_past_the_position_is_detected(
    engines: Engines, producer: AIOKafkaProducer, bootstrap: str, topic: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = engines(topic, state)
    await prepare_topics(first.kafka, list(first._topics.values()), create=True)
    await put_all(producer, topic, [(f"k{i}", f"v{i}", i % 3) for i in range(30)])
    await table_after(first, topic)
    await _delete(bootstrap, topic)
    recreated = engines(topic, state)
    await prepare_topics(recreated.kafka, list(recreated._topics.values()), create=True)
    await put_all(producer, topic, [(f"other{i}", f"w{i}", i % 3) for i in range(60)])  # offsets beyond the old ones
    assert await table_after(recreated, topic) == await table_after(engines(topic, None), topic)
    reasons = recreated._snapshots.describe(topic)["partitions"] if recreated._snapshots else {}
    assert all(s["reason"].startswith("recreated:") for s in reasons.values()), reasons


def _keys_in(path: Path) -> int:
    return len(read_entries(path)[1]) if path.exists() else 0


async def _gone(admin: AIOKafkaAdminClient, topic: str) -> bool:
    return topic not in await admin.list_topics()


async def _delete(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        async with asyncio.timeout(30):
            await eventually(lambda: _gone(admin, topic))
    finally:
        await admin.close()


def test_a_write_walks_the_table_in_steps_and_says_when_keys_change_between_two() -> None:
    """The keys a snapshot writes: the table's own, a step at a time, while no key is added or
    removed; if one is between two steps, the walk stops (the write starts over from a list)."""
    table = StateTable("t")
    table.data.update((f"k{n:06d}", b"v") for n in range(3 * CHUNK_KEYS + 5))
    steps = list(_steps(table, None))
    assert len(steps) == 4 and [k for step in steps for k in step] == list(table.data)

    walk = _steps(table, None)
    first = next(walk)
    table.delete(first[0])  # same size after the put: the dict's iterator would not notice
    table.put("new", b"v")
    with pytest.raises(_KeysChanged):
        next(walk)

    assert table.keys_under("") and next(_steps(table, None)) == table.cached_order()[:CHUNK_KEYS]


async def test_a_write_during_which_keys_change_holds_each_key_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys added and removed while a snapshot is written: the file holds every key of the table
    once (the write started over from a list of the keys), none removed, the added one."""

    walked = asyncio.Event()

    class Walked(dict[str, bytes]):
        def __iter__(self) -> Iterator[str]:
            walked.set()
            return super().__iter__()

    table = StateTable("t")
    table.data = Walked((f"k{n:06d}", pack(b"v", n, 0, 0)) for n in range(3 * CHUNK_KEYS + 5))
    snapshots = Snapshots(tmp_path, SnapshotSettings(), KafkaSettings(), Metrics(),
                          {"t": TopicSpec(name="t", value="string")}, {"t": StringCodec()})  # fmt: skip
    snapshots._since = {TopicPartition("t", 0): time.time()}
    job = _Job(table, partitions=1, positions={0: 1 << 20}, since={0: time.time()}, taken=time.time())

    async def churn() -> None:
        await walked.wait()  # the write took its first step of the table's keys
        table.delete("k000000")
        table.put("new", pack(b"v", 1 << 20, 0, 0))

    with caplog.at_level(logging.INFO, logger="datasync.snapshot"):
        await asyncio.gather(snapshots._write([job], loop_share=0.5), churn())
    assert "starting over" in caplog.text
    with SnapshotReader(path_of(tmp_path, "t", 0)) as reader:
        reader.verify()
        written = sum(block.n for block in reader.blocks())
    _, entries = read_entries(path_of(tmp_path, "t", 0))
    assert written == len(table) and entries == table.data


async def test_a_stop_while_records_arrive_leaves_a_whole_shutdown_snapshot(
    producer: AIOKafkaProducer, bootstrap: str, topic: str, tmp_path: Path, engines: Engines
) -> None:
    """A batch fetched after stop() began moved the position the shutdown snapshot records: it is
    folded into the tables too (and delivered to no plugin), or the restart would lack its keys."""
    state = tmp_path / "state"
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    engine = DataSync(kafka, SyncSettings(fetch_max_records=20), state_dir=state, snapshot=ONLY_AT_SHUTDOWN)
    engine.add_topic(TopicSpec(name=topic, partitions=3, value="string"), StringCodec())
    engine.watch("view", Recorder(), {topic: [""]})
    await run_until_ready(engine)
    written = 0

    async def write() -> None:
        nonlocal written
        while True:
            await producer.send_and_wait(topic, b"v", key=f"k{written}".encode(), partition=written % 3)
            written += 1

    writer = asyncio.create_task(write())
    try:
        await asyncio.sleep(1.0)
        await engine.stop()
    finally:
        writer.cancel()
    restarted = engines(topic, state)
    assert await table_after(restarted, topic) == await table_after(engines(topic, None), topic)
    assert loaded_from(restarted, topic) == {"0": "snapshot", "1": "snapshot", "2": "snapshot"}
    assert len(restarted.table(topic)) >= written - 1  # the last send may have been cut short


async def test_a_state_dir_that_cannot_be_cleaned_up_is_read_in_full(
    engines: Engines, producer: AIOKafkaProducer, topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an interrupted write left cannot be removed (here a directory in its place; a read-only
    volume alike): one warning, and the tables are read as without snapshots."""
    state = tmp_path / "state"
    (state / topic / "0.snap.tmp").mkdir(parents=True)
    engine = engines(topic, state)
    await prepare_topics(engine.kafka, list(engine._topics.values()), create=True)
    await put_all(producer, topic, [("k", "v", 0)])
    assert await table_after(engine, topic) == await table_after(engines(topic, None), topic)
    assert any(r.getMessage().startswith(f"cannot remove {state / topic / '0.snap.tmp'}") for r in caplog.records)


async def test_a_file_operation_failing_after_its_write_was_cancelled_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thread cannot be stopped: a cancelled write waits for it, and what it raised is logged
    (not "Task exception was never retrieved" at some garbage collection)."""
    started = threading.Event()

    def full_disk() -> None:
        started.set()
        time.sleep(0.3)
        raise OSError(28, "No space left on device")

    task = asyncio.create_task(_blocking(full_disk))
    await asyncio.to_thread(started.wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.getMessage() for r in caplog.records if r.name == "datasync.snapshot"] == [
        "a snapshot file operation failed after its write was cancelled: OSError(28, 'No space left on device')"
    ]
