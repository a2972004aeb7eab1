"""Avro in the Confluent wire format against a real schema registry (Apicurio) and a real broker.

Records are written by another implementation (the ``confluent-kafka``
package's AvroSerializer) to prove that datasync reads what the ecosystem
writes, and what datasync publishes is read back with its AvroDeserializer.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from test_publishing import read_all

from datasync import DataSync
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.changefeed import Changefeed
from datasync.confluent import RegistryCodec, subject_name
from datasync.errors import DecodeError, EncodeError
from datasync.registry import RegistryClient, RegistryUnavailable, SchemaNotFound, redact
from datasync.schemas import SchemaStore
from datasync.settings import HttpSettings, KafkaSettings, RegistrySettings, SyncSettings
from datasync.web import HttpServer

from conftest import eventually, put_all
from localkafka import LocalBroker
from recorder import Recorder

QUICK = SyncSettings(change_backoff_s=0.01, change_max_attempts=2, resync_backoff_s=0.2)
FIELDS_V1 = [{"name": "sku", "type": "string"}, {"name": "price", "type": "double"}]
PRODUCT_V1 = {"type": "record", "name": "Product", "namespace": "shop", "fields": FIELDS_V1}
PRODUCT = {**PRODUCT_V1, "fields": [*FIELDS_V1, {"name": "currency", "type": "string", "default": "EUR"}]}


@pytest.fixture
def store(tmp_path: Path) -> SchemaStore:
    (tmp_path / "schemas" / "shop").mkdir(parents=True)
    (tmp_path / "schemas" / "shop" / "Product.avsc").write_text(json.dumps(PRODUCT))
    return SchemaStore.load(tmp_path / "schemas")


@pytest.fixture
async def engines() -> AsyncIterator[list[DataSync]]:
    started: list[DataSync] = []
    yield started
    for engine in started:
        await engine.stop()


def serializer(registry_url: str, schema: dict[str, Any], topic: str) -> Any:
    """confluent-kafka's AvroSerializer: value -> bytes for ``topic`` (registers under ``topic-value``)."""
    avro = AvroSerializer(SchemaRegistryClient({"url": registry_url}), json.dumps(schema))
    return lambda value: avro(value, SerializationContext(topic, MessageField.VALUE))


def deserializer(registry_url: str, topic: str) -> Any:
    avro = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
    return lambda raw: avro(raw, SerializationContext(topic, MessageField.VALUE))


async def subjects(registry_url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{registry_url}/subjects") as response:
        return list(await response.json())


async def started(
    engines: list[DataSync],
    kafka: KafkaSettings,
    spec: TopicSpec,
    client: RegistryClient,
    store: SchemaStore,
    prefix: str,
) -> tuple[DataSync, Recorder]:
    """An engine reading ``spec`` through ``client`` into one recording plugin watching ``prefix``, ready."""
    engine = DataSync(kafka, QUICK)
    engines.append(engine)
    engine.add_topic(spec, RegistryCodec(client, spec.name, store.get("shop.Product")))
    plugin = Recorder("p")
    engine.watch("p", plugin, {spec.name: [prefix]})
    await engine.start()
    async with asyncio.timeout(30):
        await engine.wait_ready()
    return engine, plugin


def bad(engine: DataSync, topic: str) -> float:
    return float(engine.metrics.bad_records.labels(topic, "undecodable value")._value.get())


async def test_reads_what_the_confluent_serializer_writes(
    bootstrap: str, registry_url: str, topic: str, producer: AIOKafkaProducer, store: SchemaStore, engines: list
) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    dead = f"{topic}.dead"
    spec = TopicSpec(name=topic, partitions=2, value="registry:shop.Product", dead_letter=dead)
    await prepare_topics(kafka, [spec], create=True)
    v1 = serializer(registry_url, PRODUCT_V1, topic)
    one = v1({"sku": "a", "price": 1.5})
    await put_all(producer, topic, [
        ("p/1", one, 0),
        ("p/2", v1({"sku": "b", "price": 2.0}), 1),
        ("p/unknown-id", b"\x00\x00\x0f\x42\x40" + one[5:], 0),  # schema id 1,000,000: not in the registry
        ("p/bad-body", one[:5] + b"\xff\xff\xff", 1),
        ("p/not-confluent", b"\xc3\x01 single-object encoding", 0),
    ])  # fmt: skip
    engine, plugin = await started(engines, kafka, spec, RegistryClient(RegistrySettings(urls=registry_url)), store, "")
    # v1 records resolved to the reader schema: the field v1 lacks gets its default
    assert plugin.view == {"p/1": {"sku": "a", "price": 1.5, "currency": "EUR"},
                           "p/2": {"sku": "b", "price": 2.0, "currency": "EUR"}}  # fmt: skip
    assert bad(engine, topic) == 3

    # a newer writer version, registered by the other serializer, arrives as a live change
    v2 = serializer(registry_url, PRODUCT, topic)
    await put_all(producer, topic, [("p/1", v2({"sku": "a", "price": 1.75, "currency": "CHF"}))])
    async with asyncio.timeout(20):
        await engine.wait_for(lambda: plugin.view["p/1"]["currency"] == "CHF")
    assert plugin.changes[-1].prev_value == {"sku": "a", "price": 1.5, "currency": "EUR"}

    async def dead_lettered() -> bool:
        return len(await read_all(bootstrap, dead, decode=bytes)) == 3

    async with asyncio.timeout(20):
        await eventually(dead_lettered)


async def test_published_records_are_read_by_the_confluent_deserializer(
    bootstrap: str, registry_url: str, topic: str, store: SchemaStore, engines: list, tmp_path: Path
) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    changes = f"{topic}.changes"
    client = RegistryClient(RegistrySettings(urls=registry_url))
    engine = DataSync(kafka, QUICK)
    engines.append(engine)
    engine.add_topic(
        TopicSpec(name=topic, value="registry:shop.Product"), RegistryCodec(client, topic, store.get("shop.Product"))
    )
    envelope = RegistryCodec(client, changes, store.get("shop.ProductChange"))  # the derived changefeed schema
    engine.add_topic(TopicSpec(name=changes, value="registry:shop.ProductChange"), envelope, read=False)
    out = engine.add_publisher("products", topic)
    engine.add_publisher("product-changes", changes)
    engine.watch("feed", Changefeed(), {topic: [""]}, {"publisher": "product-changes"})
    http = HttpServer(engine, HttpSettings(port=0, writes_enabled=True, token="t" * 16))
    await engine.start()
    await http.start()
    try:
        async with asyncio.timeout(30):
            await engine.wait_ready()
        await out.put("p/1", {"sku": "a", "price": 1.5, "currency": "EUR"})
        with pytest.raises(EncodeError):
            await out.put("p/2", {"sku": "b"})
        with pytest.raises(EncodeError, match="unknown field"):  # refused, not dropped
            await out.put("p/2", {"sku": "b", "price": 2.0, "currency": "EUR", "colour": "red"})
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer " + "t" * 16}) as session:
            url = f"http://127.0.0.1:{http.port}/v1/topics/{topic}/keys/p/3"
            async with session.put(url, json={"sku": "c", "price": 3.0, "currency": "USD"}) as response:
                assert response.status == 200, await response.text()
            async with session.put(url, json={"sku": 3}) as response:
                assert response.status == 422
        await out.delete("p/1")
        assert {f"{topic}-value", f"{changes}-value"} <= set(await subjects(registry_url))
        assert await read_all(bootstrap, topic, decode=deserializer(registry_url, topic)) == [
            ("p/1", {"sku": "a", "price": 1.5, "currency": "EUR"}),
            ("p/3", {"sku": "c", "price": 3.0, "currency": "USD"}),
            ("p/1", None),
        ]

        async def feed() -> list[tuple[str, Any]]:
            return await read_all(bootstrap, changes, decode=deserializer(registry_url, changes))

        async with asyncio.timeout(20):
            await eventually(lambda: _has(feed, 4))  # c, c, d and the tombstone
        ops = [(key, value and value["op"]) for key, value in await feed()]
        assert ops == [("p/1", "c"), ("p/3", "c"), ("p/1", "d"), ("p/1", None)]
        assert (await feed())[2][1]["before"] == {"sku": "a", "price": 1.5, "currency": "EUR"}
    finally:
        await http.stop()


async def _has(read: Any, n: int) -> bool:
    return len(await read()) >= n


async def test_subject_strategies_and_lookup_only(registry_url: str, store: SchemaStore, topic: str) -> None:
    assert subject_name("topic", "shop.products", "shop.Product") == "shop.products-value"
    assert subject_name("record", "shop.products", "shop.Product") == "shop.Product"
    assert subject_name("topic_record", "shop.products", "shop.Product") == "shop.products-shop.Product"
    product = store.get("shop.Product")
    lookup = RegistryClient(RegistrySettings(urls=registry_url, auto_register=False, subject_strategy="topic_record"))
    codec = RegistryCodec(lookup, topic, product)
    with pytest.raises(EncodeError, match="not known yet"):
        codec.encode({"sku": "a", "price": 1.0, "currency": "EUR"})
    with pytest.raises(SchemaNotFound):  # lookup only: nothing registered under the subject
        await codec.prepare_encode()
    registering = RegistryClient(RegistrySettings(urls=registry_url, subject_strategy="topic_record"))
    writer = RegistryCodec(registering, topic, product)
    await writer.prepare_encode()
    assert f"{topic}-shop.Product" in await subjects(registry_url)
    await codec.prepare_encode()  # now the lookup finds it, with the same id
    value = {"sku": "a", "price": 1.0, "currency": "EUR"}
    assert codec.encode(value) == writer.encode(value)
    reader = RegistryCodec(RegistryClient(RegistrySettings(urls=registry_url)), "other", product)
    raw = codec.encode(value)
    await reader.prepare_decode([raw])
    assert reader.decode(raw) == value


async def test_writer_schemas_with_references(registry_url: str, topic: str) -> None:
    money = {"type": "record", "name": "Money", "namespace": "shop",
             "fields": [{"name": "amount", "type": "long"}, {"name": "currency", "type": "string"}]}  # fmt: skip
    priced = {"type": "record", "name": "Priced", "namespace": "shop",
              "fields": [{"name": "sku", "type": "string"}, {"name": "price", "type": "shop.Money"}]}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{registry_url}/subjects/{topic}-money/versions",
                                json={"schema": json.dumps(money)}) as response:  # fmt: skip
            assert response.status == 200, await response.text()
        reference = {"name": "shop.Money", "subject": f"{topic}-money", "version": 1}
        body = {"schema": json.dumps(priced), "references": [reference]}
        async with session.post(f"{registry_url}/subjects/{topic}-value/versions", json=body) as response:
            assert response.status == 200, await response.text()
            schema_id = (await response.json())["id"]
    codec = RegistryCodec(RegistryClient(RegistrySettings(urls=registry_url)), topic)  # the writer's schema
    raw = b"\x00" + schema_id.to_bytes(4, "big") + b"\x02a\x90\x03\x06EUR"  # sku "a", 200, "EUR"
    await codec.prepare_decode([raw])
    assert codec.decode(raw) == {"sku": "a", "price": {"amount": 200, "currency": "EUR"}}


async def test_unknown_ids_are_remembered_and_the_cache_is_bounded(registry_url: str, store: SchemaStore) -> None:
    client = RegistryClient(RegistrySettings(urls=registry_url, cache_size=2))
    product = store.get("shop.Product")
    assert product is not None
    codec = RegistryCodec(client, "t", product)
    await codec.prepare_encode()
    value = {"sku": "a", "price": 1.0, "currency": "EUR"}
    good = codec.encode(value)
    await codec.prepare_decode([good])
    assert codec.decode(good) == value
    unknown = [b"\x00" + (2_000_000 + i).to_bytes(4, "big") + good[5:] for i in range(2)]
    await codec.prepare_decode(unknown)
    with pytest.raises(DecodeError, match="2000001"):
        codec.decode(unknown[1])
    with pytest.raises(DecodeError, match="not loaded"):  # evicted: the cache holds two ids
        codec.decode(good)
    await codec.prepare_decode([good])
    assert codec.decode(good) == value
    with pytest.raises(DecodeError, match="magic byte"):
        codec.decode(b"\x01\x00")


class Switch:
    """A loopback TCP proxy to the registry that can refuse every connection (a registry gone away)."""

    def __init__(self, target: str) -> None:
        host, port = target.split("//")[1].split("/")[0].split(":")
        self.target = (host, int(port))
        self.up = False
        self.refused = 0
        self._refusal = asyncio.Condition()

    async def refused_at_least(self, n: int) -> None:
        async with self._refusal:
            await self._refusal.wait_for(lambda: self.refused >= n)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            async with self._refusal:
                self.refused += 1
                self._refusal.notify_all()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_an_unreachable_registry_is_waited_for_not_turned_into_bad_records(
    bootstrap: str, registry_url: str, topic: str, producer: AIOKafkaProducer, store: SchemaStore, engines: list
) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    spec = TopicSpec(name=topic, value="registry:shop.Product")
    await prepare_topics(kafka, [spec], create=True)
    v1 = serializer(registry_url, PRODUCT_V1, topic)
    await put_all(producer, topic, [("p/1", v1({"sku": "a", "price": 1.5}))])
    switch = Switch(registry_url)
    port = await switch.start()
    try:
        settings = RegistrySettings(urls=f"http://127.0.0.1:{port}/apis/ccompat/v7", retry_backoff_s=0.05)
        engine = DataSync(kafka, QUICK)
        engines.append(engine)
        engine.add_topic(spec, RegistryCodec(RegistryClient(settings), topic, store.get("shop.Product")))
        plugin = Recorder("p")
        engine.watch("p", plugin, {topic: [""]})
        await engine.start()
        async with asyncio.timeout(20):
            await switch.refused_at_least(3)  # the engine keeps asking
        assert plugin.resyncs == [] and bad(engine, topic) == 0
        switch.up = True
        async with asyncio.timeout(30):
            await engine.wait_ready()
        assert plugin.view == {"p/1": {"sku": "a", "price": 1.5, "currency": "EUR"}} and bad(engine, topic) == 0
        # a live record whose (new) schema id must be fetched while the registry is away again
        switch.up = False
        await put_all(producer, topic, [("p/2", serializer(registry_url, PRODUCT, topic)(
            {"sku": "b", "price": 2.0, "currency": "CHF"}))])  # fmt: skip
        refused = switch.refused
        async with asyncio.timeout(20):
            await switch.refused_at_least(refused + 3)
        assert "p/2" not in plugin.view
        switch.up = True
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: "p/2" in plugin.view)
        assert bad(engine, topic) == 0
        with pytest.raises(RegistryUnavailable):  # the write paths do not wait: one attempt, then an error
            switch.up = False
            await RegistryClient(settings).load([1], retry=False)
    finally:
        await switch.stop()


async def test_credentials_go_into_headers_and_never_into_logs(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str | None] = []

    async def schema(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"message": "no", "error_code": 50001}, status=500)

    app = web.Application()
    app.router.add_get("/schemas/ids/{id}", schema)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for settings in (
            RegistrySettings(urls=f"http://127.0.0.1:{port}", bearer_token="s3cret-token"),
            RegistrySettings(urls=f"http://127.0.0.1:{port}", username="u", password="s3cret-pw"),
        ):
            assert "s3cret" not in repr(settings)
            with pytest.raises(RegistryUnavailable, match="HTTP 500"):
                await RegistryClient(settings).load([7], retry=2)
    finally:
        await runner.cleanup()
    assert seen == ["Bearer s3cret-token"] * 2 + ["Basic dTpzM2NyZXQtcHc="] * 2
    assert "s3cret" not in caplog.text and "HTTP 500" in caplog.text
    assert redact("https://u:pw@registry:8081/x") == "https://registry:8081/x"
    with pytest.raises(ValueError, match="not both"):
        RegistrySettings(urls="http://x", username="u", password="p", bearer_token="t")


def test_cli_publish_and_dump_through_the_registry(
    bootstrap: str, registry_url: str, topic: str, tmp_path: Path
) -> None:
    (tmp_path / "topics").mkdir()
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "Product.avsc").write_text(json.dumps(PRODUCT))
    (tmp_path / "topics" / "t.yaml").write_text(f"topics: [{{name: {topic}, value: 'registry:shop.Product'}}]\n")
    env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "DATASYNC_REGISTRY__URLS": registry_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "datasync.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    assert cli("topics", "create").returncode == 0
    published = cli("publish", topic, "k", '{"sku": "a", "price": 1.5, "currency": "EUR"}')
    assert published.returncode == 0, published.stderr
    dumped = cli("dump", topic)
    assert [json.loads(line)["value"] for line in dumped.stdout.splitlines()] == [
        {"sku": "a", "price": 1.5, "currency": "EUR"}
    ]
    env.pop("DATASYNC_REGISTRY__URLS")
    missing = cli("check")
    assert missing.returncode == 2 and "DATASYNC_REGISTRY__URLS" in missing.stderr
    env["DATASYNC_REGISTRY__URLS"] = "http://127.0.0.1:9/apis/ccompat/v7"  # nothing listens on port 9
    env["DATASYNC_REGISTRY__RETRY_BACKOFF_S"] = "0.05"
    unreachable = cli("publish", topic, "k", '{"sku": "a", "price": 1.5}')
    last = unreachable.stderr.splitlines()[-1]
    assert unreachable.returncode == 1 and last.startswith("datasync: schema registry: http://127.0.0.1:9/"), last
    assert "Traceback" not in unreachable.stderr
    # the service needs the schema id of a published topic before it starts
    (tmp_path / "topics" / "t.yaml").write_text(
        f"topics: [{{name: {topic}, value: 'registry:shop.Product'}}]\npublishers: [{{name: out, topic: {topic}}}]\n"
    )
    env["DATASYNC_HTTP__PORT"] = "0"
    run = cli("run")
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("datasync: schema registry:"), run.stderr
    assert "Traceback" not in run.stderr


async def test_an_https_registry_is_trusted_through_the_ca_file() -> None:
    certificates = LocalBroker(tls=True)  # only for its throw-away CA and 127.0.0.1 certificate
    try:
        certificates._make_certificates()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(certificates.workdir / "server.crt", certificates.workdir / "server.key")

        async def schema(request: web.Request) -> web.Response:
            return web.json_response({"schema": json.dumps(PRODUCT)})

        app = web.Application()
        app.router.add_get("/schemas/ids/{id}", schema)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        try:
            trusting = RegistryClient(RegistrySettings(urls=url, ca_file=certificates.ca_file))
            await trusting.load([1], retry=False)
            found = trusting.cached(1)
            assert not isinstance(found, str) and found.fullname == "shop.Product"
            with pytest.raises(RegistryUnavailable, match="certificate"):  # the system CAs do not know ours
                await RegistryClient(RegistrySettings(urls=url)).load([1], retry=False)
        finally:
            await runner.cleanup()
    finally:
        certificates.stop()


async def test_a_start_from_a_snapshot_decodes_registry_values(
    bootstrap: str, registry_url: str, topic: str, producer: AIOKafkaProducer, store: SchemaStore, tmp_path: Path
) -> None:
    """A snapshot holds the values' bytes only: loading it must load their writer schemas too."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    spec = TopicSpec(name=topic, partitions=2, value="registry:shop.Product")
    await prepare_topics(kafka, [spec], create=True)
    v1 = serializer(registry_url, PRODUCT_V1, topic)
    await put_all(producer, topic, [(f"p/{i}", v1({"sku": str(i), "price": float(i)}), i % 2) for i in range(20)])
    expected = {f"p/{i}": {"sku": str(i), "price": float(i), "currency": "EUR"} for i in range(20)}
    views = []
    for _ in range(2):  # the second start loads the snapshot the first one wrote at shutdown
        client = RegistryClient(RegistrySettings(urls=registry_url))  # an empty schema cache, as after a restart
        engine = DataSync(kafka, QUICK, state_dir=tmp_path / "state")
        engine.add_topic(spec, RegistryCodec(client, topic, store.get("shop.Product")))
        plugin = Recorder("p")
        engine.watch("p", plugin, {topic: [""]})
        try:
            await engine.start()
            async with asyncio.timeout(30):
                await engine.wait_ready()
            views.append((dict(plugin.view), engine._snapshots.describe(topic)["from"] if engine._snapshots else None))
        finally:
            await engine.stop()
    assert views == [(expected, "full read"), (expected, "snapshot")]


async def v1_products(
    kafka: KafkaSettings,
    registry_url: str,
    topic: str,
    producer: AIOKafkaProducer,
    store: SchemaStore,
    engines: list[DataSync],
    cache_size: int,
) -> tuple[DataSync, Recorder, RegistryClient, int]:
    """Three products written with schema v1, read by an engine whose schema cache holds
    ``cache_size`` schemas (ready); and v1's id."""
    spec = TopicSpec(name=topic, partitions=1, value="registry:shop.Product")
    await prepare_topics(kafka, [spec], create=True)
    v1 = serializer(registry_url, PRODUCT_V1, topic)
    await put_all(producer, topic, [(f"p/{i}", v1({"sku": str(i), "price": float(i)})) for i in range(3)])
    client = RegistryClient(RegistrySettings(urls=registry_url, cache_size=cache_size))
    engine, plugin = await started(engines, kafka, spec, client, store, "p/")
    return engine, plugin, client, int.from_bytes(v1({"sku": "x", "price": 0.0})[1:5], "big")


async def evict(client: RegistryClient, registry_url: str, topic: str, schema_id: int) -> None:
    """Fill every slot of the client's cache with other schemas: ``schema_id`` is evicted."""
    others = [
        serializer(registry_url, {**PRODUCT, "name": f"Other{n}"}, f"{topic}.other{n}")({"sku": "x", "price": 0.0})
        for n in range(client.settings.cache_size)
    ]
    await client.load([int.from_bytes(raw[1:5], "big") for raw in others])
    assert isinstance(client.cached(schema_id), str)


async def test_a_resync_loads_writer_schemas_evicted_since_the_read(
    bootstrap: str, registry_url: str, topic: str, producer: AIOKafkaProducer, store: SchemaStore, engines: list
) -> None:
    """The schema cache is bounded: a schema loaded when its records were read may be gone when a
    plugin's resync decodes them later. The resync loads it again instead of failing the plugin."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    engine, plugin, client, v1_id = await v1_products(kafka, registry_url, topic, producer, store, engines, 1)
    await evict(client, registry_url, topic, v1_id)

    engine.request_plugin_resync("p")
    async with asyncio.timeout(30):
        await engine.wait_for(lambda: len(plugin.resyncs) == 2 and engine.status()["p"].state.value == "ready")
    assert plugin.view == {f"p/{i}": {"sku": str(i), "price": float(i), "currency": "EUR"} for i in range(3)}


async def test_changes_and_key_reads_load_writer_schemas_evicted_since_the_read(
    bootstrap: str, registry_url: str, topic: str, producer: AIOKafkaProducer, store: SchemaStore, engines: list
) -> None:
    """A change carries the previous value and an HTTP read returns the current one, both read
    earlier: if the bounded cache dropped their schema since, it is loaded again."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    engine, plugin, client, v1_id = await v1_products(kafka, registry_url, topic, producer, store, engines, 2)
    await evict(client, registry_url, topic, v1_id)
    http = HttpServer(engine, HttpSettings(port=0))
    await http.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{http.port}/v1/topics/{topic}/keys/p/1") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["value"] == {"sku": "1", "price": 1.0, "currency": "EUR"}
    finally:
        await http.stop()

    await evict(client, registry_url, topic, v1_id)
    v2 = serializer(registry_url, PRODUCT, topic)
    await put_all(producer, topic, [("p/0", v2({"sku": "0", "price": 9.0, "currency": "CHF"}))])
    async with asyncio.timeout(30):
        await engine.wait_for(lambda: len(plugin.changes) == 1)
    assert plugin.changes[0].prev_value == {"sku": "0", "price": 0.0, "currency": "EUR"}
    assert plugin.stale_prev == [] and engine.status()["p"].state.value == "ready"
