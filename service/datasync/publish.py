"""Publishing: plugins write values and change events to Kafka without knowing the topic.

Every publisher shares one producer configured not to lose or duplicate data:
``acks=all`` and idempotence (which bounds the requests in flight per
connection). Values are encoded before anything is sent, so a value that does
not match the schema raises ``EncodeError`` and nothing reaches Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from datasync.codecs import Codec
from datasync.metrics import Metrics
from datasync.settings import KafkaSettings

log = logging.getLogger("datasync.publish")

MAX_IN_FLIGHT = 5000  # background (put_nowait) sends pending per plugin at most before its calls wait


class PublishError(Exception):
    """The broker did not acknowledge a record: ``__cause__`` is the Kafka error, or None when no
    acknowledgement came within ``request_timeout_ms`` (the record may still land later)."""


@dataclass(frozen=True)
class Delivery:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int


OnDone = Callable[[Delivery | None, BaseException | None], None]


class Publishing:
    """Owns the shared producer and the fire-and-forget sends still in flight."""

    def __init__(self, kafka: KafkaSettings, metrics: Metrics) -> None:
        self._kafka = kafka
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Background sends pending per task that spawned them (a plugin's delivery task), and the
        # events its next call waits on while it has MAX_IN_FLIGHT of them.
        self._pending: dict[asyncio.Task[Any] | None, int] = {}
        self._full: dict[asyncio.Task[Any] | None, asyncio.Event] = {}

    async def start(self) -> None:
        producer = AIOKafkaProducer(**self._kafka.client_options(), acks="all", enable_idempotence=True, linger_ms=2)
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        """Wait for fire-and-forget sends, then flush and close the producer."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def publisher(self, name: str, topic: str, codec: Codec) -> Publisher:
        return Publisher(self, name, topic, codec)

    async def send_many(self, name: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[Delivery]:
        """Send encoded records in order and wait until the broker acknowledged every one, for at most
        ``request_timeout_ms``: the idempotent producer retries for as long as the broker is away."""
        if self._producer is None:
            raise PublishError("publishing is not started")
        limit_s = self._kafka.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(limit_s):
                futures = [await self._producer.send(topic, value, key=key) for key, value in records]
                results = [await f for f in futures]
        except KafkaError as exc:
            self._metrics.publish_failures.labels(name).inc(len(records))
            raise PublishError(f"publisher {name}: {topic}: {exc}") from exc
        except TimeoutError:
            self._metrics.publish_failures.labels(name).inc(len(records))
            raise PublishError(f"publisher {name}: {topic}: not acknowledged within {limit_s:g}s") from None
        self._metrics.published.labels(name).inc(len(records))
        return [Delivery(r.topic, r.partition, r.offset) for r in results]

    def spawn(self, name: str, topic: str, record: tuple[bytes, bytes | None], on_done: OnDone | None) -> None:
        """Send one record in the background; the task is owned here and awaited by stop()."""

        async def run() -> None:
            try:
                [delivery] = await self.send_many(name, topic, [record])
            except Exception as exc:
                log.warning("publisher %s: background publish failed: %r", name, exc)
                self._call_back(name, on_done, None, exc)
                return
            self._call_back(name, on_done, delivery, None)

        task = asyncio.create_task(run())
        self._in_flight.add(task)
        owner = asyncio.current_task()
        task.add_done_callback(lambda t: self._sent(t, owner))
        pending = self._pending[owner] = self._pending.get(owner, 0) + 1
        if pending >= MAX_IN_FLIGHT:
            self._full.setdefault(owner, asyncio.Event())

    def _sent(self, task: asyncio.Task[None], owner: asyncio.Task[Any] | None) -> None:
        self._in_flight.discard(task)
        pending = self._pending.pop(owner) - 1
        if pending:
            self._pending[owner] = pending
        if pending < MAX_IN_FLIGHT and owner in self._full:
            self._full.pop(owner).set()

    def _call_back(
        self, name: str, on_done: OnDone | None, delivery: Delivery | None, exc: BaseException | None
    ) -> None:
        """Call a put_nowait callback: one that raises is logged and counted (nobody awaits the send task)."""
        if on_done is None:
            return
        try:
            on_done(delivery, exc)
        except Exception as error:
            self._metrics.publish_callback_failures.labels(name).inc()
            log.error("publisher %s: on_done callback raised %r", name, error)

    async def room(self) -> None:
        """Wait while the current task has MAX_IN_FLIGHT background sends pending: after each call a
        plugin's delivery task waits here, so a plugin publishing fire-and-forget faster than the
        producer sends slows its own delivery (and, once its queue is full, fetching) instead of
        piling up sends that would time out in the producer."""
        full = self._full.get(asyncio.current_task())
        if full is not None:
            await full.wait()


class Publisher:
    """Handed to plugins as ``ctx.publisher(name)``; encodes with the topic's codec."""

    def __init__(self, publishing: Publishing, name: str, topic: str, codec: Codec) -> None:
        self.name = name
        self.topic = topic
        self.codec = codec
        self._publishing = publishing

    async def put(self, key: str, value: Any) -> Delivery:
        """Encode ``value`` and return once the broker has acknowledged it."""
        return (await self.put_many([(key, value)]))[0]

    async def delete(self, key: str) -> Delivery:
        """Write a tombstone for ``key``."""
        return (await self.put_many([(key, None)]))[0]

    async def put_many(self, items: Iterable[tuple[str, Any]]) -> list[Delivery]:
        """Encode every value first (None deletes), then send them all and wait for the acknowledgements."""
        records = [(key.encode(), None if value is None else self.codec.encode(value)) for key, value in items]
        return await self._publishing.send_many(self.name, self.topic, records)

    def put_nowait(self, key: str, value: Any, on_done: OnDone | None = None) -> None:
        """Encode now (raising EncodeError at once), send in the background, call ``on_done`` when acknowledged."""
        record = (key.encode(), None if value is None else self.codec.encode(value))
        self._publishing.spawn(self.name, self.topic, record, on_done)
