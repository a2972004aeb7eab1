"""Reads table topics: every partition assigned (no consumer group), from the beginning.

A full read ends when the *position* of every partition has reached the end
offset captured when the read started. Comparing positions rather than the
offset of the last record seen is what makes this finish on compacted topics
(offset gaps) and with transaction markers, and at once on empty partitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from datasync.settings import KafkaSettings

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
Select = Callable[[str, int], bool]  # (topic, partition) -> read it

# Records per fetch while tables are rebuilt: no plugin waits on those batches, and fewer,
# larger ones mean fewer rounds of position checks (memory stays bounded by the fetch sizes).
REBUILD_MAX_RECORDS = 100_000


class TableReader:
    def __init__(self, kafka: KafkaSettings, max_records: int) -> None:
        self._kafka = kafka
        self._max_records = max_records
        self._consumer: AIOKafkaConsumer | None = None
        self.partitions: list[TopicPartition] = []
        self.counts: dict[str, int] = {}  # every topic's partition count on the broker (not only those read)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("reader not started")
        return self._consumer

    async def start(self, partitions: dict[str, int]) -> None:
        """Connect and assign every partition of ``{topic: partition count}``."""
        consumer = AIOKafkaConsumer(
            **self._kafka.client_options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",  # an out-of-range position must trigger a resync, not a silent skip
            isolation_level="read_committed",  # records of aborted transactions never reach a table
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # The broker answers one request per connection at a time: a fetch waiting for new
            # records holds back every request sent after it (the offset lookups of a seek, end
            # offsets) for up to this long. 500 ms (the default) delayed reading the partitions
            # gained in a rebalance by ~0.2 s; empty fetches every 100 ms cost nothing measurable.
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        self._consumer = consumer
        self.assign(partitions)

    def assign(self, partitions: dict[str, int], select: Select | None = None) -> None:
        self.counts = dict(partitions)
        self.partitions = [
            TopicPartition(topic, p)
            for topic, n in partitions.items()
            for p in range(n)
            if select is None or select(topic, p)
        ]
        self.consumer.assign(self.partitions)

    async def reassign(self, partitions: dict[str, int], select: Select, rewind: Select) -> list[TopicPartition]:
        """Assign another subset: partitions kept go on from their positions; the new ones and those
        ``rewind`` accepts start at their beginning and are returned."""
        consumer = self.consumer
        kept = {tp: await consumer.position(tp) for tp in self.partitions
                if select(tp.topic, tp.partition) and not rewind(tp.topic, tp.partition)}  # fmt: skip
        self.assign(partitions, select)
        for tp, position in kept.items():
            consumer.seek(tp, position)
        fresh = [tp for tp in self.partitions if tp not in kept]
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        return fresh

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await stop_consumer(consumer)

    async def rewind(self) -> dict[TopicPartition, int]:
        """Seek every partition to its beginning; return the end offsets to read up to."""
        if not self.partitions:  # nothing to read: publish-only, or a fleet member that owns none
            return {}
        consumer = self.consumer
        await consumer.seek_to_beginning(*self.partitions)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(self.partitions)
        return ends

    async def behind(self, ends: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records left to read per partition that has not yet reached ``ends``."""
        left = {}
        for tp, end in ends.items():
            position = await self.consumer.position(tp)
            if position < end:
                left[tp] = end - position
        return left

    async def positions(self) -> dict[TopicPartition, int]:
        return {tp: await self.consumer.position(tp) for tp in self.partitions}

    async def lag(self) -> dict[TopicPartition, int]:
        """High watermark (as the last fetch reported it) minus position, per partition."""
        consumer, out = self.consumer, {}
        for tp in self.partitions:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                out[tp] = max(0, highwater - await consumer.position(tp))
        return out

    async def fetch(self, timeout_ms: int, max_records: int | None = None) -> Batch:
        """At most ``max_records`` (default: the CHANGE batch size) records, by partition."""
        batch: Batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records or self._max_records)
        # getmany returns buffered records without suspending: yield once per batch, or a long read
        # starves the other tasks (the group's heartbeats, whose session then expires; HTTP).
        await asyncio.sleep(0)
        return batch


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, finishing the job when aiokafka (0.14) re-raises the CancelledError of a
    fetch task that was waiting to retry against a broker going away: without this the client's
    connections stay open and the service exits with a traceback instead of 0."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        await consumer._client.close()  # what stop() did not reach
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
