"""The built-in ``changefeed`` plugin: a table's changes as change events on an outbound topic.

Kafka has no "previous value"; the state table has. Each change becomes a
Debezium-style envelope ``{op: c|u|d|r, key, before, after, source: {topic,
partition, offset}, ts_ms}`` (``ts_ms`` is the source record's timestamp),
encoded with the outbound topic's codec (``json``, or ``avro:NameChange``, the
envelope schema derived for every record schema ``Name``); after a delete,
optionally a tombstone so the outbound topic can be compacted too.

No gaps and no repeats across restarts: the envelopes and a checkpoint per
source partition (in a compacted ``<outbound>.checkpoints`` topic) are written
in one Kafka transaction. On restart the feed reads its checkpoints and emits,
through a replay of the source, exactly the changes after them. Consumers of
the outbound topic must read with ``isolation_level=read_committed``.

Each source partition has its own transactional producer (transactional id
``<base>-<topic>-<partition>``), created when the partition becomes this
instance's (the resync's ``positions``) and closed when it goes. Creating it
fences any other holder of that id, a previous owner still writing (a zombie),
and aborts its open transaction; the checkpoints are read after that, so the
new owner carries on exactly where the last committed write stopped. A producer
that fails (fenced, or the broker gone) is dropped; the failed change makes the
engine resync the feed, which creates it again.

    plugins:
      - name: interfaces-feed
        class: datasync.changefeed:Changefeed
        settings: {publisher: interface-changes, tombstones: true, snapshot: false}
        watch: [{topic: demo.interfaces}]
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from contextlib import aclosing
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from datasync.admin import prepare_topics
from datasync.api import Change, ChangeEvent, Plugin, PluginContext, Replay, ResyncEvent
from datasync.bindings import TopicName, TopicSpec
from datasync.codecs import AvroCodec, Codec, JsonCodec
from datasync.confluent import RegistryCodec
from datasync.conform import conform
from datasync.errors import EncodeError
from datasync.publish import Publisher
from datasync.schemas import Schema
from datasync.settings import KafkaSettings

Partition = tuple[str, int]


class ChangefeedSettings(BaseModel):
    """The changefeed's ``settings:``; validated by ``check`` and ``run`` before connecting."""

    model_config = ConfigDict(extra="forbid")

    publisher: str = Field(description="the publisher whose topic receives the envelopes")
    tombstones: bool = Field(default=True, description="a tombstone after each 'd' envelope")
    snapshot: bool = Field(default=False, description="on the very first start, 'r' for every existing key")
    checkpoint_topic: TopicName | None = Field(default=None, description="default <outbound topic>.checkpoints")
    transactional_id: str | None = Field(default=None, description="default datasync-changefeed-<plugin name>")

    @field_validator("publisher")
    @classmethod
    def _publisher_fits(cls, publisher: str, info: ValidationInfo) -> str:
        context = info.context or {}
        publishers: dict[str, str] = context.get("publishers", {})
        if "publishers" in context and publisher not in publishers:
            raise ValueError(f"unknown publisher {publisher!r} (declared: {', '.join(publishers) or 'none'})")
        topic = publishers.get(publisher)
        if topic is not None and topic in context.get("watches", {}):
            raise ValueError(f"{publisher!r} writes to {topic}, which this feed watches (it would feed on itself)")
        codecs: dict[str, Codec] = context.get("codecs", {})
        if topic in codecs:
            unfit = envelopes_unfit(codecs[topic], [codecs[t] for t in context.get("watches", {}) if t in codecs])
            if unfit:
                raise ValueError(f"{publisher!r} writes to {topic} (value: {codecs[topic].spec}), {unfit}")
        return publisher


# What every envelope holds whatever the values: a codec that cannot encode this cannot encode any.
_ENVELOPE = {"op": "d", "key": "", "before": None, "after": None, "source": {"topic": "", "partition": 0,
             "offset": 0}, "ts_ms": 0}  # fmt: skip


def envelopes_unfit(out: Codec, sources: list[Codec]) -> str | None:
    """Why ``out`` cannot encode the envelopes of the ``sources``' changes, where that is certain beforehand.

    JSON holds envelopes of (almost) any value; ``string`` and ``bytes`` hold none, nor does an Avro
    schema that is not an envelope's; an envelope schema holds values of the types its ``after`` names.
    Values of an untyped source (json, avro, registry) may fit or not: only they can tell.
    """
    if isinstance(out, JsonCodec) and out.schema is None:
        return None
    kind = "registry" if isinstance(out, RegistryCodec) else "avro"
    hint = f"use value: json or {kind}:NAMEChange (NAME: the watched topic's schema)"
    no_envelopes = f"which cannot hold change envelopes: {hint}"
    schema = _schema(out)
    if schema is None:  # string, bytes
        return no_envelopes
    try:
        conform(_ENVELOPE, schema)
    except EncodeError:
        return no_envelopes
    if not (isinstance(schema.parsed, dict) and schema.parsed["type"] == "record"):  # a union: left to the values
        return None
    after = next(field["type"] for field in schema.parsed["fields"] if field["name"] == "after")
    held = {
        b if isinstance(b, str) else b.get("name", b["type"]) for b in (after if isinstance(after, list) else [after])
    }
    missing = sorted({t for t in map(_value_type, sources) if t is not None} - held)
    return f"whose envelopes cannot hold {', '.join(missing)} values: {hint}" if missing else None


def _schema(codec: Codec) -> Schema | None:
    """The Avro schema every value of ``codec`` matches, if it has one (avro:, registry: and json:NAME)."""
    if isinstance(codec, AvroCodec | RegistryCodec):
        return codec.reader
    return codec.schema if isinstance(codec, JsonCodec) else None


def _value_type(codec: Codec) -> str | None:
    """The Avro type name of every value of ``codec``, if it has one."""
    schema = _schema(codec)
    if schema is not None:
        return schema.fullname
    return codec.spec if codec.spec in ("string", "bytes") else None


class Changefeed(Plugin):
    resync_after_failed_change = True  # a skipped change would be a gap: catch up through a resync instead
    Settings = ChangefeedSettings

    async def start(self, ctx: PluginContext) -> None:
        context = {"publishers": {n: p.topic for n, p in ctx.publishers.items()}, "watches": ctx.watches}
        settings = ChangefeedSettings.model_validate(dict(ctx.settings), context=context)
        self.log = ctx.logger
        self.out: Publisher = ctx.publisher(settings.publisher)
        self.tombstones = settings.tombstones
        self.snapshot = settings.snapshot
        self.kafka: KafkaSettings = ctx.kafka
        assert ctx.replay is not None, "the changefeed needs the engine's replay"
        self.replay: Replay = ctx.replay
        self.watches = {topic: tuple(prefixes) for topic, prefixes in ctx.watches.items()}
        self.checkpoint_topic = settings.checkpoint_topic or f"{self.out.topic}.checkpoints"
        spec = TopicSpec(name=self.checkpoint_topic, partitions=1, compacted=True)
        await prepare_topics(self.kafka, [spec], create=True)
        self.transactional_id = settings.transactional_id or f"datasync-changefeed-{ctx.name}"
        self.producers: dict[Partition, AIOKafkaProducer] = {}  # per owned source partition
        self.broken: set[Partition] = set()  # owned, but the producer failed: a resync must replace it
        self.emitted: dict[Partition, int] = {}  # per source partition: the next offset to emit

    async def stop(self) -> None:
        await self._close(set(self.producers))

    async def resync(self, event: ResyncEvent) -> None:
        """Own the snapshot's partitions, catch up from their checkpoints, then carry on from the snapshot."""
        await self._close(set(self.producers) - set(event.positions))
        self.broken.clear()
        for p in sorted(set(event.positions) - set(self.producers)):
            # Starting a producer with this id fences any other holder and aborts its open transaction.
            producer = AIOKafkaProducer(
                **self.kafka.client_options(), transactional_id=f"{self.transactional_id}-{p[0]}-{p[1]}"
            )
            await producer.start()
            self.producers[p] = producer
        self.emitted, ends = await self._read_checkpoints(list(event.positions))
        for p in event.positions:
            # Past the snapshot but not past the end: another member emitted further; those changes are
            # skipped as they arrive. Past the end: the source topic was recreated, its offsets started again.
            if self.emitted.get(p, 0) > ends[p]:
                self.log.warning(
                    "checkpoint of %s/%d is past its end (%d > %d): starting afresh", *p, self.emitted[p], ends[p]
                )
                del self.emitted[p]
        todo = {p: n for p, n in event.positions.items() if self.emitted.get(p, n) < n}
        if todo:
            start = {p: self.emitted.get(p, n) for p, n in event.positions.items()}
            async with aclosing(self.replay(start, event.positions)) as batches:
                async for changes in batches:
                    watched = [c for c in changes if c.key.startswith(self.watches.get(c.topic, ()))]
                    await self._emit([self._envelope(c) for c in watched], watched, {})
            self.log.info("caught up %d partition(s) from their checkpoints", len(todo))
        fresh = {p for p in event.positions if p not in self.emitted}
        if fresh and self.snapshot:
            envelopes = [self._snapshot(kv.topic, kv.partition, kv.revision, kv.key, kv.value, kv.timestamp)
                         for items in event.values.values() for kv in items
                         if (kv.topic, kv.partition) in fresh]  # fmt: skip
            self.log.info("snapshot of %d keys", len(envelopes))
            await self._emit(envelopes, [], {p: event.positions[p] for p in fresh})
        await self._emit([], [], dict(event.positions))  # everything before the snapshot is done

    async def change(self, event: ChangeEvent) -> None:
        broken = sorted({(c.topic, c.partition) for c in event.changes} & self.broken)
        if broken:  # failing makes the engine resync this feed (resync_after_failed_change), which replaces it
            raise RuntimeError(f"no producer for {', '.join(f'{t}/{p}' for t, p in broken)} (fenced or failed)")
        # Only owned partitions (another member writes the rest); a change at or before the checkpoint was
        # emitted already (by the catch-up or a committed retry).
        todo = [c for c in event.changes if (c.topic, c.partition) in self.producers
                and c.revision >= self.emitted.get((c.topic, c.partition), 0)]  # fmt: skip
        await self._emit([self._envelope(c) for c in todo], todo, {})

    def _envelope(self, change: Change) -> list[tuple[str, Any]]:
        if change.op == "delete":
            op, before, after = "d", change.prev_value, None
        else:
            op, before, after = ("c" if change.prev_revision is None else "u"), change.prev_value, change.value
        source = {"topic": change.topic, "partition": change.partition, "offset": change.revision}
        value = {"op": op, "key": change.key, "before": before, "after": after, "source": source,
                 "ts_ms": change.timestamp}  # fmt: skip
        out: list[tuple[str, Any]] = [(change.key, value)]
        if op == "d" and self.tombstones:
            out.append((change.key, None))
        return out

    def _snapshot(
        self, topic: str, partition: int, offset: int, key: str, value: Any, ts: int
    ) -> list[tuple[str, Any]]:
        source = {"topic": topic, "partition": partition, "offset": offset}
        return [(key, {"op": "r", "key": key, "before": None, "after": value, "source": source, "ts_ms": ts})]

    async def _emit(
        self, envelopes: Iterable[list[tuple[str, Any]]], changes: list[Change], positions: dict[Partition, int]
    ) -> None:
        """Send the envelopes and the new checkpoints: one transaction per source partition."""
        records: dict[Partition, list[tuple[bytes, bytes | None]]] = {}
        for envelope in envelopes:  # an envelope, maybe followed by a tombstone of the same key
            source = envelope[0][1]["source"]
            out = records.setdefault((source["topic"], source["partition"]), [])
            out += [(key.encode(), None if v is None else self.out.codec.encode(v)) for key, v in envelope]
        done = dict(positions)
        for c in changes:
            done[(c.topic, c.partition)] = max(done.get((c.topic, c.partition), 0), c.revision + 1)
        done = {p: n for p, n in done.items() if p not in self.emitted or n > self.emitted[p]}
        todo = sorted(set(records) | set(done))
        results = await asyncio.gather(*(self._commit(p, records.get(p, []), done.get(p)) for p in todo),
                                       return_exceptions=True)  # fmt: skip
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _commit(self, p: Partition, records: list[tuple[bytes, bytes | None]], checkpoint: int | None) -> None:
        producer = self.producers[p]
        try:
            async with producer.transaction():
                for key, value in records:
                    (await producer.send(self.out.topic, value, key=key)).add_done_callback(_retrieved)
                if checkpoint is not None:
                    value = json.dumps({"offset": checkpoint}).encode()
                    sent = await producer.send(self.checkpoint_topic, value, key=f"{p[0]}/{p[1]}".encode())
                    sent.add_done_callback(_retrieved)
        except Exception:
            # Fenced (another member took the partition) or broken: never reuse it. The resync that
            # follows the failed change creates a new one if this instance still owns the partition.
            await self._close({p})
            self.broken.add(p)
            raise
        if checkpoint is not None:
            self.emitted[p] = checkpoint

    async def _close(self, partitions: set[Partition]) -> None:
        for p in sorted(partitions):
            producer = self.producers.pop(p, None)
            if producer is not None:
                try:
                    await producer.stop()
                except Exception as exc:  # a fenced producer may fail to close cleanly; it is gone either way
                    self.log.warning("closing the producer of %s/%d: %r", *p, exc)

    async def _read_checkpoints(self, sources: list[Partition]) -> tuple[dict[Partition, int], dict[Partition, int]]:
        """The checkpoints, and the end offsets of the ``sources`` partitions."""
        consumer = AIOKafkaConsumer(
            **self.kafka.client_options(), enable_auto_commit=False, isolation_level="read_committed"
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.checkpoint_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            found: dict[Partition, int] = {}
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    if record.key is None:
                        continue
                    topic, _, partition = record.key.decode().rpartition("/")
                    if record.value is None:
                        found.pop((topic, int(partition)), None)
                    else:
                        found[(topic, int(partition))] = int(json.loads(record.value)["offset"])
            source_ends = await consumer.end_offsets([TopicPartition(*p) for p in sources])
            return found, {(tp.topic, tp.partition): n for tp, n in source_ends.items()}
        finally:
            await consumer.stop()


def _retrieved(sent: asyncio.Future[Any]) -> None:
    """A send's own outcome: the transaction's commit reports failures; this keeps asyncio quiet about them."""
    if not sent.cancelled():
        sent.exception()
