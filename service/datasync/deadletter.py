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
from datasync.publish import close_producer
from datasync.settings import KafkaSettings

log = logging.getLogger("datasync.deadletter")


class DeadLetters:
    def __init__(
        self, kafka: KafkaSettings, targets: dict[str, str], metrics: Metrics, shutdown_timeout_s: float
    ) -> None:
        self._kafka = kafka
        self._targets = targets  # source topic -> dead-letter topic
        self._metrics = metrics
        self._shutdown_timeout_s = shutdown_timeout_s  # how long stop() waits for acknowledgements
        self._producer: AIOKafkaProducer | None = None
        self._stopping = False
        self._dropped = 0  # copies that failed while stopping: said in one line

    async def start(self) -> None:
        if self._targets:
            self._producer = AIOKafkaProducer(**self._kafka.client_options(), acks="all", enable_idempotence=True)
            await self._producer.start()

    async def stop(self) -> None:
        """Flush what is still buffered, within shutdown_timeout_s; past it close without flushing. The
        copies not written are counted (datasync_dead_letter_failures_total) and said in one line."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self._stopping, self._dropped = True, 0
        flushed = await close_producer(producer, self._shutdown_timeout_s)
        self._stopping = False
        if self._dropped or not flushed:
            log.error(
                "%d records not copied to their dead-letter topic: not acknowledged within %.1fs of stopping",
                *(self._dropped, self._shutdown_timeout_s),
            )

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
        if self._stopping:
            self._dropped += 1
        else:
            log.error("could not copy %s to the dead-letter topic: %r", origin, why)
