"""datasync benchmark: full resync and live changes against a hand-written aiokafka loop.

    make bench                                         # 1,000,000 keys, starts its own local broker
    .venv/bin/python bench/run.py --keys 100000 --bootstrap 127.0.0.1:19092
    .venv/bin/python bench/run.py --profile            # pyinstrument profiles of limit and resync

See bench/README.md for what is measured and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from datagen import ensure_table, produce_live
from phases import (
    Round,
    bytes_round,
    limit_round,
    live_dict,
    live_phase,
    memory_child,
    memory_phase,
    reading_round,
    resync_round,
)
from report import rows, summarize_rounds, table, write_json
from restart import restart_child, restart_phase
from workload import RESULTS, ROOT, GcClock, TableLayout, c_extensions, item_codec

from datasync.codecs import AvroCodec

PHASES = ("resync", "memory", "live", "restart")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys in the table topic (default 1,000,000)")
    p.add_argument("--bootstrap", help="host:port of a running broker (default: start a local one, stop it after)")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="where to write the results")
    p.add_argument("--rounds", type=int, default=3, help="alternating limit/resync rounds (best is reported)")
    p.add_argument("--live-seconds", type=float, default=10.0, help="measuring window of the live dispatch rate")
    p.add_argument("--latency-rate", type=int, default=5000, help="records/s of the latency test")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="duration of the latency test")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--profile", action="store_true", help="profile one round of each full read with pyinstrument")
    p.add_argument("--verbose", action="store_true", help="log the engine at INFO")
    # Internal: the phases that run in a fresh process.
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-produce", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-restart", choices=["seed", "full", "snapshot"], help=argparse.SUPPRESS)
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    p.add_argument("--topic", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def environment(bootstrap: str, own_broker: bool) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "aiokafka": version("aiokafka"),
        "fastavro": version("fastavro"),
        "bootstrap": bootstrap,
        "broker": "started by the benchmark" if own_broker else "given",
        "c_extensions": c_extensions(),
        "loadavg_start": os.getloadavg(),
    }


def warn_if_busy() -> None:
    load = os.getloadavg()[0]
    if load > 1.0:
        progress(f"warning: load average {load:.2f} at start: other processes may skew the numbers")


# The four full reads of the table topic, in the order each round runs them (names as in the JSON).
MEASURES: dict[str, Callable[[str, TableLayout, AvroCodec], Awaitable[Round]]] = {
    "limit_bytes": bytes_round,
    "limit": limit_round,
    "resync": resync_round,
    "resync_reading": reading_round,
}


async def alternate(args: argparse.Namespace, bootstrap: str, layout: TableLayout) -> dict[str, Any]:
    """The limit loops and the resyncs, alternately, ``--rounds`` times each."""
    codec = item_codec()
    runs: dict[str, list[Round]] = {name: [] for name in MEASURES}
    for n in range(1, args.rounds + 1):
        for name, measure in MEASURES.items():
            with GcClock() as gc_clock:
                result = await measure(bootstrap, layout, codec)
            result.gc_seconds = gc_clock.seconds
            gc.collect()
            if result.keys != layout.live_keys:
                raise RuntimeError(f"{name} found {result.keys} keys, expected {layout.live_keys}")
            took = f"{result.seconds:.2f}s ({result.gc_seconds:.2f}s in gc, {result.cpu_seconds:.2f}s CPU)"
            progress(f"round {n} {name}: {took}, {result.rate:,.0f} records/s")
            runs[name].append(result)
    return {name: summarize_rounds(rounds) for name, rounds in runs.items()}


async def bench(args: argparse.Namespace, bootstrap: str, own_broker: bool) -> dict[str, Any]:
    layout = TableLayout(args.keys)
    phases = args.phases.split(",")
    results: dict[str, Any] = {
        "config": {
            "keys": layout.keys,
            "partitions": layout.partitions,
            "records": layout.records,
            "live_keys": layout.live_keys,
            "topic": layout.topic,
            "rounds": args.rounds,
        },
        "environment": environment(bootstrap, own_broker),
    }
    warn_if_busy()
    await prepare_table(bootstrap, layout, results)
    if "resync" in phases:
        results.update(await alternate(args, bootstrap, layout))
    if "memory" in phases:
        progress("memory: resync in a fresh process")
        results["memory"] = await memory_phase(bootstrap, layout)
    if "live" in phases:
        progress(f"live: {args.live_seconds:.0f}s full-speed writer, then {args.latency_rate:,}/s for latency")
        live = await live_phase(bootstrap, args.live_seconds, args.latency_rate, args.latency_seconds)
        results["live"] = live_dict(live)
    if "restart" in phases:
        progress("restart: from a snapshot with 1% of the keys changed, against a full rebuild")
        rounds = max(2, args.rounds - 1)
        results["restart"] = await restart_phase(
            bootstrap, layout, rounds, args.latency_rate, args.latency_seconds, progress
        )
    results["environment"]["loadavg_end"] = os.getloadavg()
    return results


async def prepare_table(bootstrap: str, layout: TableLayout, results: dict[str, Any]) -> None:
    progress(f"table topic {layout.topic}: {layout.records:,} records expected")
    generated = await ensure_table(bootstrap, layout)
    if generated is None:
        progress("reusing the existing topic")
    else:
        progress(f"generated in {generated:.1f}s ({layout.records / generated:,.0f} records/s)")
    results["config"]["generation_seconds"] = generated


async def profile(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    """One round of each full read under pyinstrument; the text reports go to bench/results/."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        sys.exit("--profile needs pyinstrument: .venv/bin/pip install pyinstrument")
    layout = TableLayout(args.keys)
    await prepare_table(bootstrap, layout, {"config": {}})
    codec = item_codec()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name, measure in MEASURES.items():
        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        result = await measure(bootstrap, layout, codec)
        profiler.stop()
        path = RESULTS / f"profile-{name}.txt"
        path.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        progress(f"{name}: {result.seconds:.2f}s under the profiler, profile in {path.relative_to(ROOT)}")
        out[name] = {"seconds": result.seconds, "profile": str(path)}
    return out


def run_with_broker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark on ``--bootstrap`` or on a local broker started (and stopped) for it."""
    if args.bootstrap:
        return asyncio.run(profile(args, args.bootstrap) if args.profile else bench(args, args.bootstrap, False))
    sys.path.insert(0, str(ROOT / "tools"))
    from localkafka import LocalBroker

    progress("starting a local Kafka broker")
    broker = LocalBroker().start()
    try:
        return asyncio.run(profile(args, broker.bootstrap) if args.profile else bench(args, broker.bootstrap, True))
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.child_memory:
        print(json.dumps(asyncio.run(memory_child(args.bootstrap, TableLayout(args.keys)))))
        return 0
    if args.child_restart:
        restart = restart_child(args.bootstrap, TableLayout(args.keys), args.topic, args.state_dir, args.child_restart)
        print(json.dumps(asyncio.run(restart)))
        return 0
    if args.child_produce:
        live = produce_live(args.bootstrap, args.topic, args.partitions, args.keys, args.rate, args.seconds)
        print(json.dumps(asyncio.run(live)))
        return 0
    results = run_with_broker(args)
    if args.profile:
        return 0
    report = rows(results)
    print(f"datasync bench: {args.keys:,} keys, {results['config']['records']:,} records, 3 partitions")
    ext = results["environment"]["c_extensions"]
    print(
        f"C extensions: aiokafka _crecords {ext['aiokafka_crecords']}, fastavro _read {ext['fastavro_read_compiled']},"
        f" datasync _avrowalk {ext['datasync_avrowalk_compiled']}, _snapblock {ext['datasync_snapblock_compiled']},"
        f" _keyvalue {ext['datasync_keyvalue_compiled']}"
    )
    print(table(report))
    write_json(args.json, results, report)
    print(f"results: {args.json}")
    return 0 if all(r.ok is not False for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
