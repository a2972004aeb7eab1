"""A test kit for plugins: RESYNC and CHANGE events from plain Python values, no Kafka needed.

``Harness`` runs plugins the way the engine does, with the engine's own parts:
values are encoded with the topic's codec and folded into state tables
(revisions, previous values, identical puts and unknown deletes dropped),
plugins are called through the engine's call rules (time limits, retries,
feedback in ``status``, apply status), resynced in declared order, and given
changes only once resynced, through the engine's per-plugin delivery
(``after`` ordering). What plugins publish is kept in memory.

Differences from a running engine: there is one partition per topic, every
write waits until the plugins handled it, time is not simulated (a failed
resync is retried at the next step instead of after its backoff), and
published records are not read back into tables.

    async with Harness() as h:
        h.topic("demo.interfaces", "avro:demo.Interface")   # or any codec; default: plain Python values
        plugin = Interfaces()
        h.plugin("interfaces", plugin, {"demo.interfaces": ["config/"]})
        await h.start({"demo.interfaces": {"config/eth0": {"name": "eth0"}}})   # start + RESYNC
        await h.put("demo.interfaces", "config/eth1", {"name": "eth1"})          # one CHANGE event
        assert h.status("interfaces").state is PluginState.READY
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka import ConsumerRecord

from datasync.api import Change, ChangeEvent, Plugin, PluginContext, ResyncEvent, resync_values
from datasync.applystatus import ApplyStatus
from datasync.bindings import TopicSpec
from datasync.calls import PluginCalls
from datasync.codecs import Codec, codec_for
from datasync.delivery import Deliveries
from datasync.ingest import Ingest
from datasync.metrics import Metrics
from datasync.publish import Delivery, Publisher, Publishing
from datasync.registration import Registration
from datasync.schemas import SchemaStore
from datasync.settings import KafkaSettings, SyncSettings
from datasync.status import PluginState, PluginStatus
from datasync.table import StateTable
from datasync.views import TableView

# A write: (topic, key, value); a value of None deletes the key.
Write = tuple[str, str, Any]

# Fast retries: the kit does not wait out backoffs anyway.
TEST_SYNC = SyncSettings(resync_backoff_s=0.001, change_backoff_s=0)


class PythonCodec:
    """Plain Python values (pickled), for topics whose real codec a test does not care about.

    Every read decodes a fresh copy, as a real codec does, so a plugin that
    mutates a value it got cannot change the table.
    """

    spec = "python"

    def decode(self, raw: bytes) -> Any:
        return pickle.loads(raw)

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value)


class Tables:
    """State tables filled from plain values with the engine's folding rules; one partition per topic."""

    def __init__(self, metrics: Metrics | None = None, emit_identical_puts: bool = False) -> None:
        self.codecs: dict[str, Codec] = {}
        self.tables: dict[str, StateTable] = {}
        self._specs: dict[str, TopicSpec] = {}
        self._offsets: dict[str, int] = {}
        self._metrics = metrics or Metrics()
        self._emit_identical = emit_identical_puts
        self._ingest = Ingest({}, {}, self._metrics, emit_identical_puts)

    def declare(self, topic: str, codec: Codec) -> None:
        self.codecs[topic] = codec
        self.tables[topic] = StateTable(topic)
        self._specs[topic] = TopicSpec(name=topic, value=codec.spec)
        self._offsets.setdefault(topic, 0)
        self._ingest = Ingest(self._specs, self.codecs, self._metrics, self._emit_identical)

    def write(self, writes: Iterable[Write]) -> list[Change]:
        """Encode and fold the writes in order; return the changes they make (as a CHANGE batch holds them)."""
        changes = []
        for topic, key, value in writes:
            if topic not in self.codecs:
                self.declare(topic, PythonCodec())
            raw = None if value is None else self.codecs[topic].encode(value)
            offset = self._offsets[topic]
            self._offsets[topic] = offset + 1
            size = -1 if raw is None else len(raw)
            record = ConsumerRecord(topic, 0, offset, int(time.time() * 1000), 0, key.encode(), raw, None,
                                    len(key.encode()), size, [])  # fmt: skip
            change = self._ingest.fold(self.tables[topic], record)
            rejected = self._ingest.take_rejected()
            if rejected:
                raise ValueError(f"{topic} {key!r}: {rejected[0].reason}: {rejected[0].detail}")
            if change is not None:
                changes.append(change)
        return changes

    def replace(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Make ``state`` (``{topic: {key: value}}``) the whole content of those topics' tables."""
        for topic, values in state.items():
            if topic in self.tables:
                self.tables[topic] = StateTable(topic)
            self.write((topic, key, value) for key, value in values.items())

    def positions(self, topics: Iterable[str]) -> dict[tuple[str, int], int]:
        return {(topic, 0): self._offsets[topic] for topic in topics}


def resync_event(
    state: Mapping[str, Mapping[str, Any]],
    watch: Mapping[str, Sequence[str]] | None = None,
    codecs: Mapping[str, Codec] | None = None,
) -> ResyncEvent:
    """A RESYNC event of ``{topic: {key: value}}`` for a plugin watching ``watch`` (default: everything)."""
    tables = _tables(codecs)
    tables.replace(state)
    watches = watch or {topic: [""] for topic in state}
    for topic in watches:
        if topic not in tables.tables:
            tables.declare(topic, PythonCodec())
    return ResyncEvent(resync_values(watches, tables.tables, tables.codecs), tables.positions(watches))


def change_event(
    writes: Iterable[Write],
    before: Mapping[str, Mapping[str, Any]] | None = None,
    codecs: Mapping[str, Codec] | None = None,
) -> ChangeEvent:
    """A CHANGE event of ``[(topic, key, value or None), ...]`` applied to the state ``before``."""
    tables = _tables(codecs)
    tables.replace(before or {})
    return ChangeEvent(tables.write(writes))


def _tables(codecs: Mapping[str, Codec] | None) -> Tables:
    tables = Tables()
    for topic, codec in (codecs or {}).items():
        tables.declare(topic, codec)
    return tables


class MemoryPublishing(Publishing):
    """Publishing that keeps every acknowledged record in ``records`` instead of sending it."""

    def __init__(self, metrics: Metrics, shutdown_timeout_s: float) -> None:
        super().__init__(KafkaSettings(), metrics, shutdown_timeout_s)
        self.records: dict[str, list[tuple[bytes, bytes | None]]] = {}

    async def start(self) -> None:
        pass

    async def settle(self) -> None:
        """Wait until the fire-and-forget sends (``put_nowait``) are done."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def send_many(self, name: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[Delivery]:
        log = self.records.setdefault(topic, [])
        first = len(log)
        log.extend(records)
        self._metrics.published.labels(name).inc(len(records))
        return [Delivery(topic, 0, first + i) for i in range(len(records))]


class Harness:
    """Plugins under test, driven with the engine's rules and no broker."""

    def __init__(self, sync: SyncSettings | None = None, schemas: SchemaStore | Path | str | None = None) -> None:
        self.sync = sync or TEST_SYNC
        self.metrics = Metrics()
        if schemas is None or isinstance(schemas, SchemaStore):
            self.schemas = schemas or SchemaStore()
        else:
            self.schemas = SchemaStore.load(Path(schemas))
        self.state = Tables(self.metrics, self.sync.emit_identical_puts)
        self._publishing = MemoryPublishing(self.metrics, self.sync.shutdown_timeout_s)
        self._calls = PluginCalls(self.sync, self.metrics, self._publishing.room)
        self._deliveries = Deliveries(
            self._calls, self.sync.plugin_queue_max_records, self.sync.fetch_max_records, self._delivered, self._skipped
        )
        self._delivery = asyncio.Condition()  # notified after every delivered (or skipped) batch
        self._seq = 0
        self._publishers: dict[str, Publisher] = {}
        self._registrations: list[Registration] = []

    # -- declarations ---------------------------------------------------------

    def topic(self, name: str, value: str | Codec = "python") -> None:
        """Declare a topic with a codec (a bindings ``value:`` such as ``avro:demo.Interface``, or an object)."""
        if isinstance(value, str):
            value = PythonCodec() if value == "python" else codec_for(value, self.schemas)
        self.state.declare(name, value)

    def publisher(self, name: str, topic: str) -> None:
        """A publisher plugins get as ``ctx.publisher(name)``; what it publishes is in ``published(name)``."""
        if topic not in self.state.codecs:
            self.topic(topic)
        self._publishers[name] = self._publishing.publisher(name, topic, self.state.codecs[topic])

    def plugin(
        self,
        name: str,
        plugin: Plugin,
        watch: Mapping[str, Sequence[str]],
        settings: Mapping[str, Any] | None = None,
        status: str | None = None,
        after: Sequence[str] = (),
    ) -> Registration:
        """Register a plugin (resync order = registration order), as ``DataSync.watch`` does.

        ``status`` names an apply-status publisher; ``after`` the plugins (registered earlier) whose
        earlier changes must be handled before this one gets a batch.
        """
        for topic in watch:
            if topic not in self.state.codecs:
                self.topic(topic)
        if status is not None and status not in self._publishers:
            raise ValueError(f"plugin {name!r}: unknown status publisher {status!r} (declare it first)")
        apply_status = ApplyStatus(self._publishers[status], name) if status is not None else None
        earlier = {r.name: r for r in self._registrations}
        unknown = [a for a in after if a not in earlier]
        if unknown:
            raise ValueError(f"plugin {name!r}: 'after' names {unknown[0]!r}, which is not registered before it")
        reg = Registration(name, plugin, watch, settings or {}, "full", apply_status, self._close)
        self._registrations.append(reg)
        self._deliveries.add(reg, [earlier[a] for a in after])
        return reg

    # -- driving --------------------------------------------------------------

    async def start(self, state: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Fill the tables with ``{topic: {key: value}}``, then start and resync every plugin in order."""
        self.state.replace(state or {})
        await self.step()

    async def put(self, topic: str, key: str, value: Any) -> None:
        await self.write([(topic, key, value)])

    async def delete(self, topic: str, key: str) -> None:
        await self.write([(topic, key, None)])

    async def write(self, writes: Iterable[Write]) -> None:
        """One fetched batch: fold the writes, queue the changes for the resynced plugins, wait until each
        handled them (or skipped them after its retries), then step."""
        changes = self.state.write(writes)
        ready = [r for r in self._registrations if r.status.state is PluginState.READY]
        outbox = {r: [c for c in changes if c.key.startswith(r.watches.get(c.topic, ()))] for r in ready}
        self._seq += 1
        await self._deliveries.put(self._seq, outbox)
        async with self._delivery:
            await self._delivery.wait_for(self._delivered_all)
        await self.step()

    def _delivered_all(self) -> bool:
        ready = PluginState.READY
        return all(self._deliveries.queued(r) == 0 or r.status.state is not ready for r in self._registrations)

    async def _delivered(self) -> None:
        """After each delivered batch, as the engine does: tell waiters."""
        async with self._delivery:
            self._delivery.notify_all()

    def _skipped(self, reg: Registration) -> None:
        """As the engine does: a skipped batch means a diverged view, or a resync for plugins that ask for it."""
        reg.diverged = True
        if getattr(reg.plugin, "resync_after_failed_change", False) and reg.status.state is PluginState.READY:
            reg.status.state = PluginState.RESYNCING

    async def resync(self, state: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """A full resync, as after a fault: ``state`` replaces those topics' content; every plugin resyncs."""
        self.state.replace(state or {})
        for reg in self._registrations:
            reg.status.state = PluginState.RESYNCING
            reg.status.resync_attempts = 0
        await self.step()

    async def step(self) -> None:
        """One engine step without records: plugins waiting for a resync (or its retry) get it, in order.

        Fire-and-forget publishes are waited for, so that ``published()`` is complete after every step.
        """
        for reg in list(self._registrations):
            if reg.status.state is PluginState.READY:
                continue
            if await self._deliveries.pause(reg):  # queued changes the resync replaces
                reg.diverged = True
            if not reg.started:
                if not await self._calls.start(reg, self._context(reg)):
                    continue
                reg.started = True
            values = resync_values(reg.watches, self.state.tables, self.state.codecs)
            await self._calls.resync(reg, ResyncEvent(values, self.state.positions(reg.watches)))
        await self._publishing.settle()

    async def stop(self) -> None:
        """Stop the plugins (in reverse order) and wait for fire-and-forget publishes."""
        self._deliveries.halt()
        await self._deliveries.wait_idle()
        await self._deliveries.stop()
        for reg in reversed(self._registrations):
            if reg.started:
                reg.started = False
                await self._calls.hook(reg, "stop")
        await self._publishing.stop()

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- assertions -----------------------------------------------------------

    def published(self, name: str) -> list[tuple[str, Any]]:
        """What publisher ``name`` published so far, decoded: ``[(key, value or None for a tombstone)]``."""
        publisher = self._publishers[name]
        records = self._publishing.records.get(publisher.topic, [])
        return [(key.decode(), None if raw is None else publisher.codec.decode(raw)) for key, raw in records]

    def status(self, name: str) -> PluginStatus:
        return self._registration(name).status

    def plugin_named(self, name: str) -> Plugin:
        return self._registration(name).plugin

    def _registration(self, name: str) -> Registration:
        for reg in self._registrations:
            if reg.name == name:
                return reg
        raise KeyError(f"no plugin {name!r}")

    def table(self, topic: str) -> TableView:
        """The current values of a topic, as plugins see them through ``ctx.table``."""
        return self._views()[topic]

    def _views(self) -> dict[str, TableView]:
        return {name: TableView(name, lambda: self.state.tables, codec) for name, codec in self.state.codecs.items()}

    def _context(self, reg: Registration) -> PluginContext:
        logger = logging.getLogger(f"datasync.plugin.{reg.name}")
        return PluginContext(reg.name, reg.settings, logger, self._publishers, reg.watches, tables=self._views())

    async def _close(self, reg: Registration) -> None:
        if reg in self._registrations:
            await self._deliveries.remove(reg)
            self._registrations.remove(reg)
            if reg.started:
                reg.started = False
                await self._calls.hook(reg, "stop")
