"""What the benchmark reads and writes: the table layout, keys, Item values, no-op plugins, RSS.

The table topic ``bench.table.N`` holds N keys split between two prefixes
(``config/a/`` and ``config/b/``), then overwrites of 10% of them, then
tombstones for 5% of them, in that order. Key ``i`` always goes to partition
``i % partitions``, so the last record of a key is also its last write.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from datasync import ChangeEvent, Plugin, ResyncEvent
from datasync.codecs import AvroCodec
from datasync.schemas import SchemaStore

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCHEMAS = BENCH / "schemas"
RESULTS = BENCH / "results"
ITEM = "bench.Item"
PREFIXES = ("config/a/", "config/b/")
SEED = 20240611

# The fetch settings of datasync's TableReader, so the limit loop fetches the same way.
FETCH = {"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_bytes": 64 * 1024 * 1024}

Record = tuple[int, bytes, bytes | None]  # partition, key, value (None: tombstone)


def item_codec() -> AvroCodec:
    """datasync's codec for ``bench.Item`` (single-object encoding)."""
    store = SchemaStore.load(SCHEMAS)
    schema = store.get(ITEM)
    if schema is None:
        raise RuntimeError(f"{ITEM} not found under {SCHEMAS}")
    return AvroCodec(store, schema)


def item(i: int, revision: int, updated_us: int = 0) -> dict[str, Any]:
    """The Item value of key ``i`` at ``revision``: 10 fields, ~100 bytes encoded."""
    return {
        "id": i,
        "name": f"item-{i:07d}",
        "enabled": i % 7 != 0,
        "mtu": 1500 + revision,
        "vrf": i % 16,
        "weight": i / 1000.0,
        "mac": f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
        "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/24",
        "description": f"bench item {i} rev {revision}",
        "updated_us": updated_us,
    }


def key_of(i: int, width: int = 7) -> bytes:
    return f"{PREFIXES[i % 2]}{i:0{width}d}".encode()


@dataclass(frozen=True)
class TableLayout:
    """The generated table topic of ``keys`` keys: its name and the records it must hold."""

    keys: int
    partitions: int = 3

    @property
    def topic(self) -> str:
        return f"bench.table.{self.keys}"

    @property
    def overwrites(self) -> int:
        return self.keys // 10

    @property
    def deletes(self) -> int:
        return self.keys // 20

    @property
    def records(self) -> int:
        return self.keys + self.overwrites + self.deletes

    @property
    def live_keys(self) -> int:
        return self.keys - self.deletes

    @property
    def width(self) -> int:
        return max(6, len(str(self.keys - 1)))

    def generate(self, codec: AvroCodec) -> Iterator[Record]:
        """Every record in produce order: the puts, then the overwrites, then the tombstones."""
        rng = random.Random(SEED)
        overwritten = rng.sample(range(self.keys), self.overwrites)
        deleted = rng.sample(range(self.keys), self.deletes)
        n, width = self.partitions, self.width
        for i in range(self.keys):
            yield i % n, key_of(i, width), codec.encode(item(i, 0))
        for i in overwritten:
            yield i % n, key_of(i, width), codec.encode(item(i, 1))
        for i in deleted:
            yield i % n, key_of(i, width), None


class KeyCounter(Plugin):
    """A no-op plugin: its resync touches every key (not the value) and counts them."""

    def __init__(self) -> None:
        self.keys = 0
        self.changes = 0
        self.started_at = self.finished_at = self.finished_cpu = 0.0
        self.done = asyncio.Event()

    async def resync(self, event: ResyncEvent) -> None:
        self.started_at = time.perf_counter()
        n = 0
        for items in event.values.values():
            for kv in items:
                if kv.key:
                    n += 1
        self.keys = n
        self.finished_at, self.finished_cpu = time.perf_counter(), time.process_time()
        self.done.set()

    async def change(self, event: ChangeEvent) -> None:
        self.changes += len(event.changes)


class ValueReader(KeyCounter):
    """A plugin whose resync reads (decodes) every value, as most real plugins do."""

    async def resync(self, event: ResyncEvent) -> None:
        self.started_at = time.perf_counter()
        n = 0
        for items in event.values.values():
            for kv in items:
                if kv.value is not None:
                    n += 1
        self.keys = n
        self.finished_at, self.finished_cpu = time.perf_counter(), time.process_time()
        self.done.set()


class ChangeCounter(Plugin):
    """A no-op plugin for the live phase; while ``latencies`` is a list it records, per change,
    (send time, delivery time - send time) in microseconds from the value's ``updated_us``."""

    def __init__(self) -> None:
        self.changes = 0
        self.latencies: list[tuple[int, int]] | None = None

    async def resync(self, event: ResyncEvent) -> None:
        return None

    async def change(self, event: ChangeEvent) -> None:
        changes = event.changes
        self.changes += len(changes)
        latencies = self.latencies
        if latencies is not None:
            now = time.time_ns() // 1000
            for ch in changes:
                if ch.value is not None:
                    sent = ch.value["updated_us"]
                    latencies.append((sent, now - sent))


class GcClock:
    """Wall time spent in the cyclic garbage collector while the ``with`` block runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def c_extensions() -> dict[str, Any]:
    """Whether aiokafka's record parser, fastavro's reader, datasync's Avro walk, snapshot block
    fill and resync KeyValue are compiled."""
    import aiokafka.util
    import fastavro._read
    from aiokafka.record import default_records

    from datasync import api, avrowalk, snapshotfile

    batch_module = default_records.DefaultRecordBatch.__module__
    fastavro_file = getattr(fastavro._read, "__file__", "") or ""
    return {
        "aiokafka_crecords": batch_module.startswith("aiokafka.record._crecords") and not aiokafka.util.NO_EXTENSIONS,
        "aiokafka_record_batch": batch_module,
        "fastavro_read_compiled": fastavro_file.endswith(".so"),
        "fastavro_read": fastavro_file,
        "datasync_avrowalk_compiled": avrowalk.COMPILED,
        "datasync_snapblock_compiled": snapshotfile.COMPILED,
        "datasync_keyvalue_compiled": api.KeyValue is not api._PyKeyValue,
    }
