"""Membership of a Kafka consumer group: which partition numbers this instance owns.

Kafka's group protocol is the coordinator: the live members of the group share
the partitions of one *anchor* topic, moved by aiokafka's sticky assignor (as
few as possible per rebalance) when a member joins, leaves or stops
heartbeating. Its consumer only takes part in the group; it never hands out
records (its partitions stay paused): the tables are read by the engine's own
reader, from the partitions this membership says are owned.

The rebalance listener runs inside aiokafka's coordination task. Revocation
waits until the engine has stopped delivering (``on_revoke``), so no change of
a partition is delivered once another member may own it; assignment only
records the new share (``on_assign``), the engine reads it in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from datasync.settings import GroupSettings, KafkaSettings

log = logging.getLogger("datasync.group")

# How long the idle group consumer waits per poll: it must poll, or aiokafka leaves the group.
POLL_MS = 1000


class GroupMembership:
    def __init__(
        self,
        kafka: KafkaSettings,
        group: GroupSettings,
        anchor: str,
        on_revoke: Callable[[], Awaitable[None]],
        on_assign: Callable[[frozenset[int]], None],
    ) -> None:
        assert group.id is not None
        self.group_id = group.id
        self.anchor = anchor
        self._kafka = kafka
        self._group = group
        self._on_revoke = on_revoke
        self._on_assign = on_assign
        self._consumer: AIOKafkaConsumer | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def member_id(self) -> str | None:
        """The id the group coordinator gave this member (None before joining)."""
        if self._consumer is None:
            return None
        coordinator = getattr(self._consumer, "_coordinator", None)  # aiokafka has no public accessor
        member: str | None = getattr(coordinator, "member_id", None)
        return member or None

    @property
    def generation(self) -> int:
        coordinator = getattr(self._consumer, "_coordinator", None)
        return int(getattr(coordinator, "generation", -1))

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            **self._kafka.client_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            partition_assignment_strategy=(StickyPartitionAssignor,),
            session_timeout_ms=self._group.session_timeout_ms,
            heartbeat_interval_ms=self._group.heartbeat_interval_ms,
            rebalance_timeout_ms=self._group.rebalance_timeout_ms,
        )
        await consumer.start()
        self._consumer = consumer
        consumer.subscribe([self.anchor], listener=_Listener(self))
        self._poller = asyncio.create_task(self._poll(consumer), name="datasync-group-poll")

    async def stop(self) -> None:
        """Leave the group at once (a LeaveGroup request: no wait for the session timeout)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
            log.info("left group %s", self.group_id)

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        """Keep polling (paused partitions: nothing is fetched) so aiokafka keeps this member in the group."""
        while True:
            try:
                await consumer.getmany(timeout_ms=POLL_MS)
            except Exception as exc:  # the group consumer reports group errors here; it recovers by itself
                log.warning("group %s: %r", self.group_id, exc)
                await asyncio.sleep(POLL_MS / 1000)

    async def _revoked(self) -> None:
        await self._on_revoke()

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        if self._consumer is not None and assigned:
            self._consumer.pause(*assigned)  # the group consumer reads nothing itself
        self._on_assign(frozenset(tp.partition for tp in assigned if tp.topic == self.anchor))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, membership: GroupMembership) -> None:
        self._membership = membership

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._membership._revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._membership._assigned(assigned)
