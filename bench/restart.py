"""The restart phase: time to ready from a local snapshot against a full rebuild, in one run.

On a fresh copy of the table topic (deleted afterwards): a first engine reads it and writes its
snapshot at shutdown; then 1% of the keys change; then, alternately, a full rebuild (no state
directory) and a restart from the snapshot, each in a fresh process (time from ``start()`` to
both plugins resynced, RSS after it, a digest of the table: both must be equal). Last, the
delivery latency at a fixed rate on a live topic while snapshots of the table are written back
to back, against the same engine without snapshots.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from datagen import create_topic, delete_topic, fast_producer, produce_batched, topic_spec
from phases import LIVE_PARTITIONS, TIMEOUT_S, latency, resynced, run_child
from workload import PREFIXES, ChangeCounter, KeyCounter, TableLayout, item, item_codec, key_of, rss_bytes

from datasync import DataSync
from datasync.settings import KafkaSettings, SnapshotSettings, SyncSettings

CHANGED = 0.01  # of the keys, changed between the snapshot and the restart
LATENCY_ROUNDS = 3  # latency windows with and without snapshot writes; the median is reported


def engine_for(
    bootstrap: str, layout: TableLayout, topic: str, state: Path | None, on_shutdown: bool
) -> tuple[DataSync, list[KeyCounter]]:
    """The resync phase's engine (two key-counting plugins), on ``topic``, with snapshots in ``state``."""
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="datasync-bench"),
        SyncSettings(create_topics=False),
        state_dir=state,
        snapshot=SnapshotSettings(interval_s=0, after_rebuild=False, on_shutdown=on_shutdown),
    )
    engine.add_topic(topic_spec(topic, layout.partitions), item_codec())
    plugins = [KeyCounter() for _ in PREFIXES]
    for n, (plugin, prefix) in enumerate(zip(plugins, PREFIXES, strict=True)):
        engine.watch(f"noop-{n}", plugin, {topic: [prefix]})
    return engine, plugins


async def restart_child(bootstrap: str, layout: TableLayout, topic: str, state: str, mode: str) -> dict[str, Any]:
    """One start in a fresh process: ``seed`` (write the snapshot at stop), ``full`` or ``snapshot``."""
    engine, plugins = engine_for(bootstrap, layout, topic, None if mode == "full" else Path(state), mode == "seed")
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    try:
        await engine.start()
        await resynced(plugins)
        took = max(p.finished_at for p in plugins) - started
        resync_s = max(p.finished_at for p in plugins) - min(p.started_at for p in plugins)
        gc.collect()
        after = rss_bytes()
        loaded = (await engine.topics_status())[topic]["loaded"]
    finally:
        stopping = time.perf_counter()
        await engine.stop()
        stop_s = time.perf_counter() - stopping
    table = engine.table(topic)
    digest = hashlib.sha256()
    for key in sorted(table.data):
        digest.update(key.encode() + b"\0" + table.data[key])
    return {
        "mode": mode,
        "seconds": took,
        "stop_seconds": stop_s,
        "rss_before": before,
        "rss_after": after,
        "keys": len(table),
        "loaded": loaded["from"],
        "load_seconds": loaded.get("seconds", 0.0),  # reading the snapshot files, checksums included
        "resync_seconds": resync_s,  # from the first plugin's RESYNC call to the last one's return
        "digest": digest.hexdigest(),
        "snapshot_bytes": engine.metrics.snapshot_bytes.labels(topic)._value.get(),
    }


async def child(bootstrap: str, layout: TableLayout, topic: str, state: Path, mode: str) -> dict[str, Any]:
    args = ["--child-restart", mode, "--bootstrap", bootstrap, "--keys", str(layout.keys), "--topic", topic]
    result: dict[str, Any] = json.loads(await run_child(*args, "--state-dir", str(state)))
    return result


async def change_keys(bootstrap: str, topic: str, layout: TableLayout) -> int:
    """Overwrite ``CHANGED`` of the keys with a new revision."""
    codec = item_codec()
    rng = random.Random(7)
    chosen = rng.sample(range(layout.keys), int(layout.keys * CHANGED))
    records = [(i % layout.partitions, key_of(i, layout.width), codec.encode(item(i, 2))) for i in chosen]
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        return await produce_batched(producer, topic, records)
    finally:
        await producer.stop()


async def latency_while_writing(
    bootstrap: str, layout: TableLayout, topic: str, state: Path | None, rate: int, seconds: float
) -> dict[str, Any]:
    """p50/p99 of changes on a live topic at ``rate``/s while (with ``state``) snapshots of the
    table topic are written back to back."""
    gc.collect()  # the previous window's engine and its million-key table, if a cycle still holds them
    live = f"bench.live.{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, live, LIVE_PARTITIONS)
    snapshot = SnapshotSettings(interval_s=0.01, after_rebuild=True, on_shutdown=False)
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="datasync-bench"),
        SyncSettings(create_topics=False),
        state_dir=state,
        snapshot=snapshot,
    )
    engine.add_topic(topic_spec(topic, layout.partitions), item_codec())
    engine.add_topic(topic_spec(live, LIVE_PARTITIONS), item_codec())
    plugin = ChangeCounter()
    engine.watch("noop", plugin, {live: [""]})
    writes = engine.metrics.snapshot_write_seconds.labels(topic)
    try:
        await engine.start()
        async with asyncio.timeout(TIMEOUT_S):
            await engine.wait_ready()
        snapshots = engine._snapshots
        samples: list[bool] = []

        async def sample_writing() -> None:  # how much of the window a write was running
            while True:
                samples.append(snapshots is not None and snapshots.writing)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample_writing())
        try:
            lat = await latency(engine, bootstrap, live, plugin, rate, seconds)
        finally:
            sampler.cancel()
        last_write = writes._value.get()
    finally:
        await engine.stop()
        await delete_topic(bootstrap, live)
    pct = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "snapshots": state is not None,
        "rate": rate,
        "samples": len(lat),
        "p50_ms": pct[49],
        "p99_ms": pct[98],
        "max_ms": max(lat),
        "last_snapshot_write_s": last_write if state is not None else None,
        "writing_share": sum(samples) / max(1, len(samples)),  # of the window, sampled every 10 ms
    }


async def restart_phase(
    bootstrap: str, layout: TableLayout, rounds: int, rate: int, seconds: float, progress: Any
) -> dict[str, Any]:
    topic = f"bench.restart.{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic, layout.partitions)
    try:
        producer = fast_producer(bootstrap)
        await producer.start()
        try:
            await produce_batched(producer, topic, layout.generate(item_codec()))
        finally:
            await producer.stop()
        with tempfile.TemporaryDirectory(prefix="datasync-bench-state-") as tmp:
            state = Path(tmp)
            seed = await child(bootstrap, layout, topic, state, "seed")
            progress(f"restart: seeded, full read {seed['seconds']:.2f}s, snapshot written at stop in "
                     f"{seed['stop_seconds']:.2f}s")  # fmt: skip
            changed = await change_keys(bootstrap, topic, layout)
            runs: dict[str, list[dict[str, Any]]] = {"full": [], "snapshot": []}
            for n in range(1, rounds + 1):
                for mode in ("full", "snapshot"):
                    result = await child(bootstrap, layout, topic, state, mode)
                    progress(f"restart round {n} {mode}: {result['seconds']:.2f}s to ready ({result['loaded']})")
                    runs[mode].append(result)
            windows: dict[str, list[dict[str, Any]]] = {"without": [], "writing": []}
            for n in range(1, LATENCY_ROUNDS + 1):  # alternately: one window's p99 moves by a few ms between runs
                progress(f"restart: p99 latency at {rate:,}/s, without and with snapshots being written, round {n}")
                windows["without"].append(await latency_while_writing(bootstrap, layout, topic, None, rate, seconds))
                windows["writing"].append(await latency_while_writing(bootstrap, layout, topic, state, rate, seconds))
    finally:
        await delete_topic(bootstrap, topic)
    full = min(runs["full"], key=lambda r: r["seconds"])
    snap = min(runs["snapshot"], key=lambda r: r["seconds"])
    return {
        "changed_keys": changed,
        "seed": seed,
        "full": full,
        "snapshot": snap,
        "rounds": runs,
        "speedup": full["seconds"] / snap["seconds"],
        "equal_tables": all(r["digest"] == full["digest"] for r in runs["full"] + runs["snapshot"]),
        "all_loaded_from_snapshot": all(r["loaded"] == "snapshot" for r in runs["snapshot"]),
        "latency_without_snapshots": median_window(windows["without"]),
        "latency_while_writing": median_window(windows["writing"]),
        "latency_rounds": windows,
    }


def median_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The window whose p99 is the median, with every window's p99."""
    p99s = [w["p99_ms"] for w in windows]
    chosen = next(w for w in windows if w["p99_ms"] == statistics.median_low(p99s))
    return {**chosen, "p99s_ms": p99s}
