"""Running as a fleet: this instance's share of the partitions, and their lifecycle.

With a group configured, the members divide the partition numbers of one
anchor topic among themselves (``membership``). Partitioned topics are
co-partitioned (equal partition counts): partition p of every one of them
belongs to whoever owns p. Replicated topics are read whole by every member;
their partition p is *owned* (for plugins that act per partition, such as the
changefeed) by the owner of ``p mod N``, N the anchor's partition count.

A partition goes assigned -> reading -> live -> revoked:

* on revocation the engine hands over what is queued, then delivers nothing
  (``rebalancing``, ``wait_assignment``) until the new assignment is known, so
  no change of a partition is delivered after another member may have taken it;
* on assignment the engine task calls ``reassign``: partitions kept stay in
  the tables with their positions; lost ones are dropped from the tables;
  gained ones are read from the beginning to their end (only those: the kept
  ones are paused meanwhile). The resulting ``Handover`` says which plugins
  need a resync (or, in delta mode, which puts and releases).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from datasync.api import Change
from datasync.bindings import TopicSpec, check_copartitioned
from datasync.codecs import Codec
from datasync.errors import ConfigError
from datasync.ingest import Ingest
from datasync.membership import GroupMembership
from datasync.metrics import Metrics
from datasync.reader import REBUILD_MAX_RECORDS, TableReader
from datasync.settings import GroupSettings, KafkaSettings
from datasync.table import Entry, Packed, StateTable, partition_of

log = logging.getLogger("datasync.group")

HOLD_S = 1.0  # longest wait for an assignment per engine step


class Rebalancing(Exception):
    """A rebalance started during a full read of the tables: it is read again after the assignment."""


@dataclass
class Handover:
    """What an assignment change did to the tables."""

    moved: set[str] = field(default_factory=set)  # topics whose owned partitions changed
    gained: dict[str, set[int]] = field(default_factory=dict)  # partitions read into the tables
    released: dict[str, list[tuple[str, Packed]]] = field(default_factory=dict)  # keys dropped, last state

    def affects(self, watches: Mapping[str, Sequence[str]]) -> bool:
        return any(topic in self.moved for topic in watches)

    def changes_for(
        self, watches: Mapping[str, Sequence[str]], tables: Mapping[str, StateTable], codecs: Mapping[str, Codec]
    ) -> list[Change]:
        """Delta mode: keys of gained partitions as puts, keys of lost ones as releases, sorted by key."""
        out: list[Change] = []
        for topic, prefixes in watches.items():
            codec, gained = codecs[topic], self.gained.get(topic, set())
            items: list[tuple[str, str, Packed]] = [
                ("release", key, packed)
                for key, packed in self.released.get(topic, [])
                if key.startswith(tuple(prefixes))
            ]
            if gained:
                items += [
                    ("put", k, v) for p in prefixes for k, v in tables[topic].under(p) if partition_of(v) in gained
                ]
            for op, key, packed in sorted(items, key=lambda item: item[1]):
                e = Entry.unpack(packed)
                if op == "put":
                    out.append(Change(topic, "put", key, codec.decode(e.value), None, e.offset, e.partition,
                                      e.timestamp, codec))  # fmt: skip
                else:
                    out.append(Change(topic, "release", key, None, packed, e.offset, e.partition, e.timestamp, codec))
        return out


class Fleet:
    """Group membership plus the partition lifecycle, driven from the engine task."""

    def __init__(
        self,
        kafka: KafkaSettings,
        group: GroupSettings,
        topics: Mapping[str, TopicSpec],
        metrics: Metrics,
        wakeup: Callable[[], None],
    ) -> None:
        self.group = group
        self._kafka = kafka
        self._metrics = metrics
        self._wakeup = wakeup
        self._partitioned = sorted(name for name, spec in topics.items() if spec.sharding == "partitioned")
        self.anchor = self._partitioned[0] if self._partitioned else min(topics)
        self._counts: dict[str, int] = {}
        self.slots: frozenset[int] | None = None  # partition numbers the group gave us (None: not yet)
        self.held: frozenset[int] | None = None  # partition numbers the tables hold
        self.revoking = False
        self._idle = asyncio.Event()  # set while the engine waits for the assignment, and once stopped
        self._wake = asyncio.Event()  # ends the engine's wait: set by an assignment or a stop request
        self._pending: Handover | None = None  # an interrupted handover, completed by the next one
        self._since: float | None = None  # when the running rebalance started
        self.rebalances = 0
        self.last_rebalance_s: float | None = None
        self._stopping = False
        self.membership: GroupMembership | None = None

    # -- set-up ---------------------------------------------------------------

    async def start(self, counts: Mapping[str, int]) -> None:
        """Check co-partitioning on the broker, then join the group."""
        self._counts = dict(counts)
        try:
            check_copartitioned({name: counts[name] for name in self._partitioned})
        except ValueError as exc:
            raise ConfigError("broker", "topics", str(exc)) from exc
        self.membership = GroupMembership(self._kafka, self.group, self.anchor, self._on_revoke, self._on_assign)
        await self.membership.start()
        log.info("joining group %s (anchor topic %s, partitioned: %s)", self.group.id, self.anchor,
                 ", ".join(self._partitioned) or "none")  # fmt: skip

    @property
    def stopping(self) -> bool:
        """The engine is stopping: it waits for no assignment, and takes none."""
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        if value:
            self._wake.set()

    async def stop(self) -> None:
        """After the engine task ended: let a revocation complete, leave the group."""
        self.stopping = True
        self._idle.set()  # a revocation waiting for the engine must not wait for a stopped one
        if self.membership is not None:
            await self.membership.stop()
            self.membership = None

    # -- the rebalance listener's side (aiokafka's coordination task) ---------

    async def _on_revoke(self) -> None:
        """Return once the engine delivers nothing: it waits for the next assignment, or has stopped."""
        if not self.stopping:  # a stopping engine takes no assignment: nothing to record, nobody to wake
            self._since = time.monotonic()
            if self.slots is None and self.held is None:
                return  # joining for the first time: nothing delivered yet
            self.revoking = True
            self._wake.clear()
            self._wakeup()
        await self._idle.wait()

    def _on_assign(self, slots: frozenset[int]) -> None:
        if slots != self.slots:
            log.info("group %s: assigned partitions %s (member %s)", self.group.id, _ranges(slots),
                     self.membership.member_id if self.membership else None)  # fmt: skip
        self.slots = slots
        self.revoking = False
        self._wake.set()
        self._wakeup()

    # -- the engine's side ------------------------------------------------------

    @property
    def rebalancing(self) -> bool:
        """Revoked and not yet assigned (or never assigned): the engine must deliver nothing."""
        return self.revoking or self.slots is None

    async def wait_assignment(self) -> None:
        """The engine delivers nothing now (the revocation may complete): wait for the assignment or a
        stop, at most ``HOLD_S``, so that the engine keeps stepping (``/healthz``, close requests)
        through a rebalance that takes long (a broker away)."""
        self._idle.set()
        try:
            async with asyncio.timeout(HOLD_S):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            if not self.stopping:  # delivering again: the next revocation waits until the engine is back here
                self._idle.clear()

    @property
    def moved(self) -> bool:
        """An assignment differs from what the tables hold, or an interrupted handover is still to be
        finished (the engine calls ``reassign``)."""
        if self.slots is None or self.held is None:
            return False
        return self.slots != self.held or self._pending is not None

    def select(self) -> Callable[[str, int], bool]:
        """Which partitions a full rebuild reads now (the current assignment); the tables will hold them."""
        self.held = slots = self.slots or frozenset()
        self._publish_owned()
        partitioned = set(self._partitioned)
        return lambda topic, p: topic not in partitioned or p in slots

    def check_rebalance(self) -> None:
        """Called during a full read: stop it when a rebalance starts (the group waits for us)."""
        if self.revoking:
            self.held = None  # the half-read tables hold nothing reliable
            raise Rebalancing()

    def owns(self, topic: str, partition: int) -> bool:
        """Whether this member acts for ``topic/partition`` (reads it, if partitioned; writes its feed)."""
        held = self.held or frozenset()
        return (partition % self._counts[self.anchor]) in held

    def handing_over(self, topic: str) -> bool:
        """Partitions of ``topic`` are being handed over (revoked and not yet assigned, or assigned and
        not yet read): its table may lack keys this member will own."""
        return (self.revoking or self.moved) and topic in self._partitioned

    def holds(self, topic: str, partition: int) -> bool:
        """Whether this member's table of ``topic`` has the keys of ``partition`` (replicated: all)."""
        return topic not in self._partitioned or partition in (self.held or frozenset())

    def moving(self) -> list[TopicPartition]:
        """The partitions the tables lose or gain in taking the current assignment over."""
        changed = (self.held or frozenset()) ^ (self.slots or frozenset())
        return [TopicPartition(t, p) for t in self._partitioned for p in sorted(changed) if p < self._counts[t]]

    def owned(self) -> dict[str, list[int]]:
        return {topic: [p for p in range(n) if self.owns(topic, p)] for topic, n in sorted(self._counts.items())}

    async def reassign(self, reader: TableReader, tables: dict[str, StateTable], ingest: Ingest) -> Handover | None:
        """Drop the lost partitions, read the gained ones; None if a new rebalance interrupted the read."""
        assert self.slots is not None and self.held is not None
        old, new = self.held, self.slots
        lost, gained = old - new, new - old
        log.info("group %s: rebalance: gained %s, lost %s, kept %s", self.group.id, _ranges(gained),
                 _ranges(lost), _ranges(old & new))  # fmt: skip
        handover, self._pending = self._pending or Handover(), None
        n_slots = self._counts[self.anchor]
        handover.moved |= {t for t, n in self._counts.items() if t in tables
                           and any(p % n_slots in lost | gained for p in range(n))}  # fmt: skip
        partitioned = {t for t in self._partitioned if t in tables}
        for topic in sorted(partitioned) if lost else ():
            dropped = _drop(tables[topic], lost)
            handover.released.setdefault(topic, []).extend(dropped)
            log.info("group %s: %s: released %d keys of partitions %s", self.group.id, topic, len(dropped),
                     _ranges(lost))  # fmt: skip
        self.held = old & new  # until the gained partitions are read
        counts = {t: n for t, n in self._counts.items() if t in tables}
        fresh = await reader.reassign(
            counts,
            lambda topic, p: topic not in partitioned or p in new,
            lambda topic, p: topic in partitioned and p in gained,
        )
        started = time.monotonic()
        if not await _read(reader, fresh, tables, ingest, lambda: self.revoking or self.stopping):
            for topic in partitioned:  # a half-read partition is no table: dropped, read again when regained
                _drop(tables[topic], gained)
            self._pending = handover
            log.info("group %s: a new rebalance interrupted the read of %s", self.group.id, _ranges(gained))
            return None
        for topic in partitioned:
            handover.gained.setdefault(topic, set()).update(gained)
            self._metrics.table_keys.labels(topic).set(len(tables[topic]))
        self.held = new
        self._publish_owned()
        log.info("group %s: read partitions %s in %.2fs", self.group.id, _ranges(gained), time.monotonic() - started)
        return handover

    def settled(self) -> None:
        """The plugins have been resynced after an assignment change: the rebalance is over."""
        self.rebalances += 1
        self._metrics.rebalances.inc()
        if self._since is not None:
            self.last_rebalance_s = time.monotonic() - self._since
            self._metrics.rebalance_seconds.set(self.last_rebalance_s)
            log.info("group %s: rebalance done in %.2fs", self.group.id, self.last_rebalance_s)
            self._since = None

    def status(self) -> dict[str, Any]:
        membership = self.membership
        return {
            "id": self.group.id,
            "member_id": membership.member_id if membership else None,
            "generation": membership.generation if membership else None,
            "anchor": self.anchor,
            "state": "rebalancing" if self.revoking or self.moved or self.slots is None else "stable",
            "owned": self.owned(),
            "rebalances": self.rebalances,
            "last_rebalance_seconds": self.last_rebalance_s,
        }

    def _publish_owned(self) -> None:
        for topic, parts in self.owned().items():
            self._metrics.owned_partitions.labels(topic).set(len(parts))


def _drop(table: StateTable, partitions: frozenset[int] | set[int]) -> list[tuple[str, Packed]]:
    """Remove the keys of ``partitions`` from ``table``; return them with their last state."""
    data = table.data
    dropped = [(key, packed) for key, packed in data.items() if partition_of(packed) in partitions]
    for key, _ in dropped:
        del data[key]
    if dropped:
        table.keys_changed()
    return dropped


async def _read(
    reader: TableReader,
    partitions: list[TopicPartition],
    tables: dict[str, StateTable],
    ingest: Ingest,
    interrupted: Callable[[], bool],
) -> bool:
    """Read ``partitions`` from their beginning to their current end, the others paused. False if interrupted."""
    if not partitions:
        return True
    consumer = reader.consumer
    others = [tp for tp in reader.partitions if tp not in set(partitions)]
    ends = await consumer.end_offsets(partitions)
    consumer.pause(*others)
    try:
        while await reader.behind(ends):
            if interrupted():
                return False
            batch = await reader.fetch(timeout_ms=200, max_records=REBUILD_MAX_RECORDS)
            await ingest.prepare(batch)
            for tp, records in batch.items():
                ingest.fold_all(tables[tp.topic], records)
        return True
    finally:
        consumer.resume(*others)


def _ranges(parts: Iterable[int]) -> str:
    """``0-3,7`` for logs."""
    out: list[str] = []
    for p in sorted(parts):
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out) or "none"
