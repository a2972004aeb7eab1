"""Local snapshots of the state tables: a restart loads them and reads only what came after.

Per (topic, partition), so an instance can save and load exactly the partitions it owns. A
snapshot is used only when it is provably right; otherwise that partition is read from the
beginning, with one log line saying why:

- the file is whole (lengths, CRC-32) and of this format version;
- it was written for these bindings: topic, partition count, codec identity (spec, schema
  fingerprints, ``max_value_bytes``);
- log start offset <= its position <= end offset (records deleted, a topic recreated shorter);
- its probe (one record it holds) is not replaced by another record at the same offset (a topic
  recreated and refilled past the position);
- it is younger than the topic's ``delete.retention.ms``, counted from ``since``: the last
  time the partition was seen read to its end at or below the position. Every record after
  the position was appended after that, so a tombstone among them is still in the log.

Writing (after a rebuild once the plugins resynced, every ``interval_s``, at shutdown) never
pauses the engine for long and never copies the table: the positions are taken between two
engine steps, then the entries are encoded a thousand keys at a time on the loop while the
engine runs, and a thread writes them. Values read later than the positions are newer than
those positions say, and keys deleted since are missing; that is harmless, because loading
replays every record from the positions on and folding a record twice gives the same state
(the table ends equal to a full read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from datasync.admin import delete_retention_ms
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, Codec, JsonCodec
from datasync.confluent import RegistryCodec, prepare_decode
from datasync.metrics import Metrics
from datasync.reader import TableReader
from datasync.settings import KafkaSettings, SnapshotSettings
from datasync.snapshotfile import (
    TMP_SUFFIX,
    Header,
    SnapshotError,
    SnapshotReader,
    SnapshotWriter,
    encode_block,
    path_of,
    read_header,
)
from datasync.table import Entry, Packed, StateTable, partition_of

log = logging.getLogger("datasync.snapshot")

CHUNK_KEYS = 1024  # keys encoded per step on the event loop (a fraction of a millisecond)
LOOP_SHARE = 0.25  # at most this share of the event loop's time goes to encoding a snapshot
BLOCK_ENTRIES = 4096  # entries per block of a file: fewer blocks make loading faster
FLUSH_BYTES = 4 << 20  # encoded bytes handed to the writing thread at once
BROKER_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 5.0  # longest wait for the probe records
PROBE_SCAN_KEYS = 4096  # a partition with no key among the first ones gets no probe
T = TypeVar("T")


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn`` in a thread; if cancelled meanwhile, wait for the thread (it cannot be stopped) first,
    so that cleaning up never races with a write still running."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and (exc := future.exception()) is not None:  # nobody else will look
            log.warning("a snapshot file operation failed after its write was cancelled: %r", exc)
        raise


def codec_identity(codec: Codec, max_value_bytes: int | None) -> str:
    """What decides which records a table accepts: a snapshot is only valid for the same."""
    parts = [codec.spec, f"max_value_bytes={max_value_bytes}"]
    if isinstance(codec, AvroCodec | RegistryCodec) and codec.reader is not None:
        parts.append(f"reader={codec.reader.fingerprint.hex()}")
    if isinstance(codec, AvroCodec):
        parts.append("writers=" + ",".join(fp.hex() for fp in codec.writer_fingerprints))
    elif isinstance(codec, JsonCodec) and codec.schema is not None:
        parts.append(f"schema={codec.schema.fingerprint.hex()}")
    return " ".join(parts)  # a registry's writer schemas never change under their ids


@dataclass
class _Job:
    """One topic's snapshot: the positions taken between two engine steps; its keys."""

    table: StateTable
    partitions: int
    positions: dict[int, int]
    since: dict[int, float]
    taken: float  # unix time
    keys: Sequence[str] | None = None  # the keys to write, if not those of the table as it goes


class Snapshots:
    """Saves and loads the snapshots of the tables read by one engine, in ``directory``."""

    def __init__(
        self,
        directory: Path,
        settings: SnapshotSettings,
        kafka: KafkaSettings,
        metrics: Metrics,
        topics: dict[str, TopicSpec],
        codecs: dict[str, Codec],
    ) -> None:
        self.directory = directory
        self.settings = settings
        self._kafka = kafka
        self._metrics = metrics
        self._codecs = {name: codec_identity(codecs[name], spec.max_value_bytes) for name, spec in topics.items()}
        self._decoders = {name: codecs[name] for name in topics}
        self._since: dict[TopicPartition, float] = {}
        self._after_rebuild = False
        self._last_write = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.loaded: dict[str, dict[str, Any]] = {name: {"from": "full read"} for name in topics}

    # -- loading ---------------------------------------------------------------

    async def restore(
        self,
        reader: TableReader,
        tables: dict[str, StateTable],
        ends: dict[TopicPartition, int],
        since: float,
        interned: bool,
    ) -> None:
        """For every partition the reader is assigned (those this instance owns), load its snapshot
        into ``tables`` (fresh, empty) if it is valid and seek the partition to its position; the
        others stay at the beginning. ``ends`` are the end offsets the rebuild reads up to, taken
        after the wall time ``since``; ``interned``: whether the rebuild interns the tables' keys."""
        await self.cancel()  # a write still running belongs to the tables being replaced
        self._since = {tp: since for tp in reader.partitions}
        self._after_rebuild = self.settings.after_rebuild
        self._last_write = time.monotonic()
        reader.consumer.pause(*reader.partitions)  # no fetching from offset 0 while snapshots load
        try:
            for topic in tables:
                await asyncio.to_thread(self._discard_unfinished, topic)
            headers, rejected = await self.check_partitions(reader.consumer, reader.partitions, reader.counts, ends)
            for topic, table in tables.items():
                owned = sorted((tp for tp in reader.partitions if tp.topic == topic), key=lambda tp: tp.partition)
                loading = time.perf_counter()
                for tp in owned:
                    if tp not in headers:
                        continue
                    try:
                        await self.load_partition(table, headers[tp], interned)
                    except SnapshotError as exc:
                        if not exc.partial:
                            rejected[tp] = exc
                            continue
                        table.data.clear()  # it holds part of a snapshot: read the whole topic instead
                        table.keys_changed()
                        rejected.update((other, exc) for other in owned)
                        break
                loaded = [tp for tp in owned if tp not in rejected]
                for tp in loaded:
                    reader.consumer.seek(tp, headers[tp].position)
                self._report(topic, table, owned, headers, rejected, time.perf_counter() - loading)
        finally:
            reader.consumer.resume(*reader.partitions)

    async def check_partitions(
        self,
        consumer: AIOKafkaConsumer,
        partitions: list[TopicPartition],
        counts: dict[str, int],
        ends: dict[TopicPartition, int],
    ) -> tuple[dict[TopicPartition, Header], dict[TopicPartition, SnapshotError]]:
        """The snapshots of ``partitions`` that may be loaded (their headers), and why the others
        may not. Everything but the file's checksum is checked here: bindings (``counts``: the
        topics' partition counts on the broker, whichever of them this instance owns), offsets
        against the log (``ends``, and the log start offsets now), age against
        ``delete.retention.ms``, probe."""
        starts: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
        topics = sorted({tp.topic for tp in partitions})
        try:
            retention = await delete_retention_ms(self._kafka, topics)
        except KafkaError as exc:
            log.warning("delete.retention.ms not readable (%r): snapshots cannot be checked", exc)
            retention = {}
        headers: dict[TopicPartition, Header] = {}
        rejected: dict[TopicPartition, SnapshotError] = {}
        for tp in partitions:
            path = path_of(self.directory, tp.topic, tp.partition)
            expected = Header(tp.topic, tp.partition, counts[tp.topic], self._codecs[tp.topic], 0, 0, 0)
            try:
                header = await asyncio.to_thread(_header_of, path)
                check(header, expected, starts[tp], ends[tp], retention.get(tp.topic), time.time())
                headers[tp] = header
            except SnapshotError as exc:
                rejected[tp] = exc
        for tp, error in (await probe(self._kafka, headers)).items():
            rejected[tp] = error
            del headers[tp]
        return headers, rejected

    async def load_partition(self, table: StateTable, header: Header, interned: bool) -> None:
        """Add the entries of the snapshot ``header`` came from to ``table``, after checking the
        file's checksum. Raises SnapshotError with the table untouched unless it says ``partial``.
        Keys are interned if ``interned``, by the same rule as a full read's (see ingest.py).

        The checksum pass runs in a thread; the entries are added on the loop a block at a time,
        so that the table is built by the same thread as by a full read (and its memory is too).
        A registry codec loads the writer schemas of each block first: decoding a value needs its
        schema loaded, and only records fetched from Kafka are prepared otherwise.
        """
        codec = self._decoders[header.topic]
        path = path_of(self.directory, header.topic, header.partition)
        try:
            reader = await asyncio.to_thread(SnapshotReader, path)
        except OSError as exc:
            raise SnapshotError("unreadable", str(exc)) from exc
        with reader:
            try:
                if await asyncio.to_thread(reader.verify) != header:
                    raise SnapshotError("changed", "the file was replaced while it was read")
                data = table.data
                for block in reader.blocks():
                    if isinstance(codec, RegistryCodec):  # its prefix check and id slice work on packed values
                        await prepare_decode(codec, block.values())
                    block.fill(data, interned)  # ~2 ms in C for 4096 entries (more when the dict grows)
                    await asyncio.sleep(0)
            except OSError as exc:
                raise SnapshotError("unreadable", str(exc), partial=True) from exc

    def _report(
        self,
        topic: str,
        table: StateTable,
        owned: list[TopicPartition],
        headers: dict[TopicPartition, Header],
        rejected: dict[TopicPartition, SnapshotError],
        seconds: float,
    ) -> None:
        """One log line per snapshot not used, one for the table; status and metrics. ``seconds``:
        how long loading the files took (checksums included)."""
        states: dict[str, Any] = {}
        for tp in owned:
            error = rejected.get(tp)
            if error is None:
                header = headers[tp]
                states[str(tp.partition)] = {
                    "from": "snapshot", "position": header.position, "written_ms": header.written_ms,
                }  # fmt: skip
                continue
            states[str(tp.partition)] = {"from": "full read", "reason": str(error)}
            if error.reason != "missing":
                self._metrics.snapshot_rejected.labels(topic, error.reason).inc()
                log.warning("snapshot of %s/%d not used: %s: reading it from the beginning", topic, tp.partition, error)
        used = sum(1 for state in states.values() if state["from"] == "snapshot")
        if used:
            table.keys_changed()
            log.info("table %s: %d of %d partitions loaded from snapshots (%d keys) in %.2fs, reading on from there",
                     topic, used, len(states), len(table), seconds)  # fmt: skip
        source = "snapshot" if used == len(states) else "full read" if not used else "snapshot and full read"
        self.loaded[topic] = {"from": source, "partitions": states, "seconds": round(seconds, 3)}
        self._metrics.snapshot_partitions_loaded.labels(topic).set(used)
        self._metrics.snapshot_load_seconds.labels(topic).set(seconds)

    def _discard_unfinished(self, topic: str) -> None:
        """Remove temporary files a killed process left (a write that never finished)."""
        directory = self.directory / topic
        if not directory.is_dir():
            return
        for tmp in directory.glob(f"*{TMP_SUFFIX}"):
            log.warning("removing %s: a snapshot write was interrupted (the previous snapshot, if any, is intact)",
                        tmp)  # fmt: skip
            try:
                tmp.unlink(missing_ok=True)
            except OSError as exc:  # a read-only directory: loading goes on, writing will fail and be counted
                log.warning("cannot remove %s: %s", tmp, exc.strerror or exc)

    def describe(self, topic: str) -> dict[str, Any]:
        """How the table of ``topic`` was loaded by the last rebuild (for ``/v1/status``)."""
        return self.loaded.get(topic, {"from": "full read"})

    # -- saving ----------------------------------------------------------------

    @property
    def writing(self) -> bool:
        """A snapshot is being written in the background."""
        return self._task is not None and not self._task.done()

    def due(self, quiet: bool) -> bool:
        """Whether to save now; ``quiet``: the tables are complete and no plugin is resyncing."""
        if self._task is not None and self._task.done():
            self._task = None  # the last write ended (its failures are logged and counted)
        if not quiet or self._task is not None:
            return False
        if self._after_rebuild:
            return True
        interval = self.settings.interval_s
        return interval > 0 and time.monotonic() - self._last_write >= interval

    async def save(self, reader: TableReader, tables: dict[str, StateTable]) -> None:
        """Take the positions now (between two engine steps) and write in the background."""
        jobs = await self._freeze(reader, tables)
        self._task = asyncio.create_task(self._write(jobs, LOOP_SHARE), name="datasync-snapshot")

    async def close(self, reader: TableReader | None, tables: dict[str, StateTable], final: bool) -> None:
        """At shutdown: drop a write in progress, then (``final``) write the tables as they are."""
        await self.cancel()
        if final and reader is not None and self.settings.on_shutdown:
            jobs = await self._freeze(reader, tables)
            for job in jobs:  # sorted keys make the next load cheaper; nothing else runs now
                job.keys = await asyncio.to_thread(sorted, job.table.data)
            await self._write(jobs, loop_share=1.0)  # the engine has stopped: no need to leave it time

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """These partitions changed owner (lost, or gained and being read): no snapshot of them is
        written until one is seen read to its end again. Cancel the write in progress first."""
        for tp in partitions:
            self._since.pop(tp, None)

    async def cancel(self) -> None:
        """Stop the write in progress; the files it had not finished are discarded."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _freeze(self, reader: TableReader, tables: dict[str, StateTable]) -> list[_Job]:
        self._after_rebuild = False
        self._last_write = time.monotonic()
        taken = time.time()
        try:  # a partition read to its end now moves its "since" to now
            async with asyncio.timeout(BROKER_TIMEOUT_S):
                ends: dict[TopicPartition, int] = await reader.consumer.end_offsets(reader.partitions)
        except (KafkaError, TimeoutError) as exc:
            log.info("end offsets not known (%r): snapshots keep their previous age", exc)
            ends = {}
        positions = await reader.positions()
        for tp, position in positions.items():
            if tp in ends and position >= ends[tp]:
                self._since[tp] = taken
        jobs = []
        for topic, table in tables.items():
            owned = [tp for tp in positions if tp.topic == topic and tp in self._since]
            jobs.append(_Job(
                table, reader.counts[topic], {tp.partition: positions[tp] for tp in owned},
                {tp.partition: self._since[tp] for tp in owned}, taken,
            ))  # fmt: skip
        return jobs

    async def _write(self, jobs: list[_Job], loop_share: float) -> None:
        for job in jobs:
            topic = job.table.topic
            try:
                try:
                    size, entries = await self._write_topic(job, loop_share)
                except _KeysChanged:  # list the keys now (one long step) and write them from the start
                    log.info("snapshot of %s: keys added or removed during the write: starting over", topic)
                    job.keys = tuple(job.table.data)
                    size, entries = await self._write_topic(job, loop_share)
            except OSError as exc:
                self._metrics.snapshot_write_failures.labels(topic).inc()
                log.warning("snapshot of %s not written: %s (going on without it)", topic, exc)
                continue
            except Exception:  # a bug must not end the service: it only costs this snapshot
                self._metrics.snapshot_write_failures.labels(topic).inc()
                log.exception("snapshot of %s not written", topic)
                continue
            took = time.time() - job.taken
            self._metrics.snapshot_bytes.labels(topic).set(size)
            self._metrics.snapshot_write_seconds.labels(topic).set(took)
            self._metrics.snapshot_taken[topic] = job.taken
            log.info("snapshot of %s written: %d keys, %d bytes, in %.2fs", topic, entries, size, took)

    async def _write_topic(self, job: _Job, loop_share: float) -> tuple[int, int]:
        """Encode the entries a chunk of keys at a time on the loop; a thread writes the bytes.
        Returns the size and the entries written."""
        topic = job.table.topic
        taken_ms = int(job.taken * 1000)
        probes = _probes(job.table, len(job.positions))
        since_ms = {p: int(since * 1000) for p, since in job.since.items()}
        writers = {
            p: SnapshotWriter(
                path_of(self.directory, topic, p),
                Header(topic, p, job.partitions, self._codecs[topic], position, since_ms[p], taken_ms, probes.get(p)),
            )
            for p, position in job.positions.items()
        }
        parts = {p: _Partition(writer) for p, writer in writers.items()}
        try:
            for writer in writers.values():
                await _blocking(writer.open)
            data = job.table.data
            for step in _steps(job.table, job.keys):
                began = time.perf_counter()
                for key in step:
                    packed = data.get(key)
                    if packed is None:  # deleted since: the replay from the position deletes it too
                        continue
                    target = parts.get(partition_of(packed))
                    if target is not None:  # else a partition this instance does not own
                        target.keys.append(key)
                        target.values.append(packed)
                for target in parts.values():
                    if len(target.keys) >= BLOCK_ENTRIES:
                        target.seal()
                    if target.size >= FLUSH_BYTES:
                        await target.flush()
                # Let the engine run between chunks, for at least as long as the chunk took: a
                # snapshot must not starve change delivery, however long it takes to write.
                await asyncio.sleep((time.perf_counter() - began) * (1 - loop_share) / loop_share)
            for p, target in parts.items():
                target.seal()
                await target.flush()
                if TopicPartition(topic, p) not in self._since:  # forgotten meanwhile: its keys may be gone
                    log.info("snapshot of %s/%d not written: the partition changed owner meanwhile", topic, p)
                    await _blocking(target.writer.discard)
                    del writers[p]
                    continue
                await _blocking(target.writer.finish)
        except BaseException:
            for writer in writers.values():
                await _blocking(writer.discard)
            raise
        return sum(w.size for w in writers.values()), sum(w.entries for w in writers.values())


@dataclass
class _Partition:
    """One partition's file being written: entries staged for the next block, blocks for the thread."""

    writer: SnapshotWriter
    keys: list[str] = field(default_factory=list)
    values: list[Packed] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    entries: int = 0  # in ``pieces``
    size: int = 0  # bytes in ``pieces``

    def seal(self) -> None:
        """The staged entries become a block."""
        if self.keys:
            block = encode_block(self.keys, self.values)
            self.pieces.extend(block)
            self.size += sum(map(len, block))
            self.entries += len(self.keys)
            self.keys, self.values = [], []

    async def flush(self) -> None:
        """Hand the blocks to a thread, which checksums and writes them."""
        pieces, entries = self.pieces, self.entries
        self.pieces, self.entries, self.size = [], 0, 0
        await _blocking(self.writer.append, pieces, entries)


class _KeysChanged(Exception):
    """A key was added to or removed from the table while a write walked its dict."""


def _steps(table: StateTable, keys: Sequence[str] | None) -> Iterator[Sequence[str]]:
    """The keys to write, ``CHUNK_KEYS`` at a time (the caller lets the engine run between steps):
    ``keys`` if given, else the table's cached sorted order, else the table's own keys as it goes.

    No list of a million keys is made: taking one stops the loop for ~25 ms, and the garbage
    collector scans it again (~25 ms). Iterating the table's dict across steps is safe while no
    key is added or removed (``key_version``); if one is, ``_KeysChanged`` is raised, and the
    write starts over from a list of the keys taken then.
    """
    keys = keys if keys is not None else table.cached_order()
    if keys is None:
        version, data = table.key_version, iter(table.data)
        while step := tuple(islice(data, CHUNK_KEYS)):
            yield step
            if len(step) < CHUNK_KEYS:
                return  # that was the last: later changes are replayed from the positions anyway
            if table.key_version != version:
                raise _KeysChanged()
        return
    for n in range(0, len(keys), CHUNK_KEYS):
        yield keys[n : n + CHUNK_KEYS]


def _probes(table: StateTable, partitions: int) -> dict[int, tuple[int, int, str]]:
    """One record per partition the snapshot holds (offset, timestamp, key), from the first keys."""
    found: dict[int, tuple[int, int, str]] = {}
    for n, (key, packed) in enumerate(table.data.items()):
        entry = Entry.unpack(packed)
        found.setdefault(entry.partition, (entry.offset, entry.timestamp, key))
        if len(found) >= partitions or n >= PROBE_SCAN_KEYS:
            break  # a partition with no key among the first ones goes without a probe
    return found


async def probe(kafka: KafkaSettings, headers: dict[TopicPartition, Header]) -> dict[TopicPartition, SnapshotError]:
    """Read each snapshot's probe record (one record it holds) from the log: where a record is at
    that offset and it is another one, the topic was recreated (and refilled past the position).
    Where compaction removed it (the next record has a higher offset), nothing can be told.

    A consumer of its own (no waiting at the broker, every partition at once) keeps the probes
    out of the reader's way and costs one round trip.
    """
    probes = {tp: header.probe for tp, header in headers.items() if header.probe is not None}
    if not probes:
        return {}
    consumer = AIOKafkaConsumer(
        **kafka.client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=0,
    )
    found: dict[TopicPartition, ConsumerRecord[bytes, bytes]] = {}
    await consumer.start()
    try:
        consumer.assign(list(probes))
        for tp, (offset, _, _) in probes.items():
            consumer.seek(tp, offset)
        pending = set(probes)
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            while pending:
                for tp, records in (await consumer.getmany(*pending, timeout_ms=100)).items():
                    if records and tp in pending:
                        found[tp] = records[0]
                        pending.discard(tp)
                for tp in list(pending):  # compacted up to the position: no record to compare
                    if await consumer.position(tp) >= headers[tp].position:
                        pending.discard(tp)
    except (TimeoutError, KafkaError) as exc:
        log.info("snapshot probes not all read (%r): those partitions are not checked for recreation", exc)
    finally:
        await consumer.stop()
    errors = {}
    for tp, record in found.items():
        offset, timestamp, key = probes[tp]
        if record.offset == offset and (record.key != key.encode() or record.timestamp != timestamp):
            errors[tp] = SnapshotError("recreated", f"the record at offset {offset} is not the one the snapshot holds")
    return errors


def _header_of(path: Path) -> Header:
    try:
        return read_header(path)
    except FileNotFoundError:
        raise SnapshotError("missing", "no snapshot") from None
    except OSError as exc:
        raise SnapshotError("unreadable", str(exc)) from exc


def check(header: Header, expected: Header, start: int, end: int, retention_ms: int | None, now: float) -> None:
    """Raise SnapshotError unless the snapshot ``header`` may be loaded (see the module's doc)."""
    for name in ("topic", "partition", "partitions", "codec"):
        was, now_is = getattr(header, name), getattr(expected, name)
        if was != now_is:
            raise SnapshotError("bindings", f"written for {name} {was!r}, now {now_is!r}")
    if not start <= header.position <= end:
        raise SnapshotError(
            "offsets", f"position {header.position} outside the log ({start}..{end}): records deleted, topic recreated?"
        )
    if retention_ms is None:
        raise SnapshotError("retention", "the topic's delete.retention.ms could not be read")
    age_ms = now * 1000 - header.since_ms
    if age_ms >= retention_ms:
        raise SnapshotError(
            "retention",
            f"{age_ms / 1000:.0f}s old, delete.retention.ms is {retention_ms} (deletes may have vanished)",
        )
