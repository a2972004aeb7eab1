"""Publishing: plugins write values and change events to Kafka without knowing the topic.

Every publisher shares one producer configured not to lose or duplicate data:
``acks=all`` and idempotence (which bounds the requests in flight per
connection). Values are encoded before anything is sent, so a value that does
not match the schema raises ``EncodeError`` and nothing reaches Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from datasync.codecs import Codec
from datasync.metrics import Metrics
from datasync.settings import KafkaSettings

log = logging.getLogger("datasync.publish")

MAX_IN_FLIGHT = 5000  # background (put_nowait) sends pending per plugin at most; one more raises

# The plugin whose call runs (set by the engine around every plugin call; tasks a plugin starts
# inherit it): its put_nowait sends count against its own MAX_IN_FLIGHT.
_plugin: ContextVar[str | None] = ContextVar("datasync_plugin", default=None)


@contextmanager
def calling(plugin: str) -> Iterator[None]:
    """Within this block (and in the tasks started in it), put_nowait sends are ``plugin``'s."""
    token = _plugin.set(plugin)
    try:
        yield
    finally:
        _plugin.reset(token)


def _owner() -> object:
    """Whose sends these are: the plugin's whose call (or task) this is, else the current task's."""
    plugin = _plugin.get()
    return plugin if plugin is not None else asyncio.current_task()


def _who(name: str) -> str:
    plugin = _plugin.get()
    return f"publisher {name}" if plugin is None else f"plugin {plugin}: publisher {name}"


class PublishError(Exception):
    """A record was not published: the broker did not acknowledge it (``__cause__`` is the Kafka
    error, or None when no acknowledgement came within ``request_timeout_ms``: the record may still
    land later), or put_nowait refused it because MAX_IN_FLIGHT sends were pending."""


@dataclass(frozen=True)
class Delivery:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int


OnDone = Callable[[Delivery | None, BaseException | None], None]


class Publishing:
    """Owns the shared producer and the fire-and-forget sends still in flight."""

    def __init__(self, kafka: KafkaSettings, metrics: Metrics, shutdown_timeout_s: float) -> None:
        self._kafka = kafka
        self._metrics = metrics
        self._shutdown_timeout_s = shutdown_timeout_s  # how long stop() waits for acknowledgements
        self._producer: AIOKafkaProducer | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Background sends pending per owner (a plugin's name, or a task outside plugin calls), and
        # who waits until an owner has at most so many: (at most, waiter).
        self._pending: dict[object, int] = {}
        self._waiters: dict[object, list[tuple[int, asyncio.Future[None]]]] = {}

    async def start(self) -> None:
        producer = AIOKafkaProducer(**self._kafka.client_options(), acks="all", enable_idempotence=True, linger_ms=2)
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        """Wait for fire-and-forget sends, then flush and close the producer: within shutdown_timeout_s
        in all. Past it the sends still waiting are cancelled (their callbacks get a PublishError) and
        the producer is closed without flushing; what was not acknowledged is counted as publish
        failures, and said in one line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_timeout_s
        cancelled = 0
        if self._in_flight:
            _, waiting = await asyncio.wait(set(self._in_flight), timeout=self._shutdown_timeout_s)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            cancelled = len(waiting)
        producer, self._producer = self._producer, None
        flushed = producer is None or await close_producer(producer, deadline - loop.time())
        if cancelled or not flushed:
            log.warning(
                "publishing: not acknowledged within %.1fs of stopping: %d background sends cancelled%s"
                " (counted in datasync_publish_failures_total)",
                *(self._shutdown_timeout_s, cancelled, "" if flushed else ", producer closed without flushing"),
            )

    def publisher(self, name: str, topic: str, codec: Codec) -> Publisher:
        return Publisher(self, name, topic, codec)

    async def send_many(self, name: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[Delivery]:
        """Send encoded records in order and wait until the broker acknowledged every one, for at most
        ``request_timeout_ms``: the idempotent producer retries for as long as the broker is away."""
        if self._producer is None:
            raise PublishError("publishing is not started")
        limit_s = self._kafka.request_timeout_ms / 1000
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(limit_s):
                for key, value in records:
                    futures.append(await self._producer.send(topic, value, key=key))
                results = [await f for f in futures]
        except BaseException as exc:  # nothing of it counts as sent
            for f in futures:  # no "Future exception was never retrieved" for the ones not awaited
                if f.done() and not f.cancelled():
                    f.exception()
                f.cancel()
            self._metrics.publish_failures.labels(name).inc(len(records))
            if isinstance(exc, KafkaError):
                raise PublishError(f"publisher {name}: {topic}: {exc}") from exc
            if isinstance(exc, TimeoutError):
                raise PublishError(f"publisher {name}: {topic}: not acknowledged within {limit_s:g}s") from None
            raise  # cancelled: stop() gave up on a background send
        self._metrics.published.labels(name).inc(len(records))
        return [Delivery(r.topic, r.partition, r.offset) for r in results]

    def spawn(self, name: str, topic: str, record: tuple[bytes, bytes | None], on_done: OnDone | None) -> None:
        """Send one record in the background; the task is owned here and awaited by stop(). Raises
        PublishError (and sends nothing) while the caller has MAX_IN_FLIGHT sends pending."""
        owner = _owner()
        pending = self._pending.get(owner, 0)
        if pending >= MAX_IN_FLIGHT:
            raise PublishError(
                f"{_who(name)}: {MAX_IN_FLIGHT} put_nowait sends wait for the broker already;"
                " await the publisher's room() first, or use put_many"
            )

        async def run() -> None:
            try:
                [delivery] = await self.send_many(name, topic, [record])
            except asyncio.CancelledError:
                gave_up = PublishError(f"publisher {name}: {topic}: not acknowledged before publishing stopped")
                self._call_back(name, on_done, None, gave_up)
                raise
            except Exception as exc:
                log.warning("%s: background publish failed: %r", _who(name), exc)
                self._call_back(name, on_done, None, exc)
                return
            self._call_back(name, on_done, delivery, None)

        task = asyncio.create_task(run())
        self._in_flight.add(task)
        task.add_done_callback(lambda t: self._sent(t, owner))
        self._pending[owner] = pending + 1

    def _sent(self, task: asyncio.Task[None], owner: object) -> None:
        self._in_flight.discard(task)
        pending = self._pending.pop(owner) - 1
        if pending:
            self._pending[owner] = pending
        waiters = self._waiters.pop(owner, [])
        for most, waiter in waiters:
            if pending <= most and not waiter.done():
                waiter.set_result(None)
        if still := [(most, waiter) for most, waiter in waiters if not waiter.done()]:
            self._waiters[owner] = still

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
            log.error("%s: on_done callback raised %r", _who(name), error)

    async def room(self, owner: object = None, most: int = MAX_IN_FLIGHT - 1) -> None:
        """Wait until ``owner`` (default: the caller, as put_nowait counts it) has at most ``most``
        background sends pending. After each plugin call the engine waits here until that plugin has
        none, so every call may start MAX_IN_FLIGHT, and a plugin publishing fire-and-forget faster
        than the producer sends slows its own delivery (and, once its queue is full, fetching)."""
        owner = _owner() if owner is None else owner
        if self._pending.get(owner, 0) <= most:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(owner, []).append((most, waiter))
        try:
            await waiter
        finally:
            waiter.cancel()  # cancelled while waiting: _sent drops it


async def close_producer(producer: AIOKafkaProducer, timeout_s: float) -> bool:
    """``producer.stop()``, which flushes first, within ``timeout_s``: True if it did. aiokafka's
    idempotent producer retries for as long as the broker is away, so that flush may never end. Past
    ``timeout_s`` the producer's sender task is cancelled, which stop() takes as "no way to flush":
    it closes once the request in flight ended (within ``request_timeout_ms``). Then the records it
    still holds are failed, so whoever waits for one gets a KafkaError. (aiokafka 0.12-0.14 internals;
    tests/test_faults.py stops producers this way while the broker is away.)"""
    stopping = asyncio.create_task(producer.stop())
    done, _ = await asyncio.wait([stopping], timeout=max(0.0, timeout_s))
    if not done and (sender := producer._sender.sender_task) is not None:
        sender.cancel()
    await stopping
    if not done:
        _fail_held(producer._message_accumulator, KafkaError("the producer was closed before the broker acknowledged"))
        await asyncio.sleep(0)  # the records' done callbacks run before the caller reports
    return bool(done)


def _fail_held(accumulator: Any, error: KafkaError) -> None:
    """Fail every record batch a stopped producer still holds. Only once its sender is down: a sender
    that finds a failed batch in flight queues it again and dies on it."""
    queued = [batch for batches in accumulator._batches.values() for batch in batches]
    # A batch sent before and queued again still has the callback that removes it from
    # _pending_batches once it is done, but is no longer in there: fail_all alone makes that raise.
    accumulator._pending_batches.update(batch for batch in queued if batch.retry_count > 0)
    held = {*queued, *accumulator._pending_batches}
    accumulator.fail_all(error)
    for batch in held:  # failed too; awaited only while a batch is full: no "exception never retrieved"
        batch._drain_waiter.exception()


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
        """Encode now (raising EncodeError at once), send in the background, call ``on_done`` when
        acknowledged. Raises PublishError, sending nothing, while MAX_IN_FLIGHT of the plugin's sends
        wait for the broker: a call that sends more awaits ``room()`` first."""
        record = (key.encode(), None if value is None else self.codec.encode(value))
        self._publishing.spawn(self.name, self.topic, record, on_done)

    async def room(self) -> None:
        """Wait until put_nowait may send one more (the plugin has fewer than MAX_IN_FLIGHT pending)."""
        await self._publishing.room()
