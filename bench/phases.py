"""The measured phases: the hand-written limit loop, datasync's resync, live changes, memory."""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from io import BytesIO
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from datagen import create_topic, delete_topic, topic_spec
from fastavro import schemaless_reader
from workload import (
    BENCH,
    FETCH,
    PREFIXES,
    ChangeCounter,
    KeyCounter,
    TableLayout,
    ValueReader,
    item_codec,
    rss_bytes,
)

from datasync import DataSync
from datasync.codecs import HEADER_SIZE, AvroCodec
from datasync.settings import KafkaSettings, SyncSettings

LIMIT_MAX_RECORDS = 100_000
LIVE_PARTITIONS = 3
LIVE_KEYS = 100_000  # the live writers cycle over this many keys
TIMEOUT_S = 600.0


@dataclass
class Round:
    """One full read of the table topic: how long it took and what it found."""

    seconds: float
    records: int
    keys: int
    gc_seconds: float = 0.0  # of ``seconds``, in the cyclic garbage collector
    cpu_seconds: float = 0.0  # CPU time of this process meanwhile (less sensitive to a busy machine)

    @property
    def rate(self) -> float:
        return self.records / self.seconds


# -- limit: what a user could write with aiokafka (and fastavro) alone ------------------------------


async def limit_round(bootstrap: str, layout: TableLayout, codec: AvroCodec, decode: bool = True) -> Round:
    """Read the topic to its end offsets into a dict (tombstones delete): each value decoded with
    fastavro (``decode``), or its bytes kept as they are."""
    assert codec.reader is not None
    schema = codec.reader.parsed
    started, cpu = time.perf_counter(), time.process_time()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **FETCH
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(layout.topic, p) for p in range(layout.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        state: dict[str, Any] = {}
        records = 0
        pending = [tp for tp in partitions if ends[tp] > 0]
        while pending:
            batch = await consumer.getmany(timeout_ms=200, max_records=LIMIT_MAX_RECORDS)
            for tp_records in batch.values():
                records += len(tp_records)
                for record in tp_records:
                    key = record.key.decode()
                    if record.value is None:
                        state.pop(key, None)
                    elif decode:
                        stream = BytesIO(record.value)
                        stream.seek(HEADER_SIZE)
                        state[key] = schemaless_reader(stream, schema, None)
                    else:
                        state[key] = record.value
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await consumer.stop()
    return Round(took, records, len(state), cpu_seconds=cpu)


async def bytes_round(bootstrap: str, layout: TableLayout, codec: AvroCodec) -> Round:
    """The limit loop keeping each value's bytes: the cost of reading alone."""
    return await limit_round(bootstrap, layout, codec, decode=False)


# -- resync: datasync until two no-op plugins returned from their resyncs ---------------------------


def table_engine(
    bootstrap: str, layout: TableLayout, codec: AvroCodec, read_values: bool = False
) -> tuple[DataSync, list[KeyCounter]]:
    """An engine on the table topic with one key-counting plugin per prefix (value-reading ones
    with ``read_values``)."""
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="datasync-bench"), SyncSettings(create_topics=False)
    )
    engine.add_topic(topic_spec(layout.topic, layout.partitions), codec)
    plugins = [(ValueReader() if read_values else KeyCounter()) for _ in PREFIXES]
    for n, (plugin, prefix) in enumerate(zip(plugins, PREFIXES, strict=True)):
        engine.watch(f"noop-{n}", plugin, {layout.topic: [prefix]})
    return engine, plugins


async def resynced(plugins: list[KeyCounter]) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        await asyncio.gather(*(p.done.wait() for p in plugins))


async def resync_round(bootstrap: str, layout: TableLayout, codec: AvroCodec, read_values: bool = False) -> Round:
    """From ``start()`` to both plugins having returned from their resync."""
    engine, plugins = table_engine(bootstrap, layout, codec, read_values)
    started, cpu = time.perf_counter(), time.process_time()
    try:
        await engine.start()
        await resynced(plugins)
        took = max(p.finished_at for p in plugins) - started
        cpu = max(p.finished_cpu for p in plugins) - cpu
    finally:
        await engine.stop()
    return Round(took, layout.records, sum(p.keys for p in plugins), cpu_seconds=cpu)


async def reading_round(bootstrap: str, layout: TableLayout, codec: AvroCodec) -> Round:
    """The resync with plugins that read (decode) every value."""
    return await resync_round(bootstrap, layout, codec, read_values=True)


# -- memory: RSS growth of a fresh process, per live key ---------------------------------------------


async def memory_child(bootstrap: str, layout: TableLayout) -> dict[str, Any]:
    """Run in a fresh process (``run.py --child-memory``) so no other phase pollutes its RSS."""
    codec = item_codec()
    engine, plugins = table_engine(bootstrap, layout, codec)
    gc.collect()
    before = rss_bytes()
    try:
        await engine.start()
        await resynced(plugins)
        gc.collect()
        after = rss_bytes()
    finally:
        await engine.stop()
    table = engine.table(layout.topic)  # measured after stop(): the walk below would block the engine's loop
    keys = len(table)
    raw = sum(len(key.encode()) + len(entry.value) for key, entry in table.snapshot().items())
    return {
        "keys": keys,
        "full_resyncs": getattr(engine, "generation", None),  # more than 1: a spurious rebuild happened
        "rss_before": before,
        "rss_after": after,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_per_key": (after - before) / keys,
        "raw_bytes_per_key": raw / keys,
    }


async def memory_phase(bootstrap: str, layout: TableLayout) -> dict[str, Any]:
    out = await run_child("--child-memory", "--bootstrap", bootstrap, "--keys", str(layout.keys))
    result: dict[str, Any] = json.loads(out)
    return result


# -- live: dispatch rate under a full-speed writer, latency at a fixed rate -------------------------


@dataclass
class Live:
    produced_per_s: float  # what the full-speed writer managed
    dispatched_per_s: float  # changes delivered to the plugin while it wrote
    drain_per_s: float | None  # the backlog left when the writer stopped, dispatched by the engine alone
    latency_rate: int
    latency_samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def run_child(*args: str) -> str:
    """Run ``run.py`` with ``args`` in a fresh interpreter; return its last stdout line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "run.py"), *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"bench child {args[0]} still running after {TIMEOUT_S:.0f}s: killed") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} exited with {proc.returncode}")
    return out.decode().strip().splitlines()[-1]


def writer(bootstrap: str, topic: str, partitions: int, keys: int, rate: int, seconds: float) -> asyncio.Task[str]:
    """Start a writer in its own process (so it does not share the engine's event loop)."""
    args = ["--child-produce", "--bootstrap", bootstrap, "--topic", topic, "--partitions", str(partitions)]
    args += ["--keys", str(keys), "--rate", str(rate), "--seconds", str(seconds)]
    return asyncio.create_task(run_child(*args))


async def settle(engine: DataSync, predicate: Callable[[], bool], within_s: float) -> None:
    """Wait until ``predicate()`` holds (re-checked after every engine step)."""
    async with asyncio.timeout(within_s):
        await engine.wait_for(predicate)


async def dispatch_rate(
    engine: DataSync, bootstrap: str, topic: str, plugin: ChangeCounter, seconds: float
) -> tuple[float, float, float | None]:
    """(produced/s, changes dispatched/s over ``seconds`` while writing, backlog drain rate once it stopped)."""
    base = plugin.changes
    task = writer(bootstrap, topic, LIVE_PARTITIONS, LIVE_KEYS, 0, seconds + 3.0)
    await settle(engine, lambda: plugin.changes > base, 60.0)
    await asyncio.sleep(1.0)  # warm-up
    t0, c0 = time.perf_counter(), plugin.changes
    await asyncio.sleep(seconds)
    t1, c1 = time.perf_counter(), plugin.changes
    produced = json.loads(await task)
    stopped, backlog = time.perf_counter(), base + produced["sent"] - plugin.changes
    await settle(engine, lambda: plugin.changes - base >= produced["sent"], TIMEOUT_S)
    drained = time.perf_counter() - stopped
    drain = backlog / drained if backlog > 1000 else None  # the engine alone, if it was behind
    return produced["rate"], (c1 - c0) / (t1 - t0), drain


async def latency(
    engine: DataSync, bootstrap: str, topic: str, plugin: ChangeCounter, rate: int, seconds: float
) -> list[float]:
    """Delivery latencies (ms) of records written at ``rate``/s, after a 1 s warm-up."""
    base = plugin.changes
    plugin.latencies = samples = []
    produced = json.loads(await writer(bootstrap, topic, LIVE_PARTITIONS, LIVE_KEYS, rate, seconds + 1.0))
    await settle(engine, lambda: plugin.changes - base >= produced["sent"], 60.0)
    plugin.latencies = None
    if not samples:
        return []
    warm = min(sent for sent, _ in samples) + 1_000_000
    return [lat / 1000 for sent, lat in samples if sent >= warm]


async def live_phase(bootstrap: str, seconds: float, rate: int, latency_seconds: float) -> Live:
    """An engine on a fresh, empty topic with one no-op plugin; the topic is deleted afterwards."""
    topic = f"bench.live.{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic, LIVE_PARTITIONS)
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="datasync-bench"), SyncSettings(create_topics=False)
    )
    engine.add_topic(topic_spec(topic, LIVE_PARTITIONS), item_codec())
    plugin = ChangeCounter()
    engine.watch("noop", plugin, {topic: [""]})
    try:
        await engine.start()
        async with asyncio.timeout(60):
            await engine.wait_ready()
        produced, dispatched, drain = await dispatch_rate(engine, bootstrap, topic, plugin, seconds)
        lat = await latency(engine, bootstrap, topic, plugin, rate, latency_seconds)
    finally:
        await engine.stop()
        await delete_topic(bootstrap, topic)
    pct = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [float("nan")] * 99
    return Live(produced, dispatched, drain, rate, len(lat), pct[49], pct[98], max(lat, default=float("nan")))


def live_dict(live: Live) -> dict[str, Any]:
    return asdict(live)
