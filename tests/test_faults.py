"""Faults against a real broker: lost and regained broker, vanished positions, slow plugins, poison records."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from datasync import DataSync, PluginState
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, StringCodec
from datasync.deadletter import DeadLetters
from datasync.ingest import Rejected
from datasync.metrics import Metrics
from datasync.publish import PublishError
from datasync.schemas import SchemaStore
from datasync.settings import HttpSettings, KafkaSettings, SyncSettings
from datasync.web import HttpServer

from conftest import eventually, put_all
from localkafka import LocalBroker
from recorder import Recorder

QUICK = SyncSettings(broker_probe_s=0.5, resync_backoff_s=0.2, change_backoff_s=0.01, change_timeout_s=5)


async def test_broker_lost_and_regained(own_broker: LocalBroker, topic: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap, request_timeout_ms=5000)
    engine = DataSync(kafka, QUICK)
    engine.add_topic(TopicSpec(name=topic, partitions=2, value="string"), StringCodec())
    full, delta = Recorder("full"), Recorder("delta")
    engine.watch("full", full, {topic: [""]})
    engine.watch("delta", delta, {topic: [""]}, resync_mode="delta")
    await prepare_topics(kafka, [TopicSpec(name=topic, partitions=2, value="string")], create=True)
    producer = AIOKafkaProducer(bootstrap_servers=own_broker.bootstrap, acks="all")
    await producer.start()
    try:
        await put_all(producer, topic, [(f"k{i}", f"v{i}") for i in range(10)])
        await engine.start()
        async with asyncio.timeout(20):
            await engine.wait_ready()

        await asyncio.to_thread(own_broker.stop, keep_data=True)
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: not engine.broker_connected)
        assert engine.metrics.broker_up._value.get() == 0

        await asyncio.to_thread(own_broker.start)
        # keep producing after it returns, deleting keys that existed before
        await put_all(producer, topic, [("k1", None), ("k2", None), ("k3", "v3-new"), ("k10", "v10")])
        async with asyncio.timeout(30):
            await engine.wait_for(lambda: engine.generation >= 2 and engine.broker_connected)
            await engine.wait_ready()
        await put_all(producer, topic, [("k4", "v4-after"), ("k5", None)])
        expected = {f"k{i}": f"v{i}" for i in range(10)} | {"k3": "v3-new", "k10": "v10", "k4": "v4-after"}
        for key in ("k1", "k2", "k5"):
            del expected[key]
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: full.view == expected and delta.view == expected)
    finally:
        await engine.stop()
        await producer.stop()
    assert len(full.resyncs) == 2 and len(delta.resyncs) == 1  # delta mode: the differences as changes
    assert full.stale_prev == [] and delta.stale_prev == []  # prev values come from the rebuilt table
    delta_ops = {(c.op, c.key) for c in delta.changes}
    assert {("delete", "k1"), ("delete", "k2"), ("put", "k3"), ("put", "k10")} <= delta_ops


async def started(
    broker: LocalBroker, topic: str, request_timeout_ms: int = 5000, sync: SyncSettings = QUICK
) -> DataSync:
    """An engine on ``broker`` with a plugin watching ``topic`` (two partitions), started and ready."""
    engine = DataSync(KafkaSettings(bootstrap_servers=broker.bootstrap, request_timeout_ms=request_timeout_ms), sync)
    engine.add_topic(TopicSpec(name=topic, partitions=2, value="string"), StringCodec())
    engine.watch("p", Recorder("p"), {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    return engine


async def test_stop_while_the_broker_is_away(own_broker: LocalBroker, topic: str) -> None:
    engine = await started(own_broker, topic)
    await asyncio.to_thread(own_broker.stop, keep_data=True)
    try:
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: not engine.broker_connected)
        async with asyncio.timeout(30):
            await engine.stop()  # no exception, no hang: fetches were failing and retrying meanwhile
    finally:
        await asyncio.to_thread(own_broker.start)


async def test_stop_while_a_rebuild_waits_for_the_broker_is_prompt(
    own_broker: LocalBroker, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine backs off between failed rebuilds (up to 30 s): stop() ends the wait at once."""
    engine = await started(own_broker, topic, request_timeout_ms=2000)
    await asyncio.to_thread(own_broker.stop, keep_data=True)
    try:
        engine.request_resync("test")

        async def backing_off() -> bool:  # the waits double: 1, 2, 4, 8 s...
            return any("; retrying in 8.0s" in r.getMessage() for r in caplog.records if r.name == "datasync")

        async with asyncio.timeout(60):
            await eventually(backing_off)
        async with asyncio.timeout(5):  # not the rest of an 8 s wait, nor the 10 s shutdown time-out
            await engine.stop()
    finally:
        await asyncio.to_thread(own_broker.start)


async def test_http_put_answers_503_while_the_broker_is_away(own_broker: LocalBroker, topic: str) -> None:
    """The producer retries for as long as the broker is away; the PUT must not wait with it."""
    engine = await started(own_broker, topic, request_timeout_ms=2000)
    token = "t0ken-of-sixteen-chars"
    http = HttpServer(engine, HttpSettings(port=0, writes_enabled=True, token=token))  # type: ignore[arg-type]
    await http.start()
    url = f"http://127.0.0.1:{http.port}/v1/topics/{topic}/keys/k"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            async with session.put(url, data=b'"v1"') as response:
                assert response.status == 200
            await asyncio.to_thread(own_broker.stop, keep_data=True)
            async with asyncio.timeout(15), session.put(url, data=b'"v2"') as response:
                assert response.status == 503
                assert (await response.json())["error"] == f"publisher http: {topic}: not acknowledged within 2s"
        assert engine.metrics.publish_failures.labels("http")._value.get() == 1
    finally:
        await http.stop()
        await asyncio.to_thread(own_broker.start)
        await engine.stop()


async def test_stop_with_publishes_pending_while_the_broker_is_away(
    own_broker: LocalBroker, topic: str, caplog: pytest.LogCaptureFixture, unhandled: list[dict[str, Any]]
) -> None:
    """aiokafka's idempotent producer retries while the broker is away and its stop() waits for that
    flush: stop() must give up after shutdown_timeout_s, counting and saying what was not sent."""
    quick_stop = QUICK.model_copy(update={"shutdown_timeout_s": 1.0})
    engine = await started(own_broker, topic, request_timeout_ms=30_000, sync=quick_stop)
    out = engine.add_publisher("out", topic)
    await out.put("before", "v")
    await asyncio.to_thread(own_broker.stop, keep_data=True)
    try:
        errors: list[BaseException | None] = []
        for i in range(20):
            out.put_nowait(f"k{i}", "v", lambda d, exc: errors.append(exc))
        async with asyncio.timeout(15):
            await engine.stop()
    finally:
        await asyncio.to_thread(own_broker.start)
    assert len(errors) == 20 and all(isinstance(e, PublishError) for e in errors)
    gc.collect()
    assert unhandled == []
    assert engine.metrics.publish_failures.labels("out")._value.get() == 20
    lines = [r.getMessage() for r in caplog.records if r.name == "datasync.publish"]
    assert lines == [
        "publishing: not acknowledged within 1.0s of stopping: 20 background sends cancelled, producer closed"
        " without flushing (counted in datasync_publish_failures_total)"
    ]


async def test_dead_letters_stop_while_the_broker_is_away(
    own_broker: LocalBroker, topic: str, caplog: pytest.LogCaptureFixture, unhandled: list[dict[str, Any]]
) -> None:
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap)
    dlq = f"{topic}.dlq"
    await prepare_topics(kafka, [TopicSpec(name=dlq, partitions=1)], create=True)
    metrics = Metrics()
    dead = DeadLetters(kafka, {topic: dlq}, metrics, shutdown_timeout_s=1.0)
    await dead.start()

    def rejected(offset: int) -> Rejected:
        record = ConsumerRecord(topic, 0, offset, 0, 0, b"k", b"bad", None, 1, 3, [])
        return Rejected(topic, record, "undecodable value", "not avro")

    await dead.send([rejected(0)])  # the producer knows the topic now
    async with asyncio.timeout(10):
        await eventually(lambda: asyncio.sleep(0, metrics.dead_letters.labels(topic)._value.get() == 1))
    await asyncio.to_thread(own_broker.stop, keep_data=True)
    try:
        await dead.send([rejected(i) for i in range(1, 6)])
        async with asyncio.timeout(15):
            await dead.stop()
    finally:
        await asyncio.to_thread(own_broker.start)
    assert metrics.dead_letter_failures.labels(topic)._value.get() == 5
    gc.collect()
    assert unhandled == []
    lines = [r.getMessage() for r in caplog.records if r.name == "datasync.deadletter"]
    assert lines == ["5 records not copied to their dead-letter topic: not acknowledged within 1.0s of stopping"]


@pytest.fixture
async def engine_on(bootstrap: str) -> AsyncIterator[list[DataSync]]:
    engines: list[DataSync] = []
    yield engines
    for engine in engines:
        await engine.stop()


async def test_records_deleted_below_the_position_trigger_a_full_resync(
    bootstrap: str, topic: str, producer: AIOKafkaProducer, engine_on: list[DataSync]
) -> None:
    # A queue of one change: while the plugin is held, the engine stops fetching (its position stays)
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap), QUICK.model_copy(update={"plugin_queue_max_records": 1})
    )
    engine_on.append(engine)
    # DeleteRecords is refused on compact-only topics; compact,delete topics can lose records this way
    spec = TopicSpec(name=topic, partitions=1, value="string", compacted=False)
    engine.add_topic(spec, StringCodec())
    gate = asyncio.Event()

    class Held(Recorder):
        async def change(self, event):  # type: ignore[no-untyped-def]
            await gate.wait()  # holds the plugin, and with its queue full the engine's position
            await super().change(event)

    plugin = Held("held")
    engine.watch("held", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    # the engine takes both in one batch; the plugin waits in change() and its queue is over the bound
    await put_all(producer, topic, [("a", "1"), ("a2", "1")])
    await asyncio.sleep(0.5)
    await put_all(producer, topic, [("b", "2"), ("c", "3")])  # the consumer prefetches these meanwhile
    await asyncio.sleep(0.5)
    offsets = await put_all(producer, topic, [("d", "4"), ("e", "5")])  # and these wait on the broker
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:  # the records the engine has not read yet disappear
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(offsets[-1])})
    finally:
        await admin.close()
    gate.set()
    async with asyncio.timeout(20):
        await engine.wait_for(lambda: engine.generation == 2 and plugin.view == {"e": "5"})
    assert len(plugin.resyncs) == 2


async def test_topic_deleted_and_recreated(
    bootstrap: str, topic: str, producer: AIOKafkaProducer, engine_on: list[DataSync]
) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    engine = DataSync(kafka, QUICK.model_copy(update={"create_topics": False}))
    engine_on.append(engine)
    spec = TopicSpec(name=topic, partitions=1, value="string")
    engine.add_topic(spec, StringCodec())
    await prepare_topics(kafka, [spec], create=True)
    await put_all(producer, topic, [("a", "1"), ("b", "2"), ("c", "3")])
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        async with asyncio.timeout(20):
            await eventually(lambda: _gone(admin, topic))
        await prepare_topics(kafka, [spec.model_copy(update={"partitions": 2})], create=True)
    finally:
        await admin.close()
    fresh = AIOKafkaProducer(bootstrap_servers=bootstrap)  # no metadata of the old topic
    await fresh.start()
    try:
        await put_all(fresh, topic, [("z", "new", 1)])
    finally:
        await fresh.stop()
    async with asyncio.timeout(30):
        await engine.wait_for(lambda: plugin.view == {"z": "new"} and engine.generation >= 2)
    assert engine.running and plugin.stale_prev == []


async def test_hanging_plugin_times_out_and_fetching_pauses(
    bootstrap: str, topic: str, producer: AIOKafkaProducer, engine_on: list[DataSync]
) -> None:
    sync = QUICK.model_copy(
        update={
            "change_timeout_s": 0.5,
            "change_max_attempts": 2,
            "fetch_max_records": 50,
            "plugin_queue_max_records": 100,
        }
    )
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), sync)
    engine_on.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec())
    journal: list[tuple[str, str]] = []

    class Hangs(Recorder):
        async def change(self, event):  # type: ignore[no-untyped-def]
            if any(c.key == "hang" for c in event.changes):
                await asyncio.Event().wait()  # never returns
            await super().change(event)

    hangs, after = Hangs("hangs", journal), Recorder("after", journal)
    engine.watch("hangs", hangs, {topic: [""]})
    engine.watch("after", after, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("hang", "x")])
    await asyncio.sleep(0.3)
    await put_all(producer, topic, [(f"k{i}", "v") for i in range(2000)])
    await asyncio.sleep(0.4)
    # while the plugin hangs, its queue fills up and fetching pauses: the table does not run ahead
    assert len(engine.table(topic)) <= 1 + sync.plugin_queue_max_records + sync.fetch_max_records
    async with asyncio.timeout(30):
        # hangs gets everything but the batch that hung
        await engine.wait_for(lambda: len(after.view) == 2001 and len(hangs.view) == 2000)
    status = engine.status()["hangs"]
    assert status.change_failures == 1 and status.last_error is None  # cleared by the later successes
    assert engine.metrics.plugin_failures.labels("hangs", "change")._value.get() == 2
    assert journal[:2] == [("resync", "hangs"), ("resync", "after")]


async def recorded(
    bootstrap: str, spec: TopicSpec, codec: AvroCodec, engine_on: list[DataSync]
) -> tuple[DataSync, Recorder]:
    """A started engine on ``spec`` with one recording plugin watching all of it, ready."""
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engine_on.append(engine)
    engine.add_topic(spec, codec)
    plugin = Recorder("p")
    engine.watch("p", plugin, {spec.name: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    return engine, plugin


async def test_poison_records_go_to_the_dead_letter_topic(
    bootstrap: str, topic: str, producer: AIOKafkaProducer, engine_on: list[DataSync], tmp_path: Path
) -> None:
    (tmp_path / "T.avsc").write_text('{"type":"record","name":"T","fields":[{"name":"n","type":"int"}]}')
    (tmp_path / "U.avsc").write_text('{"type":"record","name":"U","fields":[{"name":"s","type":"string"}]}')
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("T"))
    dlq = f"{topic}.dlq"
    spec = TopicSpec(name=topic, partitions=1, value="avro:T", dead_letter=dlq, max_value_bytes=64)
    engine, plugin = await recorded(bootstrap, spec, codec, engine_on)
    good = codec.encode({"n": 1})
    unknown_schema = b"\xc3\x01" + b"\x01" * 8 + b"\x02"
    other_schema = AvroCodec(store).encode({"s": "not a T"}, store.get("U"))  # a known schema that is not T
    poison = [
        ("k", b"not avro at all"),
        ("k", unknown_schema),
        ("k", good[:-1]),  # truncated body
        (b"\xff\xfe", good),  # key not UTF-8
        ("k", good + b"\x00" * 100),  # oversized
    ]
    offsets = await put_all(
        producer, topic, [("k", good), *poison, ("other", other_schema), ("k", codec.encode({"n": 2}))]
    )
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view.get("k") == {"n": 2})
    assert [c.prev_value for c in plugin.changes if c.key == "k"] == [None, {"n": 1}]  # kept its last good value
    bad = engine.metrics.bad_records
    assert bad.labels(topic, "undecodable value")._value.get() == 4  # garbage, unknown, truncated, other schema
    assert bad.labels(topic, "key not UTF-8")._value.get() == 1
    assert bad.labels(topic, "oversized value")._value.get() == 1

    consumer = AIOKafkaConsumer(dlq, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        copies = []
        async with asyncio.timeout(10):
            while len(copies) < 6:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    copies += records
    finally:
        await consumer.stop()
    got = [(dict(r.headers)["datasync.reason"].decode(), int(dict(r.headers)["datasync.offset"])) for r in copies]
    assert sorted(got, key=lambda g: g[1]) == [
        ("undecodable value", offsets[1]),
        ("undecodable value", offsets[2]),
        ("undecodable value", offsets[3]),
        ("key not UTF-8", offsets[4]),
        ("oversized value", offsets[5]),
        ("undecodable value", offsets[6]),
    ]
    first = copies[0]
    assert first.key == f"{topic}/0@{offsets[1]}".encode() and first.value == b"not avro at all"
    assert dict(first.headers)["datasync.topic"] == topic.encode()
    assert json.dumps(engine.status()["p"].as_dict())  # status stays serialisable
    assert engine.status()["p"].state is PluginState.READY


async def _gone(admin: AIOKafkaAdminClient, topic: str) -> bool:
    return topic not in await admin.list_topics()


async def test_poison_records_never_reach_a_rebuilt_table(
    bootstrap: str,
    topic: str,
    producer: AIOKafkaProducer,
    engine_on: list[DataSync],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rebuild's checking-only fold rejects what decoding would, and names the key."""
    (tmp_path / "T.avsc").write_text(
        '{"type":"record","name":"T","fields":[{"name":"n","type":"int"},'
        '{"name":"u","type":["null","string"]},{"name":"e","type":{"type":"enum","name":"E","symbols":["A"]}}]}'
    )
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("T"))
    good = codec.encode({"n": 1, "u": "x", "e": "A"})  # body: 02 02 02 78 00
    header = good[:10]
    poison = {
        "truncated": good[:-2],
        "trailing": good + b"\x00",
        "union": header + b"\x02\x04\x00",  # union index 2 of 2 branches
        "negative": header + b"\x02\x02\x03xy\x00",  # string length -2
        "enum": header + b"\x02\x00\x02",  # enum index 1 of 1 symbol
        "int": header + b"\x80\x80\x80\x80\x10\x00\x00",  # int beyond 32 bits
    }
    spec = TopicSpec(name=topic, partitions=1, value="avro:T")
    await prepare_topics(KafkaSettings(bootstrap_servers=bootstrap), [spec], create=True)
    await put_all(producer, topic, [("good", good), *((key, good) for key in poison), *poison.items()])
    engine, plugin = await recorded(bootstrap, spec, codec, engine_on)
    # every key kept its last good value, and nothing undecodable reached the table
    assert plugin.view == {key: {"n": 1, "u": "x", "e": "A"} for key in ["good", *poison]}
    assert engine.metrics.bad_records.labels(topic, "undecodable value")._value.get() == len(poison)
    warnings = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    assert len(warnings) == len(poison)
    for key, warning in zip(poison, warnings, strict=True):
        assert f"key '{key}': undecodable value: " in warning
