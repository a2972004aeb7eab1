"""The core contract against the real broker: resync, order, changes, boundary, feedback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from datasync import DataSync, PluginState
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, StringCodec
from datasync.schemas import SchemaStore
from datasync.settings import KafkaSettings

from conftest import FAST, create, put_all
from recorder import Recorder


async def test_resync_is_last_value_per_key_across_partitions(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic)
    await create(engine)
    records = [(f"k{i}", f"v{i}", i % 3) for i in range(30)]
    records += [("k1", "v1-new", 1), ("k4", None, 1), ("k5", None, 2), ("k5", "v5-back", 2), ("k7", None, 1)]
    offsets = await put_all(producer, topic, records)
    plugin = Recorder("all")
    engine.watch("all", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()

    expected = {f"k{i}": f"v{i}" for i in range(30)}
    expected.update({"k1": "v1-new", "k5": "v5-back"})
    del expected["k4"], expected["k7"]
    assert plugin.view == expected
    assert len(plugin.resyncs) == 1 and plugin.changes == []
    # revision = offset of the last write, partition kept
    entry = engine.table(topic).get("k1")
    assert entry is not None and (entry.offset, entry.partition) == (offsets[30], 1)
    assert engine.table(topic).get("k4") is None and len(engine.table(topic)) == len(expected)


async def test_empty_topic_resyncs_at_once(make_engine, topic: str):
    engine = make_engine(topic, partitions=4)
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: ["a/"]})
    await engine.start()
    async with asyncio.timeout(15):
        await engine.wait_ready()
    assert plugin.resyncs == [{"a/": {}}]


async def test_resync_finishes_over_transaction_markers(make_engine, bootstrap: str, topic: str):
    """End offsets count commit markers that are never returned as records: the position must decide."""
    engine = make_engine(topic, partitions=1)
    await create(engine)
    tx = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    await tx.start()
    try:
        for i in range(3):
            async with tx.transaction():
                await tx.send(topic, key=f"k{i}".encode(), value=b"x")
    finally:
        await tx.stop()
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(15):
        await engine.wait_ready()
    assert plugin.view == {"k0": "x", "k1": "x", "k2": "x"}


async def test_plugins_resync_in_order_with_their_prefixes(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic)
    await create(engine)
    await put_all(
        producer,
        topic,
        [
            ("config/interfaces/eth0", "if0"),
            ("config/interfaces/eth1", "if1"),
            ("config/routes/r1", "via eth0"),
            ("config/routes/static/r2", "via eth1"),
            ("config/other/x", "unwatched"),
        ],
    )
    journal: list[tuple[str, str]] = []
    interfaces, routes = Recorder("interfaces", journal), Recorder("routes", journal)
    engine.watch("interfaces", interfaces, {topic: ["config/interfaces/"]})
    engine.watch("routes", routes, {topic: ["config/routes/", "config/routes/static/"]}, after=["interfaces"])
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()

    assert journal == [("resync", "interfaces"), ("resync", "routes")]
    assert interfaces.resyncs == [
        {"config/interfaces/": {"config/interfaces/eth0": "if0", "config/interfaces/eth1": "if1"}}
    ]
    assert routes.resyncs == [
        {
            "config/routes/": {"config/routes/r1": "via eth0", "config/routes/static/r2": "via eth1"},
            "config/routes/static/": {"config/routes/static/r2": "via eth1"},
        }
    ]
    # unwatched keys still update the table
    assert engine.table(topic).get("config/other/x") is not None

    # Hold the engine in a late plugin's resync while records land in two partitions, so
    # that one batch carries a change for each plugin: routes (after interfaces) is called second.
    gate = asyncio.Event()

    class Gate(Recorder):
        async def resync(self, event):  # type: ignore[no-untyped-def]
            await gate.wait()

    engine.watch("gate", Gate("gate"), {topic: ["nothing/"]})
    await asyncio.sleep(1.2)  # the engine picks the late registration up within a second
    await put_all(
        producer,
        topic,
        [("config/routes/r3", "via eth1", 0), ("config/interfaces/eth2", "if2", 1), ("config/other/y", "unwatched", 2)],
    )
    await asyncio.sleep(0.5)
    gate.set()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(interfaces.changes) == 1 and len(routes.changes) == 1)
    assert journal[2:] == [("change", "interfaces"), ("change", "routes")]
    assert len(routes.changes) == 1  # a key under two watched prefixes is delivered once
    assert engine.table(topic).get("config/other/y") is not None


async def test_changes_carry_the_previous_value_of_the_same_key(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)
    await create(engine)
    await put_all(producer, topic, [("a", "a1"), ("b", "b1")])
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()

    offsets = await put_all(
        producer,
        topic,
        [
            ("a", "a2"),  # update: prev a1 (not b1, the previous message)
            ("b", "b2"),
            ("c", "c1"),  # create: no prev
            ("a", "a2"),  # identical put: no change
            ("zz", None),  # delete of an unknown key: no change
            ("b", None),  # delete: prev b2
            ("a", "a3"),
        ],
    )
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(plugin.changes) >= 5)
    got = [(c.op, c.key, c.value, c.prev_value, c.revision) for c in plugin.changes]
    assert got == [
        ("put", "a", "a2", "a1", offsets[0]),
        ("put", "b", "b2", "b1", offsets[1]),
        ("put", "c", "c1", None, offsets[2]),
        ("delete", "b", None, "b2", offsets[5]),
        ("put", "a", "a3", "a2", offsets[6]),
    ]
    assert plugin.view == {"a": "a3", "c": "c1"}
    assert engine.status()["p"].changes_applied == 5


async def test_identical_puts_can_be_delivered(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"emit_identical_puts": True}))
    await create(engine)
    await put_all(producer, topic, [("a", "a1")])
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "a1")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(plugin.changes) == 1)
    assert (plugin.changes[0].value, plugin.changes[0].prev_value) == ("a1", "a1")


async def test_records_produced_during_resync_are_delivered_once(make_engine, bootstrap: str, topic: str):
    """The resync/live boundary: every record reaches the plugin exactly once, by resync or by change."""
    engine = make_engine(topic)
    await create(engine)
    total = 3000
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()

    class SlowResync(Recorder):
        async def resync(self, event):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.5)  # records keep arriving meanwhile
            await super().resync(event)

    plugin = SlowResync("p")
    engine.watch("p", plugin, {topic: [""]})

    async def produce() -> None:
        for i in range(total):
            await producer.send(topic, key=f"k{i:05d}".encode(), value=f"v{i}".encode())
            if i % 100 == 0:
                await asyncio.sleep(0.05)  # spread over ~1.5 s: before, during and after the resync
        await producer.flush()

    try:
        await put_all(producer, topic, [("k-first", "before start")])
        writer = asyncio.create_task(produce())
        await engine.start()
        await writer
    finally:
        await producer.stop()
    async with asyncio.timeout(30):
        await engine.wait_for(lambda: len(plugin.view) == total + 1)
    seen_in_resync = set(plugin.resyncs[0][""])
    seen_as_change = [c.key for c in plugin.changes]
    assert len(seen_as_change) == len(set(seen_as_change)), "a record was delivered twice"
    assert not seen_in_resync & set(seen_as_change), "a record was delivered by resync and as a change"
    assert len(seen_in_resync) + len(seen_as_change) == total + 1
    assert seen_in_resync and seen_as_change, "the test did not straddle the boundary"


async def test_failed_resync_is_retried_and_others_proceed(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"resync_backoff_s": 1.5}))
    await create(engine)
    await put_all(producer, topic, [("a/1", "x"), ("b/1", "y")])
    journal: list[tuple[str, str]] = []
    flaky, steady = Recorder("flaky", journal, fail_resyncs=1), Recorder("steady", journal)
    engine.watch("flaky", flaky, {topic: ["a/"]})
    engine.watch("steady", steady, {topic: ["b/"]})
    await engine.start()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["steady"].state is PluginState.READY)
    status = engine.status()["flaky"]
    assert status.state is PluginState.RESYNCING and "resync refused" in (status.last_error or "")

    # while flaky waits for its retry, steady gets changes and flaky gets none
    await put_all(producer, topic, [("a/2", "x2"), ("b/2", "y2")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(steady.changes) == 1)
    assert flaky.changes == [] and engine.status()["flaky"].state is PluginState.RESYNCING

    async with asyncio.timeout(10):
        await engine.wait_ready()
    assert flaky.view == {"a/1": "x", "a/2": "x2"}  # the retry saw the record it missed as a change
    assert journal[:3] == [("resync", "flaky"), ("resync", "steady"), ("change", "steady")]
    await put_all(producer, topic, [("a/3", "x3")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(flaky.changes) == 1)
    assert engine.metrics.plugin_failures.labels("flaky", "resync")._value.get() == 1


async def test_failed_plugin_is_retried_until_it_recovers(make_engine, topic: str):
    sync = FAST.model_copy(update={"resync_max_attempts": 2, "resync_backoff_s": 0.05, "resync_backoff_max_s": 0.2})
    engine = make_engine(topic, partitions=1, sync=sync)
    broken = Recorder("broken", fail_resyncs=6)  # its dependency comes back after 6 attempts
    engine.watch("broken", broken, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["broken"].state is PluginState.FAILED)
    status = engine.status()["broken"]
    assert status.resync_attempts == 2 and status.failed_since is not None and status.next_attempt_at is not None
    async with asyncio.timeout(10):
        await engine.wait_ready()
    status = engine.status()["broken"]
    assert broken.fail_resyncs == 0 and status.failed_since is None and status.last_error is None


async def test_failing_change_is_retried_then_recorded(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)

    class Picky(Recorder):
        calls = 0

        async def change(self, event):  # type: ignore[no-untyped-def]
            self.calls += 1
            if any(c.key == "bad" for c in event.changes):
                raise ValueError("cannot apply bad")
            await super().change(event)

    plugin = Picky("picky")
    engine.watch("picky", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("bad", "x")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["picky"].change_failures == 1)
    assert plugin.calls == FAST.change_max_attempts
    status = engine.status()["picky"]
    assert status.state is PluginState.READY and "cannot apply bad" in (status.last_error or "")
    await put_all(producer, topic, [("good", "y")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"good": "y"})


async def test_undecodable_record_keeps_previous_value(
    make_engine, producer: AIOKafkaProducer, topic: str, tmp_path: Path
):
    (tmp_path / "T.avsc").write_text('{"type":"record","name":"T","fields":[{"name":"n","type":"int"}]}')
    store = SchemaStore.load(tmp_path)
    codec = AvroCodec(store, store.get("T"))
    engine = make_engine(topic, partitions=1, codec=codec)
    await create(engine)
    await put_all(
        producer, topic, [("k", codec.encode({"n": 1})), ("k", b"garbage"), (b"\xff\xfe", codec.encode({"n": 5}))]
    )
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    assert plugin.view == {"k": {"n": 1}}
    await put_all(producer, topic, [("k", codec.encode({"n": 2})[:-1] + b"\xff\xff"), ("k", codec.encode({"n": 3}))])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"k": {"n": 3}})
    assert [c.prev_value for c in plugin.changes] == [{"n": 1}]
    bad = engine.metrics.bad_records
    assert bad.labels(topic, "undecodable value")._value.get() == 2
    assert bad.labels(topic, "key not UTF-8")._value.get() == 1


async def test_registration_close_and_late_watch(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)
    await create(engine)
    await put_all(producer, topic, [("a", "1")])
    first, second = Recorder("first"), Recorder("second")
    reg = engine.watch("first", first, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    engine.watch("second", second, {topic: [""]})  # registered while running: resync first
    async with asyncio.timeout(10):
        await engine.wait_ready()
    assert second.resyncs == [{"": {"a": "1"}}]
    await reg.close()  # closes only this registration
    await put_all(producer, topic, [("b", "2")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(second.changes) == 1)
    assert first.changes == [] and list(engine.status()) == ["second"]


async def test_one_prefix_on_two_topics(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)
    other = f"{topic}-b"
    engine.add_topic(TopicSpec(name=other, partitions=1, value="string"), StringCodec())
    await create(engine)
    await put_all(producer, topic, [("a", "1")])
    await put_all(producer, other, [("b", "2")])
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""], other: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    assert plugin.view == {"a": "1", "b": "2"}  # both topics' keys under the one prefix


async def test_a_plugin_raising_cancelled_error_does_not_stop_the_engine(
    make_engine, producer: AIOKafkaProducer, topic: str
):
    engine = make_engine(topic, partitions=1)

    class Rude(Recorder):
        raised = False

        async def change(self, event):  # type: ignore[no-untyped-def]
            if not self.raised:
                self.raised = True
                raise asyncio.CancelledError()  # e.g. awaiting a future someone else cancelled
            await super().change(event)

    plugin = Rude("rude")
    engine.watch("rude", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("k", "v")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"k": "v"})  # retried after the failure
    assert engine.running and engine.metrics.plugin_failures.labels("rude", "change")._value.get() == 1


async def test_a_plugin_may_close_its_own_registration(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)
    regs = {}

    class Quitter(Recorder):
        async def change(self, event):  # type: ignore[no-untyped-def]
            await super().change(event)
            await regs["quitter"].close()  # from inside its own handler, on the engine's task

    quitter, other = Quitter("quitter"), Recorder("other")
    regs["quitter"] = engine.watch("quitter", quitter, {topic: [""]})
    engine.watch("other", other, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: "quitter" not in engine.status() and other.view == {"a": "1"})
    await put_all(producer, topic, [("b", "2")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: other.view == {"a": "1", "b": "2"})
    assert quitter.view == {"a": "1"} and engine.running


async def test_a_failed_engine_task_is_logged_when_it_fails(
    make_engine, topic: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that ends the engine task is logged at once (not when the service stops), and
    ``wait_ended`` returns it: `datasync run` exits 1 on it, so that it is restarted."""
    engine = make_engine(topic)
    engine.watch("p", Recorder(), {topic: [""]})
    await create(engine)

    async def bug(self: DataSync) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(DataSync, "_resync_due", bug)
    await engine.start()
    async with asyncio.timeout(20):
        failure = await engine.wait_ended()
    assert isinstance(failure, RuntimeError) and not engine.running
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "datasync"]
    assert [r.getMessage() for r in logged] == [
        "datasync-engine failed, the engine no longer synchronises: RuntimeError('a bug')"
    ]


async def test_an_engine_that_reads_no_partition_runs(
    bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to read (only a publish-only topic here; a fleet member owning no partition alike):
    the engine runs, rather than its task failing on an empty assignment."""
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), FAST)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec(), read=False)
    publisher = engine.add_publisher("out", topic)
    try:
        await engine.start()
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: engine.generation >= 1)
            await publisher.put("k", "v")
        assert engine.running and not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await engine.stop()
