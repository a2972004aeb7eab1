"""Shared fixtures: one real Kafka broker per test session, unique topics, helpers."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from datasync import DataSync
from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.codecs import StringCodec
from datasync.settings import KafkaSettings, SyncSettings

from localkafka import LocalBroker
from localregistry import LocalRegistry

ROOT = Path(__file__).resolve().parent.parent
# A ``datasync`` child process runs this checkout's package (service/ first), not the one the venv installed.
CHILD_PYTHONPATH = os.pathsep.join([str(ROOT / "service"), str(ROOT / "tests")])


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """A broker for the whole session; DATASYNC_TEST_BOOTSTRAP reuses a running one."""
    existing = os.environ.get("DATASYNC_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    broker = LocalBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def registry_url() -> Iterator[str]:
    """A real schema registry (Apicurio, Confluent-compatible API) for the session, started on first use."""
    registry = LocalRegistry().start()
    try:
        yield registry.url
    finally:
        registry.stop()


@pytest.fixture
def own_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own, which the test may stop and start."""
    broker = LocalBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def unhandled() -> list[dict[str, Any]]:
    """What reaches the loop's exception handler ("Task exception was never retrieved", ...)."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def put_all(producer: AIOKafkaProducer, topic: str, records: list[tuple[Any, ...]]) -> list[int]:
    """Produce ``(key, value[, partition])`` records in order; return their offsets."""
    wanted = {rec[2] for rec in records if len(rec) > 2}
    for _ in range(50):  # a just-created topic's partitions reach the producer's metadata shortly
        if wanted <= await producer.partitions_for(topic):
            break
        await producer.client.force_metadata_update()
        await asyncio.sleep(0.1)
    futures = []
    for rec in records:
        key, value = rec[0], rec[1]
        partition = rec[2] if len(rec) > 2 else None
        raw_key = key.encode() if isinstance(key, str) else key
        raw_value = value.encode() if isinstance(value, str) else value
        futures.append(await producer.send(topic, value=raw_value, key=raw_key, partition=partition))
    offsets = []
    for fut in futures:
        offsets.append((await fut).offset)
    return offsets


async def eventually(check: Callable[[], Awaitable[bool]], interval: float = 0.2) -> None:
    """Poll an outside system (the broker) until ``check()`` holds; callers bound it with asyncio.timeout."""
    for _ in itertools.count():
        if await check():
            return
        await asyncio.sleep(interval)


FAST = SyncSettings(resync_backoff_s=0.3, change_backoff_s=0.01, fetch_max_records=500)


@pytest.fixture
async def make_engine(bootstrap: str) -> AsyncIterator[Callable[..., DataSync]]:
    engines: list[DataSync] = []

    def make(topic: str, partitions: int = 3, sync: SyncSettings = FAST, codec=None) -> DataSync:  # type: ignore[no-untyped-def]
        engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), sync)
        engine.add_topic(TopicSpec(name=topic, partitions=partitions, value="string"), codec or StringCodec())
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def create(engine: DataSync) -> None:
    """Create the engine's topics without starting it (so tests can produce first)."""
    await prepare_topics(engine.kafka, list(engine._topics.values()), create=True)
