"""The engine: state tables fed from Kafka, ordered resyncs, incremental changes, feedback.

One task (``_run``) owns the consumer and does everything in sequence, so the
table never changes while a plugin is being resynced and no change can slip
between a resync snapshot and the first live batch:

1. after a fault (and at start) rebuild every table by reading the topics to
   their end;
2. resync, in declared order, every plugin that needs it and whose retry is due;
3. fetch one batch, fold it into the tables and deliver the resulting changes
   to the ready plugins, in declared order.

The batch size is bounded and the next fetch waits for the plugins, so a slow
plugin slows the fetching down instead of filling memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from datasync.admin import prepare_topics
from datasync.api import Change, ChangeEvent, KeyValues, Plugin, PluginContext, ResyncEvent
from datasync.bindings import Bindings, TopicSpec
from datasync.codecs import Codec
from datasync.errors import ConfigError, DecodeError
from datasync.metrics import Metrics
from datasync.probe import BrokerProbe
from datasync.reader import Batch, TableReader
from datasync.settings import KafkaSettings, SyncSettings
from datasync.status import PluginState, PluginStatus
from datasync.table import Entry, StateTable

log = logging.getLogger("datasync")

# Longest wait for records when idle: bounds how long stop() and late registrations wait.
IDLE_FETCH_MS = 250


class Registration:
    """A plugin's subscription to key prefixes of table topics (the concept's ``Watch``)."""

    def __init__(
        self,
        engine: DataSync,
        name: str,
        plugin: Plugin,
        watches: Mapping[str, Sequence[str]],
        settings: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.plugin = plugin
        self.watches = {topic: tuple(prefixes) for topic, prefixes in watches.items()}
        self.settings = settings
        self.status = PluginStatus()
        self.due = 0.0  # monotonic time of the next resync attempt
        self.started = False
        self._engine = engine

    async def close(self) -> None:
        """Stop delivering events to this plugin (others are unaffected) and stop it."""
        await self._engine._unregister(self)


class DataSync:
    """Keeps state tables of compacted topics and synchronises plugins with them."""

    def __init__(self, kafka: KafkaSettings, sync: SyncSettings | None = None, metrics: Metrics | None = None) -> None:
        self.kafka = kafka
        self.sync = sync or SyncSettings()
        self.metrics = metrics or Metrics()
        self._topics: dict[str, TopicSpec] = {}
        self._codecs: dict[str, Codec] = {}
        self._tables: dict[str, StateTable] = {}
        self._registrations: list[Registration] = []
        self._reader: TableReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._resync_reason: str | None = "start"
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._remaining: dict[str, int] = {}  # records left per topic while tables are rebuilt
        self.broker_connected = False
        self.generation = 0  # how many times the tables have been rebuilt
        self.last_step = time.monotonic()  # when the engine last made progress (for /healthz)

    # -- set-up ---------------------------------------------------------------

    @classmethod
    def from_bindings(cls, bindings: Bindings, kafka: KafkaSettings, sync: SyncSettings | None = None) -> DataSync:
        engine = cls(kafka, sync)
        for topic in bindings.topics.values():
            engine.add_topic(topic.spec, topic.codec)
        for binding in bindings.plugins:
            spec = binding.spec
            watches: dict[str, list[str]] = {}
            for w in spec.watch:
                watches.setdefault(w.topic, []).extend(w.prefixes)
            try:
                plugin = binding.factory()
            except Exception as exc:
                raise ConfigError(
                    binding.source, f"{binding.field}.class", f"cannot create the plugin: {exc!r}"
                ) from exc
            engine.watch(spec.name, plugin, watches, spec.settings)
        return engine

    def add_topic(self, spec: TopicSpec, codec: Codec) -> None:
        if self._task is not None:
            raise RuntimeError("add topics before start()")
        self._topics[spec.name] = spec
        self._codecs[spec.name] = codec
        self._tables[spec.name] = StateTable(spec.name)

    def watch(
        self,
        name: str,
        plugin: Plugin,
        watches: Mapping[str, Sequence[str]],
        settings: Mapping[str, Any] | None = None,
    ) -> Registration:
        """Register ``plugin`` for the given ``{topic: [key prefixes]}``.

        Plugins resync in registration order. A plugin registered while the
        engine runs gets its resync before its first change.
        """
        if any(r.name == name for r in self._registrations):
            raise ValueError(f"a plugin named {name!r} is already registered")
        for topic, prefixes in watches.items():
            if topic not in self._topics:
                raise ValueError(f"plugin {name!r} watches unknown topic {topic!r}")
            if len(set(prefixes)) != len(prefixes):
                raise ValueError(f"plugin {name!r} watches a prefix of {topic!r} twice")
        reg = Registration(self, name, plugin, watches, settings or {})
        self._registrations.append(reg)
        self._wakeup.set()
        return reg

    async def _unregister(self, reg: Registration) -> None:
        if reg in self._registrations:
            self._registrations.remove(reg)
            if reg.started:
                await self._call_hook(reg, "stop")

    # -- queries --------------------------------------------------------------

    def table(self, topic: str) -> StateTable:
        return self._tables[topic]

    def status(self) -> dict[str, PluginStatus]:
        return {r.name: r.status for r in self._registrations}

    @property
    def running(self) -> bool:
        """False once the engine task has ended (stopped, or crashed on a bug)."""
        return self._task is not None and not self._task.done()

    async def topics_status(self) -> dict[str, dict[str, Any]]:
        """Per topic: keys in the table, records left while rebuilding, lag per partition."""
        lag: dict[str, dict[int, int]] = {name: {} for name in self._topics}
        if self._reader is not None:
            for tp, n in (await self._reader.lag()).items():
                lag[tp.topic][tp.partition] = n
        return {
            name: {"keys": len(self._tables[name]), "resync_remaining": self._remaining.get(name, 0), "lag": lag[name]}
            for name in self._topics
        }

    async def wait_ready(self) -> None:
        """Wait until every registered plugin has resynced (wrap in ``asyncio.timeout``)."""
        await self.wait_for(lambda: all(r.status.state is PluginState.READY for r in self._registrations))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every engine step."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Create missing topics, connect, and start synchronising in the background."""
        if self._task is not None:
            raise RuntimeError("already started")
        partitions = await prepare_topics(self.kafka, list(self._topics.values()), self.sync.create_topics)
        self.broker_connected = True
        self.metrics.broker_up.set(1)
        self._reader = TableReader(self.kafka, partitions, self.sync.fetch_max_records)
        await self._reader.start()
        self._task = asyncio.create_task(self._run(), name="datasync-engine")
        self._watchdog = asyncio.create_task(self._watch_broker(), name="datasync-broker-watch")

    async def stop(self) -> None:
        """Stop fetching, let the plugin call in flight finish (bounded), stop the plugins, close."""
        self._stopping = True
        self._wakeup.set()
        for task in (self._watchdog, self._task):
            if task is None:
                continue
            if task is self._task:
                done, _ = await asyncio.wait([task], timeout=self.sync.shutdown_timeout_s)
                if not done:
                    log.warning("plugin call still running after %.1fs: cancelled", self.sync.shutdown_timeout_s)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._task = self._watchdog = None
        for reg in reversed(self._registrations):
            if reg.started:
                await self._call_hook(reg, "stop")
                reg.started = False
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    def request_resync(self, reason: str) -> None:
        """Rebuild the tables from the topics and resync every plugin, in order."""
        self._resync_reason = reason
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._reader is not None
        reader = self._reader
        while not self._stopping:
            self.last_step = time.monotonic()
            if self._resync_reason is not None:
                await self._rebuild_tables(reader)
            await self._resync_due()
            try:
                batch = await reader.fetch(self._fetch_timeout_ms())
            except OffsetOutOfRangeError as exc:
                log.warning("positions out of range (%s): full resync", exc)
                self.request_resync("offsets out of range")
                continue
            except KafkaError as exc:
                log.warning("fetch failed, retrying: %r", exc)
                await asyncio.sleep(1)
                continue
            if batch:
                await self._apply(batch)
            await self._notify()

    async def _watch_broker(self) -> None:
        """Probe the broker; on regained connectivity rebuild everything (state may have moved on)."""
        async with BrokerProbe(self.kafka, timeout_s=max(2.0, self.sync.broker_probe_s)) as probe:
            while True:
                await asyncio.sleep(self.sync.broker_probe_s)
                up = await probe.reachable()
                if up != self.broker_connected:
                    self.broker_connected = up
                    self.metrics.broker_up.set(1 if up else 0)
                    if up:
                        log.warning("broker connection regained: full resync")
                        self.request_resync("broker connection regained")
                    else:
                        log.error("broker connection lost")
                    await self._notify()
                if self._reader is not None and up:
                    for tp, n in (await self._reader.lag()).items():
                        self.metrics.lag.labels(tp.topic, str(tp.partition)).set(n)

    def _fetch_timeout_ms(self) -> int:
        """Fetch no longer than until the next resync retry is due, nor than IDLE_FETCH_MS."""
        pending = [r.due for r in self._registrations if r.status.state is PluginState.RESYNCING]
        if self._wakeup.is_set():
            self._wakeup.clear()
            return 0
        if not pending:
            return IDLE_FETCH_MS
        return max(0, min(IDLE_FETCH_MS, int((min(pending) - time.monotonic()) * 1000)))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- full resync ----------------------------------------------------------

    async def _rebuild_tables(self, reader: TableReader) -> None:
        reason, self._resync_reason = self._resync_reason or "start", None
        started = time.monotonic()
        log.info("full resync (%s): reading %d topic(s) to their end", reason, len(self._topics))
        tables = {name: StateTable(name) for name in self._topics}
        ends = await reader.rewind()
        pending = set(self._topics)
        while True:
            left = await reader.behind(ends)
            self._remaining = {name: 0 for name in self._topics}
            for tp, n in left.items():
                self._remaining[tp.topic] += n
            for name in [n for n in pending if not self._remaining[n]]:
                pending.discard(name)
                self._table_rebuilt(tables[name], time.monotonic() - started)
            for name, n in self._remaining.items():
                self.metrics.resync_remaining.labels(name).set(n)
            if not left:
                break
            self.last_step = time.monotonic()
            batch = await reader.fetch(timeout_ms=200)
            for tp, records in batch.items():
                self._fold_all(tables[tp.topic], records)
        self._tables = tables
        self.generation += 1
        log.info("tables rebuilt in %.2fs", time.monotonic() - started)
        now = time.monotonic()
        for reg in self._registrations:
            reg.status.state = PluginState.RESYNCING
            reg.status.resync_attempts = 0
            reg.due = now

    def _table_rebuilt(self, table: StateTable, took: float) -> None:
        self.metrics.resyncs.labels(table.topic).inc()
        self.metrics.resync_seconds.labels(table.topic).set(took)
        self.metrics.resync_last_success.labels(table.topic).set_to_current_time()
        self.metrics.table_keys.labels(table.topic).set(len(table))
        log.info("table %s: %d keys, read in %.2fs", table.topic, len(table), took)

    def _fold_all(self, table: StateTable, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Fold records into ``table`` without producing changes (table rebuild)."""
        codec = self._codecs[table.topic]
        for record in records:
            self._fold(table, codec, record)
        self.metrics.records.labels(table.topic).inc(len(records))

    def _fold(self, table: StateTable, codec: Codec, record: ConsumerRecord[bytes, bytes]) -> Change | None:
        """Apply one record to ``table``; return the change it makes, if any."""
        raw_key = record.key
        try:
            key = raw_key.decode()
        except (AttributeError, UnicodeDecodeError) as exc:
            reason = "null key" if raw_key is None else "key not UTF-8"
            self._bad_record(table.topic, record, reason, str(exc))
            return None
        raw = record.value
        if raw is None:
            prev = table.delete(key)
            if prev is None:
                return None
            return Change(
                table.topic, "delete", key, None, prev, record.offset, record.partition, record.timestamp, codec
            )
        try:
            value = codec.decode(raw)
        except DecodeError as exc:
            self._bad_record(table.topic, record, "undecodable value", str(exc))
            return None
        prev = table.put(key, Entry(raw, record.offset, record.partition, record.timestamp))
        if prev is not None and prev.value == raw and not self.sync.emit_identical_puts:
            return None
        return Change(table.topic, "put", key, value, prev, record.offset, record.partition, record.timestamp, codec)

    def _bad_record(self, topic: str, record: ConsumerRecord[bytes, bytes], reason: str, detail: str) -> None:
        self.metrics.bad_records.labels(topic, reason).inc()
        log.warning(
            "skipped record %s/%d@%d: %s: %s (the key keeps its previous value)",
            topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )

    async def _resync_due(self) -> None:
        now = time.monotonic()
        for reg in list(self._registrations):
            if reg.status.state is PluginState.RESYNCING and reg.due <= now:
                await self._resync(reg)

    async def _resync(self, reg: Registration) -> None:
        status = reg.status
        if not reg.started:
            ctx = PluginContext(reg.name, reg.settings, logging.getLogger(f"datasync.plugin.{reg.name}"))
            if not await self._call_hook(reg, "start", ctx):
                status.state = PluginState.FAILED
                return
            reg.started = True
        values: dict[str, KeyValues] = {}
        for topic, prefixes in reg.watches.items():
            table, codec = self._tables[topic], self._codecs[topic]
            for prefix in prefixes:
                values[prefix] = KeyValues(topic, table.under(prefix), codec)
        event = ResyncEvent(values)
        status.resync_attempts += 1
        started = time.monotonic()
        try:
            await reg.plugin.resync(event)
        except Exception as exc:
            took = time.monotonic() - started
            self.metrics.plugin_seconds.labels(reg.name, "resync").observe(took)
            self.metrics.plugin_failures.labels(reg.name, "resync").inc()
            status.last_error = f"resync: {exc!r}"
            attempts = status.resync_attempts
            if attempts >= self.sync.resync_max_attempts:
                status.state = PluginState.FAILED
                log.error(
                    "plugin %s: resync of %d keys failed %d times, giving up until the next full resync: %r",
                    reg.name,
                    len(event),
                    attempts,
                    exc,
                )
            else:
                delay = min(self.sync.resync_backoff_s * 2 ** (attempts - 1), self.sync.resync_backoff_max_s)
                reg.due = time.monotonic() + delay
                log.warning(
                    "plugin %s: resync of %d keys failed (attempt %d), retrying in %.1fs: %r",
                    reg.name,
                    len(event),
                    attempts,
                    delay,
                    exc,
                )
            return
        took = time.monotonic() - started
        self.metrics.plugin_seconds.labels(reg.name, "resync").observe(took)
        status.state = PluginState.READY
        status.last_resync_at = time.time()
        status.last_resync_seconds = took
        log.info("plugin %s: resynced %d keys in %.3fs", reg.name, len(event), took)

    async def _call_hook(self, reg: Registration, hook: str, *args: Any) -> bool:
        try:
            await getattr(reg.plugin, hook)(*args)
            return True
        except Exception as exc:
            reg.status.last_error = f"{hook}: {exc!r}"
            self.metrics.plugin_failures.labels(reg.name, hook).inc()
            log.error("plugin %s: %s hook failed: %r", reg.name, hook, exc)
            return False

    # -- incremental changes --------------------------------------------------

    async def _apply(self, batch: Batch) -> None:
        """Fold a fetched batch into the tables and deliver its changes in plugin order."""
        ready = [r for r in self._registrations if r.status.state is PluginState.READY]
        outbox: dict[Registration, list[Change]] = {r: [] for r in ready}
        for tp, records in batch.items():
            topic = tp.topic
            table, codec = self._tables[topic], self._codecs[topic]
            matchers = [(p, outbox[r]) for r in ready for p in r.watches.get(topic, ())]
            self.metrics.records.labels(topic).inc(len(records))
            for record in records:
                change = self._fold(table, codec, record)
                if change is None:
                    continue
                key = change.key
                for prefix, changes in matchers:
                    if key.startswith(prefix) and (not changes or changes[-1] is not change):
                        changes.append(change)
            self.metrics.table_keys.labels(topic).set(len(table))
        for reg in ready:
            if outbox[reg] and reg in self._registrations:
                await self._deliver(reg, ChangeEvent(outbox[reg]))

    async def _deliver(self, reg: Registration, event: ChangeEvent) -> None:
        attempts = self.sync.change_max_attempts
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                await reg.plugin.change(event)
            except Exception as exc:
                self.metrics.plugin_seconds.labels(reg.name, "change").observe(time.monotonic() - started)
                self.metrics.plugin_failures.labels(reg.name, "change").inc()
                where = ", ".join(f"{c.key}@{c.revision}" for c in event.changes[:10])
                more = f" and {len(event.changes) - 10} more" if len(event.changes) > 10 else ""
                if attempt == attempts:
                    reg.status.change_failures += 1
                    reg.status.last_error = f"change: {exc!r}"
                    log.error(
                        "plugin %s: change of %s%s failed %d times, skipped: %r", reg.name, where, more, attempt, exc
                    )
                    return
                log.warning(
                    "plugin %s: change of %s%s failed (attempt %d), retrying: %r", reg.name, where, more, attempt, exc
                )
                await asyncio.sleep(self.sync.change_backoff_s * 2 ** (attempt - 1))
                continue
            self.metrics.plugin_seconds.labels(reg.name, "change").observe(time.monotonic() - started)
            reg.status.changes_applied += len(event.changes)
            for op in ("put", "delete"):
                n = sum(1 for c in event.changes if c.op == op)
                if n:
                    self.metrics.changes.labels(reg.name, op).inc(n)
            return
