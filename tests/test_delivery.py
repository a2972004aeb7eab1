"""Per-plugin delivery on the real broker: a stuck plugin holds back only itself and its dependants;
start hooks and resyncs are retried; operators can request a resync; stop makes no further calls."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from datasync import PluginState

from conftest import FAST, create, put_all
from recorder import Recorder


class Stuck(Recorder):
    """Blocks in every change until released."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def change(self, event):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.release.wait()
        await super().change(event)


async def test_a_stuck_plugin_holds_back_only_itself_and_its_dependants(
    make_engine, producer: AIOKafkaProducer, topic: str
):
    engine = make_engine(topic, partitions=1)
    stuck, free, dependant = Stuck("stuck"), Recorder("free"), Recorder("dependant")
    engine.watch("stuck", stuck, {topic: [""]})
    engine.watch("free", free, {topic: [""]})
    engine.watch("dependant", dependant, {topic: [""]}, after=["stuck"])
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await stuck.entered.wait()
    await put_all(producer, topic, [("b", "2")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: free.view == {"a": "1", "b": "2"})
    assert stuck.view == {} and dependant.view == {}  # the dependant waits for the stuck one
    assert engine.status()["stuck"].queued >= 1
    stuck.release.set()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: dependant.view == {"a": "1", "b": "2"} and stuck.view == dependant.view)
    assert engine.status()["stuck"].queued == 0


async def test_a_plugin_that_fell_behind_gets_merged_batches(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1)
    stuck = Stuck("stuck")
    engine.watch("stuck", stuck, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await stuck.entered.wait()
    for key in "bcd":  # three batches queue up while the plugin is stuck
        await put_all(producer, topic, [(key, key)])
        async with asyncio.timeout(10):
            await engine.wait_for(lambda k=key: k in engine.table(topic))
    stuck.release.set()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(stuck.view) == 4)
    assert stuck.journal == [("resync", "stuck"), ("change", "stuck"), ("change", "stuck")]
    assert [c.key for c in stuck.changes] == ["a", "b", "c", "d"]


async def test_a_full_queue_stops_fetching(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"plugin_queue_max_records": 1}))
    stuck, free = Stuck("stuck"), Recorder("free")
    engine.watch("stuck", stuck, {topic: [""]})
    engine.watch("free", free, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await stuck.entered.wait()
    await put_all(producer, topic, [("b", "2")])  # queued for stuck: its queue is now over the bound
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: "b" in free.view)
    await put_all(producer, topic, [("c", "3")])
    await asyncio.sleep(1.0)  # several idle fetch cycles: "c" must not be fetched meanwhile
    assert "c" not in free.view and "c" not in engine.table(topic)
    stuck.release.set()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: stuck.view == free.view == {"a": "1", "b": "2", "c": "3"})


async def test_a_failing_start_hook_is_retried(make_engine, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"resync_backoff_s": 0.05}))

    class LateDependency(Recorder):
        starts = 0

        async def start(self, ctx):  # type: ignore[no-untyped-def]
            self.starts += 1
            if self.starts < 3:
                raise ConnectionError("dependency not there yet")

    plugin = LateDependency("late")
    engine.watch("late", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(10):
        await engine.wait_ready()
    assert plugin.starts == 3 and len(plugin.resyncs) == 1
    assert engine.metrics.plugin_failures.labels("late", "start")._value.get() == 2


async def test_operator_requested_resync(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"resync_max_attempts": 1}))
    plugin = Recorder("p", fail_resyncs=1)
    engine.watch("p", plugin, {topic: [""]})
    await create(engine)
    await put_all(producer, topic, [("a", "1")])
    # A long backoff: only the operator's request brings the failed plugin back quickly.
    engine.sync.resync_backoff_s = engine.sync.resync_backoff_max_s = 3600
    await engine.start()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["p"].state is PluginState.FAILED)
    engine.request_plugin_resync("p")
    async with asyncio.timeout(10):
        await engine.wait_ready()
    assert plugin.view == {"a": "1"}
    engine.request_plugin_resync("p")  # a ready plugin gets a fresh full resync
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: len(plugin.resyncs) == 2 and engine.status()["p"].state is PluginState.READY)
    try:
        engine.request_plugin_resync("nobody")
    except KeyError:
        pass
    else:
        raise AssertionError("an unknown plugin must raise KeyError")


async def test_stop_makes_no_further_plugin_calls(make_engine, producer: AIOKafkaProducer, topic: str):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"shutdown_timeout_s": 5}))
    stuck = Stuck("stuck")
    engine.watch("stuck", stuck, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await stuck.entered.wait()
    await put_all(producer, topic, [("b", "2")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["stuck"].queued == 2)
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0.2)
    stuck.release.set()  # the call in flight may finish; the queued one is never made
    async with asyncio.timeout(10):
        await stopping
    assert [c.key for c in stuck.changes] == ["a"]


async def test_an_engine_runs_again_after_a_stop(make_engine, producer: AIOKafkaProducer, topic: str):
    """What a start attempt that failed part-way does (it stops what it started), then a retry."""
    engine = make_engine(topic, partitions=1)
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await engine.stop()
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_for(lambda: len(plugin.resyncs) == 2 and engine.status()["p"].state is PluginState.READY)
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"a": "1"})
    assert engine.running


class Deaf(Stuck):
    """Stuck, and ignores cancellation meanwhile (a plugin that swallows CancelledError)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.cancels = 0

    async def change(self, event):  # type: ignore[no-untyped-def]
        self.entered.set()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancels += 1
        await Recorder.change(self, event)


async def test_stop_abandons_a_plugin_that_ignores_cancellation(
    make_engine, producer: AIOKafkaProducer, topic: str, caplog: pytest.LogCaptureFixture
):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"shutdown_timeout_s": 0.2}))
    deaf = Deaf("deaf")
    engine.watch("deaf", deaf, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await deaf.entered.wait()
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "datasync-deliver-deaf"]
    try:
        async with asyncio.timeout(10):
            await engine.stop()  # returns although the change call never ends
        assert deaf.cancels >= 1
        abandoned = [r for r in caplog.records if "deaf" in r.getMessage() and "abandoned" in r.getMessage()]
        assert len(abandoned) == 1 and abandoned[0].exc_info is None
    finally:
        deaf.release.set()
    async with asyncio.timeout(5):  # once its call returns, the abandoned task ends: it delivers nothing more
        await task


class Fatal(BaseException):
    """Not an Exception: no failure handling catches it, so it ends the plugin's delivery task."""


async def test_a_dead_delivery_task_holds_nothing_back(
    make_engine, producer: AIOKafkaProducer, topic: str, caplog: pytest.LogCaptureFixture
):
    engine = make_engine(topic, partitions=1, sync=FAST.model_copy(update={"plugin_queue_max_records": 1}))

    class DiesOnce(Recorder):
        died = False

        async def change(self, event):  # type: ignore[no-untyped-def]
            if any(c.key == "boom" for c in event.changes) and not self.died:
                self.died = True
                raise Fatal("boom")
            await super().change(event)

    dies, free = DiesOnce("dies"), Recorder("free")
    engine.watch("dies", dies, {topic: [""]})
    engine.watch("free", free, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await put_all(producer, topic, [("boom", "1")])
    for key in "abc":  # each over the bound of a queue that no task drains any more
        await put_all(producer, topic, [(key, key)])
    expected = {"boom": "1", "a": "a", "b": "b", "c": "c"}
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: free.view == expected)
        await engine.wait_for(lambda: dies.view == expected and engine.status()["dies"].state is PluginState.READY)
    assert len(dies.resyncs) == 2  # its view missed the batch it died on: resynced
    await put_all(producer, topic, [("d", "d")])  # and it gets changes again
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: dies.view.get("d") == "d")
    assert len([r for r in caplog.records if "delivery task failed" in r.getMessage()]) == 1
