"""Topics of the benchmark: the generated table topic (reused when intact) and the live writers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.producer.message_accumulator import BatchBuilder
from workload import ITEM, Record, TableLayout, item, item_codec, key_of

from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec
from datasync.settings import KafkaSettings

BATCH_BYTES = 512 * 1024  # below the broker's default max.message.bytes (1 MiB)


def topic_spec(name: str, partitions: int) -> TopicSpec:
    return TopicSpec(name=name, partitions=partitions, replication_factor=1, value=f"avro:{ITEM}")


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    await prepare_topics(KafkaSettings(bootstrap_servers=bootstrap), [topic_spec(name, partitions)], create=True)


async def delete_topic(bootstrap: str, name: str, wait_s: float = 30.0) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            return
        await admin.delete_topics([name])
        deadline = time.monotonic() + wait_s
        while name in await admin.list_topics():
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} still listed {wait_s}s after its deletion")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _partition_count(bootstrap: str, name: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            return 0
        (described,) = await admin.describe_topics([name])
        return len(described["partitions"])
    finally:
        await admin.close()


async def table_is_intact(bootstrap: str, layout: TableLayout, codec: AvroCodec) -> bool:
    """The topic exists with the layout's partitions and record count, written with today's schema."""
    if await _partition_count(bootstrap, layout.topic) != layout.partitions:
        return False
    partitions = [TopicPartition(layout.topic, p) for p in range(layout.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        starts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        if any(starts[tp] != 0 for tp in partitions) or sum(ends.values()) != layout.records:
            return False
        consumer.assign(partitions[:1])
        await consumer.seek_to_beginning(partitions[0])
        first = await consumer.getmany(partitions[0], timeout_ms=5000, max_records=1)
        records = first.get(partitions[0], [])
        return bool(records) and records[0].value == codec.encode(item(0, 0))
    finally:
        await consumer.stop()


async def ensure_table(bootstrap: str, layout: TableLayout) -> float | None:
    """Generate ``layout``'s topic unless an intact one exists; return the generation time, None if reused."""
    codec = item_codec()
    if await table_is_intact(bootstrap, layout, codec):
        return None
    started = time.perf_counter()
    await delete_topic(bootstrap, layout.topic)
    await create_topic(bootstrap, layout.topic, layout.partitions)
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        written = await produce_batched(producer, layout.topic, layout.generate(codec))
    finally:
        await producer.stop()
    if written != layout.records or not await table_is_intact(bootstrap, layout, codec):
        raise RuntimeError(f"generated {layout.topic} does not hold the expected {layout.records} records")
    return time.perf_counter() - started


def fast_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    """A producer for bulk writes: big batches, some linger, no compression, leader acks only."""
    settings: dict[str, Any] = {
        "acks": 1,
        "linger_ms": 20,
        "max_batch_size": BATCH_BYTES,
        "compression_type": None,
        "max_request_size": 4 * BATCH_BYTES,
    }
    settings.update(options)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="datasync-bench", **settings)


async def produce_batched(
    producer: AIOKafkaProducer, topic: str, records: Iterable[Record], until: float | None = None
) -> int:
    """Write ``records`` in full per-partition batches without awaiting each one; return how many.

    With ``until`` (a ``time.monotonic()`` deadline) stop at the first full batch after it.
    """
    open_batches: dict[int, BatchBuilder] = {}
    delivered: list[asyncio.Future[Any]] = []
    written = 0
    for partition, key, value in records:
        batch = open_batches.get(partition)
        if batch is None:
            batch = open_batches[partition] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start the next
            delivered.append(await producer.send_batch(batch, topic, partition=partition))
            del open_batches[partition]
            if until is not None and time.monotonic() >= until:
                break  # the record that did not fit is not written
            batch = open_batches[partition] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
        written += 1
    for partition, batch in open_batches.items():
        delivered.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*delivered)
    return written


def live_records(partitions: int, keys: int, codec: AvroCodec) -> Iterable[Record]:
    """Endless puts cycling over ``keys`` keys; each put of a key differs from the previous one."""
    pool = [codec.encode(item(r, r)) for r in range(16)]
    for seq in itertools.count():
        i = seq % keys
        yield i % partitions, key_of(i), pool[(seq // keys) % len(pool)]


async def produce_live(
    bootstrap: str, topic: str, partitions: int, keys: int, rate: int, seconds: float
) -> dict[str, Any]:
    """Write to ``topic`` for ``seconds``: at full speed (``rate`` 0) or at ``rate`` records/s."""
    codec = item_codec()
    producer = fast_producer(bootstrap, linger_ms=5) if rate == 0 else fast_producer(bootstrap, linger_ms=0)
    await producer.start()
    try:
        started = time.monotonic()
        if rate == 0:
            sent = await produce_batched(producer, topic, live_records(partitions, keys, codec), started + seconds)
        else:
            sent = await produce_paced(producer, topic, partitions, keys, rate, started + seconds, codec)
        took = time.monotonic() - started
    finally:
        await producer.stop()
    return {"sent": sent, "seconds": took, "rate": sent / took}


async def produce_paced(
    producer: AIOKafkaProducer, topic: str, partitions: int, keys: int, rate: int, until: float, codec: AvroCodec
) -> int:
    """Write ``rate`` records/s until ``until``, each stamped with its send time (``updated_us``)."""
    started = time.monotonic()
    delivered: list[asyncio.Future[Any]] = []
    sent = 0
    while (now := time.monotonic()) < until:
        due = int((now - started) * rate)
        while sent < due:
            i = sent % keys
            value = codec.encode(item(i, sent, updated_us=time.time_ns() // 1000))
            delivered.append(await producer.send(topic, key=key_of(i), value=value, partition=i % partitions))
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*delivered)
    return sent
