"""SASL/SCRAM and TLS to the broker, end to end; credentials stay out of logs and status."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from test_operating import get

from datasync import DataSync
from datasync.bindings import TopicSpec
from datasync.codecs import StringCodec
from datasync.settings import HttpSettings, KafkaSettings, SyncSettings
from datasync.web import HttpServer

from conftest import put_all
from localkafka import LocalBroker
from recorder import Recorder

PASSWORD = "alice-s3cret-Xyz"


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[LocalBroker]:
    broker = LocalBroker(scram_users={"alice": PASSWORD}, tls=True).start()
    try:
        yield broker
    finally:
        broker.stop()


async def round_trip(broker: LocalBroker, kafka: KafkaSettings, topic: str) -> DataSync:
    engine = DataSync(kafka, SyncSettings(broker_probe_s=0.5))
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec())
    plugin = Recorder("p")
    engine.watch("p", plugin, {topic: [""]})
    await engine.start()
    async with asyncio.timeout(20):
        await engine.wait_ready()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await put_all(producer, topic, [("k", "v")])
    finally:
        await producer.stop()
    async with asyncio.timeout(10):
        await engine.wait_for(lambda: plugin.view == {"k": "v"})
    return engine


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram(secure_broker: LocalBroker, topic: str, mechanism: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kafka = KafkaSettings(
        bootstrap_servers=secure_broker.sasl_bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username="alice",
        sasl_password=PASSWORD,  # type: ignore[arg-type]
    )
    engine = await round_trip(secure_broker, kafka, topic)
    http = HttpServer(engine, HttpSettings(port=0))
    await http.start()
    try:
        _, status = await get(f"http://127.0.0.1:{http.port}/v1/status")
        _, metrics = await get(f"http://127.0.0.1:{http.port}/metrics")
    finally:
        await http.stop()
        await engine.stop()
    assert PASSWORD not in json.dumps(status) and PASSWORD not in metrics
    assert PASSWORD not in caplog.text and PASSWORD not in repr(kafka)


async def test_wrong_password_is_refused(secure_broker: LocalBroker, topic: str) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=secure_broker.sasl_bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        sasl_password="wrong",  # type: ignore[arg-type]
    )
    engine = DataSync(kafka)
    engine.add_topic(TopicSpec(name=topic, partitions=1, value="string"), StringCodec())
    with pytest.raises(KafkaError):
        await engine.start()
    await engine.stop()


async def test_tls(secure_broker: LocalBroker, topic: str) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=secure_broker.ssl_bootstrap, security_protocol="SSL", ssl_cafile=secure_broker.ca_file
    )
    engine = await round_trip(secure_broker, kafka, topic)
    await engine.stop()
