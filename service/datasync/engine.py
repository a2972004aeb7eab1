"""The engine: state tables fed from Kafka, ordered resyncs, incremental changes, feedback.

One task (``_run``) owns the consumer and does everything in sequence, so a
table never changes while a plugin is being resynced and no change can slip
between a resync snapshot and the first live batch:

1. at start and after a fault, rebuild every table by reading the topics to
   their end;
2. resync, in declared order, every plugin that needs it and whose retry is due;
3. fetch one batch, fold it into the tables and queue the resulting changes
   for the ready plugins.

Changes are handed over by one delivery task per plugin (``delivery``), so a
plugin that retries holds back only itself and the plugins declared after it.
Queues are bounded, so a slow plugin slows the fetching down instead of
filling memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from datasync.admin import dead_letter_topics, prepare_topics
from datasync.api import Change, ChangeEvent, Plugin, PluginContext, ResyncEvent, resync_values
from datasync.applystatus import ApplyStatus
from datasync.bindings import Bindings, TopicSpec
from datasync.calls import PluginCalls
from datasync.codecs import Codec
from datasync.confluent import RegistryCodec, prepare_encode
from datasync.deadletter import DeadLetters
from datasync.delivery import CANCEL_GRACE_S, Deliveries
from datasync.delta import differences
from datasync.errors import DecodeError, TopicError
from datasync.fleet import Fleet, Rebalancing
from datasync.ingest import Ingest
from datasync.metrics import Metrics
from datasync.probe import BrokerProbe
from datasync.publish import Publisher, Publishing
from datasync.reader import REBUILD_MAX_RECORDS, Batch, TableReader
from datasync.registration import Registration, ResyncMode
from datasync.registry import RegistryError
from datasync.replay import Replayer
from datasync.settings import GroupSettings, KafkaSettings, SnapshotSettings, SyncSettings
from datasync.snapshot import Snapshots
from datasync.status import PluginState, PluginStatus
from datasync.table import StateTable
from datasync.views import TableView

log = logging.getLogger("datasync")

# Longest wait for records when idle: bounds how long stop() and late registrations wait. A
# SIGTERM'd fleet member leaves its group only after it (0.23 s of a rolling restart's handover at
# 250 ms); an idle engine stepping ten times a second costs nothing measurable.
IDLE_FETCH_MS = 100
PROGRESS_EVERY_S = 10.0  # how often a long table read logs its progress


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: it would scan a table read's records again and again
    (about 15% of the read), while reference counting frees them anyway; it runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _log_failure(task: asyncio.Task[None]) -> None:
    """Log a background task that died (a bug) when it dies, not when the service stops."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed, the engine no longer synchronises: %r", task.get_name(), exc, exc_info=exc)


class Progress:
    """Logs a long read's progress (records left, rate) every PROGRESS_EVERY_S."""

    def __init__(self) -> None:
        self._started = self._last = time.monotonic()
        self._total: int | None = None

    def report(self, left: int) -> None:
        now = time.monotonic()
        if self._total is None:
            self._total = left
        elif now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            rate = (self._total - left) / (now - self._started)
            log.info("reading tables: %d records left, %.0f records/s", left, rate)


class DataSync:
    """Keeps state tables of compacted topics and synchronises plugins with them."""

    def __init__(
        self,
        kafka: KafkaSettings,
        sync: SyncSettings | None = None,
        metrics: Metrics | None = None,
        group: GroupSettings | None = None,
        state_dir: Path | None = None,
        snapshot: SnapshotSettings | None = None,
    ) -> None:
        """With ``state_dir``, tables are snapshotted there and loaded from there at start."""
        self.kafka = kafka
        self.sync = sync or SyncSettings()
        self.group = group or GroupSettings()  # with an id: one member of a fleet (see fleet.py)
        self._fleet: Fleet | None = None
        self.metrics = metrics or Metrics()
        self.state_dir = state_dir
        self.snapshot_settings = snapshot or SnapshotSettings()
        self._snapshots: Snapshots | None = None
        self._declared: dict[str, TopicSpec] = {}  # every topic the engine knows
        self._topics: dict[str, TopicSpec] = {}  # the topics read into tables
        self._codecs: dict[str, Codec] = {}
        self._tables: dict[str, StateTable] = {}
        self._registrations: list[Registration] = []
        self._publishers: dict[str, Publisher] = {}
        self.publishing = Publishing(kafka, self.metrics, self.sync.shutdown_timeout_s)
        self._calls = PluginCalls(self.sync, self.metrics, self.publishing.room, self._progress)
        self._deliveries = Deliveries(
            self._calls, self.sync.plugin_queue_max_records, self.sync.fetch_max_records, self._step, self._skipped
        )
        self._seq = 0  # sequence number of the last fetched batch
        self._reader: TableReader | None = None
        self._dead_letters: DeadLetters | None = None
        self._ingest: Ingest | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._resync_reason: str | None = "start"
        self._stop = asyncio.Event()  # set by stop()
        self._unapplied = False  # a fetched batch is not folded into the tables yet
        self._closing: list[tuple[Registration, asyncio.Future[None]]] = []  # close() requests
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._remaining: dict[str, int] = {}  # records left per topic while tables are rebuilt
        self._evictions: dict[str, int] = {}  # per registry-codec topic: its client's evictions when last reloaded
        self.broker_connected = False
        self.generation = 0  # how many times the tables have been rebuilt
        self.rebuilding = False  # tables are being read; they are incomplete until it ends
        self._delta_base: dict[str, StateTable] | None = None  # tables delta-mode plugins were in sync with
        self.last_step = time.monotonic()  # when the engine last made progress (for /healthz)

    # -- set-up ---------------------------------------------------------------

    @classmethod
    def from_bindings(
        cls,
        bindings: Bindings,
        kafka: KafkaSettings,
        sync: SyncSettings | None = None,
        group: GroupSettings | None = None,
        state_dir: Path | None = None,
        snapshot: SnapshotSettings | None = None,
    ) -> DataSync:
        engine = cls(kafka, sync, group=group, state_dir=state_dir, snapshot=snapshot)
        watched = {w.topic for binding in bindings.plugins for w in binding.spec.watch}
        for topic in bindings.topics.values():
            engine.add_topic(topic.spec, topic.codec, read=topic.spec.name in watched)
        for pub in bindings.publishers.values():
            engine.add_publisher(pub.name, pub.topic)
        for binding in bindings.plugins:
            spec = binding.spec
            watches: dict[str, list[str]] = {}
            for w in spec.watch:
                watches.setdefault(w.topic, []).extend(w.prefixes)
            engine.watch(spec.name, binding.plugin, watches, spec.settings, spec.resync, spec.status, spec.after)
        return engine

    def add_topic(self, spec: TopicSpec, codec: Codec, read: bool = True) -> None:
        """Declare a topic; with ``read`` it is read into a state table (publish-only topics are not)."""
        if self._task is not None:
            raise RuntimeError("add topics before start()")
        self._declared[spec.name] = spec
        self._codecs[spec.name] = codec
        if read:
            self._topics[spec.name] = spec
            self._tables[spec.name] = StateTable(spec.name)

    def add_publisher(self, name: str, topic: str) -> Publisher:
        """A publisher plugins get as ``ctx.publisher(name)``; values are encoded with the topic's codec."""
        if topic not in self._declared:
            raise ValueError(f"publisher {name!r}: unknown topic {topic!r}")
        publisher = self.publishing.publisher(name, topic, self._codecs[topic])
        self._publishers[name] = publisher
        return publisher

    def watch(
        self,
        name: str,
        plugin: Plugin,
        watches: Mapping[str, Sequence[str]],
        settings: Mapping[str, Any] | None = None,
        resync_mode: ResyncMode = "full",
        status_publisher: str | None = None,
        after: Sequence[str] = (),
    ) -> Registration:
        """Register ``plugin`` for the given ``{topic: [key prefixes]}``.

        Plugins resync in registration order. A plugin registered while the
        engine runs gets its resync before its first change. Changes reach
        each plugin independently, except that a plugin gets a batch only
        after the plugins named in ``after`` (registered earlier) handled the
        batches before it. With ``resync_mode="delta"`` a plugin that was in
        sync before a fault gets the differences as a CHANGE event instead of
        a full RESYNC. With a ``status_publisher`` each key's apply result is
        published there.
        """
        if any(r.name == name for r in self._registrations):
            raise ValueError(f"a plugin named {name!r} is already registered")
        for topic, prefixes in watches.items():
            if topic not in self._topics:
                raise ValueError(f"plugin {name!r} watches unknown topic {topic!r}")
            if len(set(prefixes)) != len(prefixes):
                raise ValueError(f"plugin {name!r} watches a prefix of {topic!r} twice")
        if resync_mode == "delta" and getattr(plugin, "resync_after_failed_change", False):
            raise ValueError(f"plugin {name!r} must never miss a change: it needs resync_mode 'full'")
        earlier = {r.name: r for r in self._registrations}
        for dependency in after:
            if dependency not in earlier:
                raise ValueError(f"plugin {name!r}: 'after' names {dependency!r}, which is not registered before it")
        apply_status = None
        if status_publisher is not None:
            if status_publisher not in self._publishers:
                raise ValueError(f"plugin {name!r}: unknown status publisher {status_publisher!r}")
            apply_status = ApplyStatus(self._publishers[status_publisher], name)
        reg = Registration(name, plugin, watches, settings or {}, resync_mode, apply_status, self._unregister)
        self._registrations.append(reg)
        self._deliveries.add(reg, [earlier[d] for d in after])
        self._wakeup.set()
        return reg

    async def _unregister(self, reg: Registration) -> None:
        """Remove a registration; while the engine runs, its task does it between two steps,
        so that ``stop()`` never runs while the same plugin is handling an event."""
        if reg not in self._registrations:
            return
        task = self._task
        from_plugin = asyncio.current_task() is task or self._deliveries.in_task(reg)
        if task is None or task.done() or from_plugin:  # not running, or a plugin closing itself
            await self._close(reg)
            return
        done = asyncio.get_running_loop().create_future()
        self._closing.append((reg, done))
        self._wakeup.set()
        await asyncio.wait([done, task], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the engine task ended first
            await self._close(reg)

    async def _close(self, reg: Registration) -> None:
        if reg in self._registrations:
            self._registrations.remove(reg)
            await self._deliveries.remove(reg)
            if reg.started:
                reg.started = False
                await self._calls.hook(reg, "stop")

    # -- queries --------------------------------------------------------------

    def table(self, topic: str) -> StateTable:
        return self._tables[topic]

    def codec(self, topic: str) -> Codec | None:
        """The codec of a declared topic (None if the topic is not declared)."""
        return self._codecs.get(topic)

    def status(self) -> dict[str, PluginStatus]:
        for reg in self._registrations:
            reg.status.queued = self._deliveries.queued(reg)
        return {r.name: r.status for r in self._registrations}

    def request_plugin_resync(self, name: str) -> None:
        """Resync plugin ``name`` now (an operator's request); KeyError if there is none."""
        reg = next((r for r in self._registrations if r.name == name), None)
        if reg is None:
            raise KeyError(name)
        log.info("plugin %s: resync requested", name)
        self._deliveries.drop(reg)
        if reg.status.state is PluginState.READY:
            reg.status.state = PluginState.RESYNCING
        reg.due = time.monotonic()
        reg.status.next_attempt_at = time.time()
        self._wakeup.set()

    def handing_over(self, topic: str) -> bool:
        """Partitions of ``topic`` are being handed over between the members of the group."""
        return self._fleet is not None and self._fleet.handing_over(topic)

    def group_status(self) -> dict[str, Any] | None:
        """The group, this member and the partitions it owns (None without a group)."""
        return self._fleet.status() if self._fleet is not None else None

    @property
    def running(self) -> bool:
        """False once the engine task has ended (stopped, or crashed on a bug)."""
        return self._task is not None and not self._task.done()

    async def topics_status(self) -> dict[str, dict[str, Any]]:
        """Per topic: keys in the table, records left while rebuilding, lag per partition."""
        lag: dict[str, dict[int, int]] = {name: {} for name in self._topics}
        for tp, n in (await self._lag(timeout_s=1.0)).items():
            lag[tp.topic][tp.partition] = n
        loaded = self._snapshots.describe if self._snapshots is not None else lambda _: {"from": "full read"}
        return {
            name: {
                "keys": len(self._tables[name]),
                "resync_remaining": self._remaining.get(name, 0),
                "lag": lag[name],
                "loaded": loaded(name),
            }
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
        self._stop.clear()  # a start attempt that failed part-way ran stop()
        self._unapplied = False
        self._resync_reason = self._resync_reason or "start"
        dead = {name: spec.dead_letter for name, spec in self._topics.items() if spec.dead_letter}
        declared = list(self._declared.values())
        partitions = await prepare_topics(
            self.kafka, [*declared, *dead_letter_topics(declared)], self.sync.create_topics
        )
        for publisher in self._publishers.values():  # schema ids from the registry, before anything is sent
            await prepare_encode(publisher.codec)
        self.broker_connected = True
        self.metrics.broker_up.set(1)
        self._ingest = Ingest(self._topics, self._codecs, self.metrics, self.sync.emit_identical_puts)
        self._dead_letters = DeadLetters(self.kafka, dead, self.metrics, self.sync.shutdown_timeout_s)
        self._reader = TableReader(self.kafka, self.sync.fetch_max_records)
        if self.state_dir is not None:
            self._snapshots = Snapshots(
                self.state_dir, self.snapshot_settings, self.kafka, self.metrics, self._topics, self._codecs
            )
        try:
            await self._dead_letters.start()
            await self.publishing.start()
            await self._reader.start({t: n for t, n in partitions.items() if t in self._topics})
            if self.group.id is not None and self._topics:
                self._fleet = Fleet(self.kafka, self.group, self._topics, self.metrics, self._wakeup.set)
                await self._fleet.start({t: n for t, n in partitions.items() if t in self._topics})
        except BaseException:
            await self.stop()  # close what did start
            raise
        self._deliveries.start()
        self._task = asyncio.create_task(self._run(), name="datasync-engine")
        self._watchdog = asyncio.create_task(self._watch_broker(), name="datasync-broker-watch")
        for task in (self._task, self._watchdog):
            task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        """Stop fetching, let the plugin call in flight finish (bounded), stop the plugins, close."""
        self._stop.set()
        self._deliveries.halt()  # no further change calls; the ones in flight may end
        self._wakeup.set()
        if self._fleet is not None:
            self._fleet.stopping = True  # a read of moved partitions stops too
        try:
            async with asyncio.timeout(self.sync.shutdown_timeout_s):
                if self._task is not None:
                    await asyncio.wait([self._task])
                await self._deliveries.wait_idle()
        except TimeoutError:
            running = ", ".join(f"{name} ({kind})" for name, kind in self._calls.running.items())
            log.warning("%s after %.1fs: cancelled", f"plugin calls still running: {running}" if running
                        else "the engine had not stopped", self.sync.shutdown_timeout_s)  # fmt: skip
        await self._deliveries.stop()
        for task in (self._watchdog, self._task):
            if task is not None:
                task.cancel()
                await asyncio.wait([task], timeout=CANCEL_GRACE_S)  # a failure was logged when it happened
                if not task.done():
                    log.error("task %s ignored its cancellation (a plugin call catching CancelledError?): "
                              "left behind", task.get_name())  # fmt: skip
        self._task = self._watchdog = None
        if self._fleet is not None:  # leave the group now: the others take over without a session timeout
            await self._fleet.stop()
        for reg, closed in self._closing:
            await self._close(reg)
            if not closed.done():
                closed.set_result(None)
        self._closing.clear()
        if self._snapshots is not None:  # before the plugins stop: their stop() may take a while
            final = self.generation > 0 and not self.rebuilding and not self._unapplied
            await self._snapshots.close(self._reader, self._tables, final=final)
        for reg in reversed(self._registrations):
            if reg.started:
                await self._calls.hook(reg, "stop")
                reg.started = False
        await self.publishing.stop()
        if self._dead_letters is not None:
            await self._dead_letters.stop()
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    async def wait_ended(self) -> BaseException | None:
        """Wait until the engine task ends: after ``stop()`` (None), or on a bug (its exception)."""
        task = self._task
        if task is None:
            return None
        await asyncio.wait([task])
        return None if task.cancelled() else task.exception()

    def request_resync(self, reason: str) -> None:
        """Rebuild the tables from the topics and resync every plugin, in order."""
        self._resync_reason = reason
        self._wakeup.set()

    async def _run(self) -> None:
        try:
            await self._steps()
        finally:  # ended (stopped, or a bug): wake wait_for(), e.g. on ``not engine.running``
            await self._notify()

    async def _steps(self) -> None:
        assert self._reader is not None
        reader = self._reader
        failures = 0
        while not self._stop.is_set():
            self.last_step = time.monotonic()
            while self._closing:
                reg, done = self._closing.pop(0)
                try:
                    await self._close(reg)
                finally:
                    if not done.done():  # the caller may have been cancelled meanwhile
                        done.set_result(None)
            try:
                if self._fleet is not None and not await self._follow_group(reader):
                    continue  # a rebalance runs: nothing is delivered until the new assignment is known
                if self._resync_reason is not None:
                    await self._rebuild(reader)
                await self._resync_due()
                if self._stop.is_set():
                    break
                if self._snapshots is not None and self._snapshots.due(self._quiet()):
                    await self._snapshots.save(reader, self._tables)
                batch = await reader.fetch(self._fetch_timeout_ms())
                if batch:  # the position has moved past it: fold it even when stopping (the snapshot)
                    await self._apply(batch)
                failures = 0
            except Rebalancing:
                log.info("a rebalance started: the tables are read again once it is assigned")
            except OffsetOutOfRangeError as exc:
                log.warning("positions out of range (%s): full resync", exc)
                self.request_resync("offsets out of range")
            except (KafkaError, TopicError) as exc:
                # The rebuild or fetch failed (broker away, topic deleted...): retry, backing off.
                failures += 1
                delay = min(0.5 * 2**failures, 30.0)
                log.warning("%r; retrying in %.1fs", exc, delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
            await self._notify()

    async def _watch_broker(self) -> None:
        """Probe the broker; on regained connectivity rebuild everything (state may have moved on).

        Loss is declared after ``broker_probe_failures`` failed probes in a row, so one slow
        answer on a busy machine does not cost a full resync.
        """
        failures = 0
        async with BrokerProbe(self.kafka, timeout_s=max(2.0, self.sync.broker_probe_s)) as probe:
            while True:
                await asyncio.sleep(self.sync.broker_probe_s)
                failures = 0 if await probe.reachable() else failures + 1
                up = failures < self.sync.broker_probe_failures
                if up != self.broker_connected:
                    self.broker_connected = up
                    self.metrics.broker_up.set(1 if up else 0)
                    servers = self.kafka.bootstrap_servers
                    if up:
                        log.warning("broker at %s regained: full resync", servers)
                        self.request_resync("broker connection regained")
                    else:
                        log.error("broker at %s lost (%d probes failed); probing every %gs",
                                  servers, failures, self.sync.broker_probe_s)  # fmt: skip
                    await self._notify()
                for tp, n in (await self._lag(timeout_s=self.sync.broker_probe_s)).items():
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(n)

    async def _lag(self, timeout_s: float) -> dict[TopicPartition, int]:
        """Lag per partition, or nothing while it cannot be known (broker away, rebuild, reassignment)."""
        if self._reader is None or not self.broker_connected:
            return {}
        try:
            async with asyncio.timeout(timeout_s):
                return await self._reader.lag()
        except Exception as exc:  # report no lag rather than hang or fail the caller
            log.debug("lag not measured: %r", exc)
            return {}

    def _quiet(self) -> bool:
        """Tables complete and no plugin resyncing: a good time for a snapshot."""
        return not self.rebuilding and all(r.status.state is not PluginState.RESYNCING for r in self._registrations)

    def _fetch_timeout_ms(self) -> int:
        """Fetch no longer than until the next resync retry is due, nor than IDLE_FETCH_MS."""
        pending = [r.due for r in self._registrations if r.status.state is not PluginState.READY]
        if self._wakeup.is_set():
            self._wakeup.clear()
            return 0
        if not pending:
            return IDLE_FETCH_MS
        return max(0, min(IDLE_FETCH_MS, int((min(pending) - time.monotonic()) * 1000)))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _progress(self) -> None:
        self.last_step = time.monotonic()

    async def _step(self) -> None:
        """A plugin handled a batch: that is progress, and waiters re-check."""
        self._progress()
        await self._notify()

    def _skipped(self, reg: Registration) -> None:
        """A CHANGE batch failed every attempt and was skipped: the plugin's view diverged."""
        reg.diverged = True
        if getattr(reg.plugin, "resync_after_failed_change", False) and reg.status.state is PluginState.READY:
            log.warning("plugin %s: a change was skipped: full resync", reg.name)
            reg.status.state = PluginState.RESYNCING
            reg.due = time.monotonic()
            self._wakeup.set()

    # -- assignment changes (with a group) --------------------------------------

    async def _follow_group(self, reader: TableReader) -> bool:
        """While the group rebalances, deliver nothing (False); once assigned, take the assignment over."""
        fleet = self._fleet
        assert fleet is not None
        if fleet.rebalancing:
            await self._deliveries.hold(drain_s=self.sync.shutdown_timeout_s)
            await fleet.wait_assignment()
            return False
        if fleet.moved:
            await self._reassign(reader, fleet)
            if fleet.rebalancing:  # the next rebalance interrupted it
                return False
        if fleet.held is None:  # a full read was cut short: what is still queued may be of revoked partitions
            for reg in self._registrations:  # the rebuild that follows resyncs every plugin
                if self._deliveries.drop(reg):
                    reg.diverged = True
        self._deliveries.resume()
        return True

    async def _reassign(self, reader: TableReader, fleet: Fleet) -> None:
        """Read what the group gave us, drop what it took; then resync the plugins it concerns, in order."""
        assert self._ingest is not None and self._dead_letters is not None
        if self._snapshots is not None:  # a write running now would finish files without the dropped keys
            await self._snapshots.cancel()
            self._snapshots.forget(fleet.moving())
        handover = await fleet.reassign(reader, self._tables, self._ingest)
        await self._dead_letters.send(self._ingest.take_rejected())
        if handover is None:
            return  # interrupted by the next rebalance, which completes it
        now = time.monotonic()
        # Only the plugins watching a moved topic can have changes of a lost partition queued: they are
        # resynced before delivery resumes, and a resync drops what is queued for the plugin.
        for reg in self._registrations:
            if not handover.affects(reg.watches):
                continue
            if self._wants_delta(reg) or reg.handover is not None:
                try:
                    changes = handover.changes_for(reg.watches, self._tables, self._codecs)
                    reg.handover = [*(reg.handover or []), *changes]
                except DecodeError as exc:
                    log.warning("plugin %s: handover not decodable (%s): full resync", reg.name, exc)
                    reg.handover = None
            if reg.status.state is PluginState.READY:
                reg.status.state = PluginState.RESYNCING
            reg.status.resync_attempts = 0
            reg.due = now
        await self._resync_due()
        fleet.settled()

    # -- full resync ----------------------------------------------------------

    async def _rebuild(self, reader: TableReader) -> None:
        """Read every topic from the beginning into fresh tables; then mark the plugins for resync."""
        assert self._ingest is not None and self._dead_letters is not None
        reason, self._resync_reason = self._resync_reason or "start", None  # a new request may come meanwhile
        try:
            done = await self._read_tables(reader, reason)
        except BaseException:
            self._resync_reason = self._resync_reason or reason  # not done: do it again
            raise
        if not done:  # stopped half-way
            self._resync_reason = self._resync_reason or reason

    async def _read_tables(self, reader: TableReader, reason: str) -> bool:
        """Read the tables afresh; False if a stop request cut it short."""
        assert self._ingest is not None and self._dead_letters is not None
        started, wall_started = time.monotonic(), time.time()
        log.info("full resync (%s): reading %d topic(s) to their end", reason, len(self._topics))
        if self.generation or self._fleet is not None:  # topics may have been recreated, with other partitions
            select = self._fleet.select() if self._fleet is not None else None  # with a group: the owned ones
            reader.assign(await prepare_topics(self.kafka, list(self._topics.values()), create=False), select)
        self._ingest.before_rebuild(self._tables.values())
        tables = {name: StateTable(name) for name in self._topics}
        # Keep the old tables only for delta-mode plugins that were in sync with them (and keep
        # them across failed attempts: a half-read table is no base); otherwise free them first,
        # so that the new ones reuse their memory instead of doubling the peak.
        if not self.rebuilding and any(self._wants_delta(r) for r in self._registrations):
            self._delta_base = self._tables
        self.rebuilding = True
        self._remaining = {name: 0 for name in self._topics}
        self._tables = tables
        ends = await reader.rewind()
        if self._snapshots is not None:  # partitions with a valid snapshot are read from its position
            await self._snapshots.restore(reader, tables, ends, since=wall_started, interned=self._ingest.interning)
        pending = set(self._topics)
        progress = Progress()
        with cyclic_gc_paused():  # the read allocates millions of short-lived, acyclic records
            while not self._stop.is_set():
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
                progress.report(sum(left.values()))
                self.last_step = time.monotonic()
                if self._fleet is not None:
                    self._fleet.check_rebalance()  # a revocation restarts the read with the next assignment
                batch = await reader.fetch(timeout_ms=200, max_records=REBUILD_MAX_RECORDS)
                await self._ingest.prepare(batch)
                for tp, records in batch.items():
                    self._ingest.fold_all(tables[tp.topic], records)
                await self._dead_letters.send(self._ingest.take_rejected())
        if self._stop.is_set():
            return False
        self.generation += 1
        self.rebuilding = False
        log.info("tables rebuilt in %.2fs", time.monotonic() - started)
        now = time.monotonic()
        for reg in self._registrations:
            if self._deliveries.drop(reg):  # changes it never got: its view is not the old table
                reg.diverged = True
            reg.delta_base = self._delta_base if self._wants_delta(reg) else None
            if reg.status.state is PluginState.READY:
                reg.status.state = PluginState.RESYNCING
            reg.status.resync_attempts = 0
            reg.due = now
        self._delta_base = None
        return True

    @staticmethod
    def _wants_delta(reg: Registration) -> bool:
        """A delta-mode plugin that was in sync with the current tables."""
        return reg.resync_mode == "delta" and reg.status.state is PluginState.READY and not reg.diverged

    def _table_rebuilt(self, table: StateTable, took: float) -> None:
        self.metrics.resyncs.labels(table.topic).inc()
        self.metrics.resync_seconds.labels(table.topic).set(took)
        self.metrics.resync_last_success.labels(table.topic).set_to_current_time()
        self.metrics.table_keys.labels(table.topic).set(len(table))
        log.info("table %s: %d keys, read in %.2fs", table.topic, len(table), took)

    async def _resync_due(self) -> None:
        now = time.monotonic()
        for reg in list(self._registrations):
            if self._stop.is_set():
                return
            if reg.status.state is not PluginState.READY and reg.due <= now and reg in self._registrations:
                await self._resync(reg)

    async def _resync(self, reg: Registration) -> None:
        if await self._deliveries.pause(reg):  # queued changes the resync replaces
            reg.diverged = True
        if reg.diverged:  # its view is not the old table: no delta from it
            reg.delta_base = reg.handover = None
        if not reg.started:
            plugin_log = logging.getLogger(f"datasync.plugin.{reg.name}")
            replayer = Replayer(self.kafka, self.sync, self._topics, self._codecs)
            ctx = PluginContext(
                reg.name, reg.settings, plugin_log, self._publishers, reg.watches, self.kafka, replayer.changes
            )
            ctx.tables = {name: TableView(name, lambda: self._tables, self._codecs[name]) for name in self._topics}
            if not await self._calls.start(reg, ctx):
                return
            reg.started = True
        if reg.delta_base is not None or reg.handover is not None:
            base, reg.delta_base = reg.delta_base, None
            changes: list[Change] | None = reg.handover or []
            try:
                if base is not None:
                    changes = differences(reg.watches, base, self._tables, self._codecs, self._holds)
            except DecodeError as exc:  # a writer schema not loaded (any more): the plugin decodes a resync
                log.warning("plugin %s: delta not decodable (%s): full resync", reg.name, exc)
                changes = None
            reg.handover = None
            if changes is not None and (not changes or await self._calls.change(reg, ChangeEvent(changes))):
                log.info("plugin %s: back in sync with %d changes (delta mode)", reg.name, len(changes))
                self._calls.succeeded(reg)
                return
            # the delta failed: fall back to a full resync, right away
        await self._reload_evicted_schemas(reg)
        values = resync_values(reg.watches, self._tables, self._codecs)
        assert self._reader is not None
        positions = {(tp.topic, tp.partition): n for tp, n in (await self._reader.positions()).items()}
        watched = {key: n for key, n in positions.items()
                   if key[0] in reg.watches and (self._fleet is None or self._fleet.owns(*key))}  # fmt: skip
        await self._calls.resync(reg, ResyncEvent(values, watched))

    def _holds(self, topic: str, partition: int) -> bool:
        """Whether the tables hold ``topic/partition`` (in a fleet, partitions move away)."""
        return self._fleet is None or self._fleet.holds(topic, partition)

    async def _reload_evicted_schemas(self, reg: Registration) -> None:
        """A registry's bounded cache may have dropped the writer schema of a value read earlier: if
        it dropped any since the last look, load those of the values this resync hands out. Not
        waiting for a registry that is away: then the plugin fails to decode and is retried."""
        for topic, prefixes in reg.watches.items():
            codec, table = self._codecs[topic], self._tables[topic]
            if not isinstance(codec, RegistryCodec) or codec.client.evictions == self._evictions.get(topic, 0):
                continue
            evictions = codec.client.evictions
            try:
                await codec.prepare_decode((table.data[k] for p in prefixes for k in table.keys_under(p)), retry=False)
            except RegistryError as exc:
                log.warning("plugin %s: writer schemas of %s not reloaded: %s", reg.name, topic, exc)
            else:
                self._evictions[topic] = evictions

    # -- incremental changes --------------------------------------------------

    async def _apply(self, batch: Batch) -> None:
        """Fold a fetched batch into the tables and deliver its changes in plugin order."""
        assert self._ingest is not None and self._dead_letters is not None
        ingest = self._ingest
        self._unapplied = True  # the reader's position is past records the tables may lack
        await ingest.prepare(batch, self._tables)
        # Stopping: fold only, so that the tables match the position a shutdown snapshot records.
        ready = [] if self._stop.is_set() else [r for r in self._registrations if r.status.state is PluginState.READY]
        outbox: dict[Registration, list[Change]] = {r: [] for r in ready}
        self._seq += 1
        for tp, records in batch.items():
            topic = tp.topic
            table = self._tables[topic]
            matchers = [(p, outbox[r]) for r in ready for p in r.watches.get(topic, ())]
            self.metrics.records.labels(topic).inc(len(records))
            for record in records:
                change = ingest.fold(table, record)
                if change is None:
                    continue
                key = change.key
                for prefix, changes in matchers:
                    if key.startswith(prefix) and (not changes or changes[-1] is not change):
                        changes.append(change)
            self.metrics.table_keys.labels(topic).set(len(table))
        self._unapplied = False
        await self._dead_letters.send(ingest.take_rejected())
        await self._deliveries.put(self._seq, outbox)
