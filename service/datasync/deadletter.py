"""Dead-letter topics: a copy of every rejected record, with headers saying why and whence.

Dead-letter records are keyed by their origin (``topic/partition@offset``) and
the dead-letter topic is compacted, so the copies a later table rebuild makes
again collapse into one.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from datasync.ingest import Rejected
from datasync.metrics import Metrics
from datasync.settings import KafkaSettings

log = logging.getLogger("datasync.deadletter")


class DeadLetters:
    def __init__(self, kafka: KafkaSettings, targets: dict[str, str], metrics: Metrics) -> None:
        self._kafka = kafka
        self._targets = targets  # source topic -> dead-letter topic
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._targets:
            self._producer = AIOKafkaProducer(**self._kafka.client_options(), acks="all", enable_idempotence=True)
            await self._producer.start()

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is still buffered

    async def send(self, rejected: list[Rejected]) -> None:
        """Hand the records to the producer; delivery failures are logged and counted, never raised."""
        for item in rejected:
            target = self._targets.get(item.topic)
            if target is None or self._producer is None:
                continue
            record = item.record
            origin = f"{item.topic}/{record.partition}@{record.offset}"
            headers = [
                ("datasync.reason", item.reason.encode()),
                ("datasync.detail", item.detail.encode()),
                ("datasync.topic", item.topic.encode()),
                ("datasync.partition", str(record.partition).encode()),
                ("datasync.offset", str(record.offset).encode()),
                ("datasync.key", record.key or b""),
            ]
            try:
                future = await self._producer.send(target, record.value, key=origin.encode(), headers=headers)
            except KafkaError as exc:  # buffer full for too long, record too large...
                self._failed(item.topic, origin, exc)
                continue
            future.add_done_callback(lambda f, t=item.topic, o=origin: self._delivered(f, t, o))

    def _delivered(self, future: asyncio.Future[object], topic: str, origin: str) -> None:
        if future.cancelled():
            self._failed(topic, origin, "cancelled")
        elif future.exception() is not None:
            self._failed(topic, origin, future.exception())
        else:
            self._metrics.dead_letters.labels(topic).inc()

    def _failed(self, topic: str, origin: str, why: object) -> None:
        self._metrics.dead_letter_failures.labels(topic).inc()
        log.error("could not copy %s to the dead-letter topic: %r", origin, why)
