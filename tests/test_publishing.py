"""Publishing against the real broker: publishers, the changefeed, apply status, the HTTP write path."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from datasync import (
    ChangeEvent,
    DataSync,
    Delivery,
    Plugin,
    PluginContext,
    PluginError,
    Publisher,
    ResyncEvent,
    publish,
)
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.changefeed import Changefeed
from datasync.codecs import AvroCodec, JsonCodec, StringCodec
from datasync.errors import EncodeError
from datasync.publish import PublishError
from datasync.schemas import SchemaStore
from datasync.settings import HttpSettings, KafkaSettings, SyncSettings
from datasync.web import HttpServer

from conftest import eventually, put_all
from recorder import Recorder

QUICK = SyncSettings(change_backoff_s=0.01, change_max_attempts=2, resync_backoff_s=0.2)
ITEM = {"type": "record", "name": "Item", "namespace": "t", "fields": [{"name": "n", "type": "int"}]}


@pytest.fixture
def item_codec(tmp_path: Path) -> JsonCodec:
    (tmp_path / "Item.avsc").write_text(json.dumps(ITEM))
    return JsonCodec(SchemaStore.load(tmp_path).get("t.Item"))


@pytest.fixture
async def engines() -> AsyncIterator[list[DataSync]]:
    started: list[DataSync] = []
    yield started
    for engine in started:
        await engine.stop()


async def read_all(
    bootstrap: str, topic: str, committed: bool = True, decode: Callable[[bytes], Any] = json.loads
) -> list[tuple[str, Any]]:
    """Every record of ``topic`` (all partitions, in offset order per partition) as (key, decoded value)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed" if committed else "read_uncommitted"
    )
    count = (await prepare_topics(KafkaSettings(bootstrap_servers=bootstrap), [TopicSpec(name=topic)], False))[topic]
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[tuple[str, Any]] = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    out.append((record.key.decode(), None if record.value is None else decode(record.value)))
        return out
    finally:
        await consumer.stop()


async def test_publisher_round_trip(bootstrap: str, topic: str, engines: list[DataSync], item_codec: JsonCodec) -> None:
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=2, value="json:t.Item"), item_codec)
    pub = engine.add_publisher("out", topic)
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()

    delivery = await pub.put("a", {"n": 1})
    assert isinstance(delivery, Delivery) and delivery.topic == topic
    await pub.put_many([("b", {"n": 2}), ("c", {"n": 3})])
    await pub.delete("a")
    done: list[Any] = []
    pub.put_nowait("d", {"n": 4}, lambda d, exc: done.append((d, exc)))
    with pytest.raises(EncodeError, match=r"t\.Item"):
        await pub.put("e", {"n": "not an int"})
    with pytest.raises(EncodeError):
        await pub.put_many([("f", {"n": 5}), ("g", {"wrong": 1})])  # nothing of the batch is sent
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"b": {"n": 2}, "c": {"n": 3}, "d": {"n": 4}})
    assert [(c.op, c.key, c.prev_value) for c in plugin.changes if c.key == "a"] == [
        ("put", "a", None),
        ("delete", "a", {"n": 1}),
    ]
    assert done and done[0][1] is None and done[0][0].topic == topic
    assert "f" not in {k for k, _ in await read_all(bootstrap, topic)}
    assert engine.metrics.published.labels("out")._value.get() == 5


async def test_a_raising_on_done_callback_is_one_line_and_counted(
    bootstrap: str,
    topic: str,
    engines: list[DataSync],
    caplog: pytest.LogCaptureFixture,
    unhandled: list[dict[str, Any]],
) -> None:
    """The send task that calls on_done is awaited by nobody: a callback that raises must not end it with
    "Task exception was never retrieved" (a traceback, at garbage collection)."""
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec())
    pub = engine.add_publisher("out", topic)
    engine.watch("p", Recorder("p"), {topic: [""]})
    await engine.start()
    called: list[Delivery | None] = []

    def on_done(delivery: Delivery | None, exc: BaseException | None) -> None:
        called.append(delivery)
        raise ValueError("bug in the callback")

    pub.put_nowait("k", "v", on_done)
    failures = engine.metrics.publish_callback_failures.labels("out")
    async with asyncio.timeout(10):
        await eventually(lambda: asyncio.sleep(0, failures._value.get() == 1))
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []
    assert called and called[0] is not None and called[0].topic == topic
    lines = [r for r in caplog.records if r.name == "datasync.publish"]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        ("ERROR", "publisher out: on_done callback raised ValueError('bug in the callback')")
    ]


async def test_put_nowait_is_bounded_whatever_calls_it(
    bootstrap: str, topic: str, engines: list[DataSync], producer: AIOKafkaProducer
) -> None:
    """A resync is one call: nothing can wait between its put_nowait sends, so the limit is enforced
    by put_nowait itself. After the call the engine waits until the plugin has no send pending."""
    extra = 200

    class Flood(Plugin):
        async def start(self, ctx: PluginContext) -> None:
            self.out = ctx.publisher("out")
            self.sent, self.peak, self.refused = 0, 0, ""
            self.pending_at_change: list[int] = []

        async def resync(self, event: ResyncEvent) -> None:
            try:
                for i in range(publish.MAX_IN_FLIGHT + 1):
                    self.out.put_nowait(f"k{i}", "v")
                    self.sent += 1
                    self.peak = max(self.peak, len(engine.publishing._in_flight))
            except PublishError as exc:
                self.refused = str(exc)
            for i in range(extra):  # how a call sends more
                await self.out.room()
                self.out.put_nowait(f"more{i}", "v")
                self.peak = max(self.peak, len(engine.publishing._in_flight))

        async def change(self, event: ChangeEvent) -> None:
            self.pending_at_change.append(engine.publishing._pending.get("flood", 0))

    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec())
    engine.add_topic(TopicSpec(name=f"{topic}.out", partitions=1, value="string"), StringCodec(), read=False)
    engine.add_publisher("out", f"{topic}.out")
    plugin = Flood()
    engine.watch("flood", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(30):
        await engine.wait_ready()
    await put_all(producer, topic, [("a", "1")])
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.pending_at_change != [])
    assert plugin.sent == publish.MAX_IN_FLIGHT and plugin.peak == publish.MAX_IN_FLIGHT
    assert plugin.refused == (
        f"plugin flood: publisher out: {publish.MAX_IN_FLIGHT} put_nowait sends wait for the broker already;"
        " await the publisher's room() first, or use put_many"
    )
    assert plugin.pending_at_change == [0]
    assert engine.metrics.published.labels("out")._value.get() == publish.MAX_IN_FLIGHT + extra


async def changefeed_engine(bootstrap: str, source: str, settings: dict[str, Any]) -> tuple[DataSync, str]:
    outbound = f"{source}.changes"
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engine.add_topic(TopicSpec(name=source, partitions=2, value="json"), JsonCodec())
    engine.add_topic(TopicSpec(name=outbound, partitions=2, value="json"), JsonCodec(), read=False)
    engine.add_publisher("feed", outbound)
    engine.watch("feed", Changefeed(), {source: ["cfg/"]}, {"publisher": "feed", **settings})
    return engine, outbound


@pytest.mark.parametrize("tombstones", [True, False])
async def test_changefeed_envelopes(bootstrap: str, topic: str, engines: list[DataSync], tombstones: bool) -> None:
    async def start_feed() -> tuple[DataSync, Publisher, str]:
        engine, outbound = await changefeed_engine(bootstrap, topic, {"snapshot": True, "tombstones": tombstones})
        engines.append(engine)
        source = engine.add_publisher("source", topic)
        await engine.start()
        async with asyncio.timeout(20):
            await engine.wait_ready()
        return engine, source, outbound

    engine, source, outbound = await start_feed()
    await source.put("cfg/a", {"v": 1})  # after the (empty) snapshot: a create
    await engine.stop()  # and start again: the existing key is not a snapshot record (there is a checkpoint)
    engine, source, outbound = await start_feed()
    await source.put("cfg/b", {"v": 2})
    await source.put("cfg/a", {"v": 11})
    await source.put("other/x", {"v": 0})  # not watched
    await source.delete("cfg/b")
    expected = [
        ("cfg/a", "c", None, {"v": 1}),
        ("cfg/b", "c", None, {"v": 2}),
        ("cfg/a", "u", {"v": 1}, {"v": 11}),
        ("cfg/b", "d", {"v": 2}, None),
    ]

    async def all_there() -> bool:
        return len([g for g in await read_all(bootstrap, outbound) if g[1] is not None]) >= len(expected)

    async with asyncio.timeout(15):
        await eventually(all_there)
    got = await read_all(bootstrap, outbound)
    envelopes = [(k, v["op"], v["before"], v["after"]) for k, v in got if v is not None]
    assert sorted(envelopes, key=str) == sorted(expected, key=str)
    assert all(v["source"]["topic"] == topic and v["ts_ms"] > 0 for _, v in got if v is not None)
    tombstone_keys = [k for k, v in got if v is None]
    assert tombstone_keys == (["cfg/b"] if tombstones else [])
    b_records = [v for k, v in got if k == "cfg/b"]  # the tombstone follows the delete
    assert b_records[-1] is None if tombstones else b_records[-1]["op"] == "d"


async def test_changefeed_snapshot_records(bootstrap: str, topic: str, engines: list[DataSync]) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    await prepare_topics(kafka, [TopicSpec(name=topic, partitions=2)], create=True)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:  # state that exists before the feed does
        await put_all(producer, topic, [("cfg/a", b'{"v": 1}'), ("cfg/b", b'{"v": 2}'), ("other/x", b"{}")])
    finally:
        await producer.stop()
    engine, outbound = await changefeed_engine(bootstrap, topic, {"snapshot": True})
    engines.append(engine)
    source = engine.add_publisher("source", topic)
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await source.put("cfg/c", {"v": 3})

    async def arrived() -> bool:
        return any(v and v["key"] == "cfg/c" for _, v in await read_all(bootstrap, outbound))

    async with asyncio.timeout(10):
        await eventually(arrived)
    got = sorted((v["key"], v["op"], v["before"], v["after"]) for _, v in await read_all(bootstrap, outbound) if v)
    assert got == [("cfg/a", "r", None, {"v": 1}), ("cfg/b", "r", None, {"v": 2}), ("cfg/c", "c", None, {"v": 3})]


async def test_changefeed_avro_envelopes(bootstrap: str, topic: str, engines: list[DataSync], tmp_path: Path) -> None:
    """With ``value: avro:t.ItemChange`` (derived from t.Item) the envelopes are Avro."""
    (tmp_path / "Item.avsc").write_text(json.dumps(ITEM))
    store = SchemaStore.load(tmp_path)
    envelope = AvroCodec(store, store.get("t.ItemChange"))
    outbound = f"{topic}.changes"
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="avro:t.Item"), AvroCodec(store, store.get("t.Item")))
    engine.add_topic(TopicSpec(name=outbound, partitions=1, value="avro:t.ItemChange"), envelope, read=False)
    engine.add_publisher("feed", outbound)
    source = engine.add_publisher("source", topic)
    engine.watch("feed", Changefeed(), {topic: [""]}, {"publisher": "feed"})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await source.put("k", {"n": 1})
    await source.put("k", {"n": 2})
    await source.delete("k")

    async def arrived() -> bool:
        return len(await read_all(bootstrap, outbound, decode=envelope.decode)) >= 4

    async with asyncio.timeout(10):
        await eventually(arrived)
    got = await read_all(bootstrap, outbound, decode=envelope.decode)
    assert [(v["op"], v["before"], v["after"]) if v else None for _, v in got] == [
        ("c", None, {"n": 1}),
        ("u", {"n": 1}, {"n": 2}),
        ("d", {"n": 2}, None),
        None,
    ]


async def test_apply_status_error_then_ok(bootstrap: str, topic: str, engines: list[DataSync]) -> None:
    status_topic = f"{topic}.status"
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="json"), JsonCodec())
    engine.add_topic(TopicSpec(name=status_topic, partitions=1, value="json"), JsonCodec(), read=False)
    engine.add_publisher("status", status_topic)
    source = engine.add_publisher("source", topic)
    broken = {"bad"}

    class Picky(Recorder):
        async def change(self, event):  # type: ignore[no-untyped-def]
            failing = [c.key for c in event.changes if c.key in broken]
            if failing:
                raise PluginError("cannot apply", keys=failing)
            await super().change(event)

    engine.watch("picky", Picky("picky"), {topic: [""]}, status_publisher="status")
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    await source.put("bad", {"v": 1})
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: engine.status()["picky"].change_failures == 1)
    broken.clear()
    await source.put("bad", {"v": 2})
    await source.put("good", {"v": 3})
    await source.delete("good")

    async def published() -> bool:
        return len(await read_all(bootstrap, status_topic, committed=False)) >= 4

    async with asyncio.timeout(10):
        await eventually(published)
    lines = await read_all(bootstrap, status_topic, committed=False)
    bad = [v for k, v in lines if k == "bad"]
    assert [b["status"] for b in bad] == ["error", "ok"]
    assert "cannot apply" in bad[0]["error"] and bad[1]["error"] is None and bad[0]["plugin"] == "picky"
    assert bad[1]["revision"] > bad[0]["revision"]
    assert [v for k, v in lines if k == "good"][-1] is None  # deleted from the source: tombstone


async def test_http_write_path(bootstrap: str, topic: str, engines: list[DataSync], item_codec: JsonCodec) -> None:
    token = "t0ken-of-sixteen-chars"
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="json:t.Item"), item_codec)
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    settings = HttpSettings(port=0, writes_enabled=True, token=token, max_body_bytes=200)  # type: ignore[arg-type]
    http = HttpServer(engine, settings)
    await http.start()
    base = f"http://127.0.0.1:{http.port}/v1/topics/{topic}/keys"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
                async with session.request(method, f"{base}/{path}", **kw) as r:
                    return r.status, await r.json()

            assert (await call("PUT", "cfg/a", data=b'{"n": 1}'))[0] == 401
            assert (await call("PUT", "cfg/a", data=b'{"n": 1}', headers={"Authorization": "Bearer nope"}))[0] == 401
            status, body = await call("PUT", "cfg/a", data=b"{not json", headers=auth)
            assert status == 400 and "not JSON" in body["error"]
            status, body = await call("PUT", "cfg/a", data=b'{"n": "x"}', headers=auth)
            assert status == 422 and "t.Item" in body["error"]
            assert (await call("PUT", "cfg/a", data=b'{"n": 1, "pad": "' + b"x" * 300 + b'"}', headers=auth))[0] == 413
            status, body = await call("PUT", "cfg/a/b", data=b'{"n": 7}', headers=auth)
            assert status == 200 and body["offset"] == 0  # nothing before it reached Kafka
            async with asyncio.timeout(10):
                await engine.wait_for(lambda: plugin.view == {"cfg/a/b": {"n": 7}})
            status, body = await call("GET", "cfg/a/b")
            assert status == 200 and body["value"] == {"n": 7} and body["revision"] == 0
            assert (await call("GET", "cfg/none"))[0] == 404
            assert (await call("DELETE", "cfg/a/b"))[0] == 401
            assert (await call("DELETE", "cfg/a/b", headers=auth))[0] == 200
            async with asyncio.timeout(10):
                await engine.wait_for(lambda: plugin.view == {})
            assert (await call("GET", "cfg/a/b"))[0] == 404
            assert (await call("PUT", "x", data=b"{}", headers=auth))[0] == 422
    finally:
        await http.stop()
    records = await read_all(bootstrap, topic)
    assert records == [("cfg/a/b", {"n": 7}), ("cfg/a/b", None)]


async def test_http_writes_are_off_by_default(bootstrap: str, topic: str, engines: list[DataSync]) -> None:
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), QUICK)
    engines.append(engine)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="json"), JsonCodec())
    await engine.start()
    http = HttpServer(engine, HttpSettings(port=0))
    await http.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{http.port}/v1/topics/{topic}/keys/a"
            async with session.put(url, data=b"{}", headers={"Authorization": "Bearer x"}) as r:
                assert r.status == 403
    finally:
        await http.stop()
    assert await read_all(bootstrap, topic) == []
