"""Isolation: a plugin whose every change fails must not delay the other plugins.

    .venv/bin/python bench/isolation.py                     # starts and stops its own local broker
    .venv/bin/python bench/isolation.py --bootstrap 127.0.0.1:19092 --rate 1000 --seconds 10

In one run, on a fresh topic each, with the default retry settings: the delivery delay of a no-op
plugin alone ("alone"), then of the same plugin next to one whose every change raises ("with a
failing neighbour"). Reports p50/p99 of both and their ratio. Target: the failing neighbour adds
at most 50% to the healthy plugin's median delay.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import uuid

from datagen import create_topic, delete_topic, topic_spec
from phases import LIVE_PARTITIONS, latency
from workload import ROOT, ChangeCounter, item_codec

from datasync import ChangeEvent, DataSync, Plugin, ResyncEvent
from datasync.settings import KafkaSettings, SyncSettings


class AlwaysFails(Plugin):
    """Resyncs, then refuses every change (a dependency that is down)."""

    async def resync(self, event: ResyncEvent) -> None:
        return None

    async def change(self, event: ChangeEvent) -> None:
        raise ConnectionError("dependency down")


async def delays(bootstrap: str, rate: int, seconds: float, failing_neighbour: bool) -> list[float]:
    """The healthy plugin's delivery delays (ms) at ``rate`` records/s."""
    topic = f"bench.isolation.{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic, LIVE_PARTITIONS)
    engine = DataSync(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="datasync-bench"), SyncSettings(create_topics=False)
    )
    engine.add_topic(topic_spec(topic, LIVE_PARTITIONS), item_codec())
    if failing_neighbour:
        engine.watch("failing", AlwaysFails(), {topic: [""]})  # declared first, as the one that could hold others
    healthy = ChangeCounter()
    engine.watch("healthy", healthy, {topic: [""]})
    try:
        await engine.start()
        async with asyncio.timeout(60):
            await engine.wait_ready()
        return await latency(engine, bootstrap, topic, healthy, rate, seconds)
    finally:
        await engine.stop()
        await delete_topic(bootstrap, topic)


def percentiles(samples: list[float]) -> tuple[float, float]:
    pct = statistics.quantiles(samples, n=100, method="inclusive")
    return pct[49], pct[98]


async def bench(bootstrap: str, rate: int, seconds: float) -> int:
    alone = percentiles(await delays(bootstrap, rate, seconds, failing_neighbour=False))
    crowded = percentiles(await delays(bootstrap, rate, seconds, failing_neighbour=True))
    ratio = crowded[0] / alone[0]
    print(f"healthy plugin's delivery delay at {rate:,} records/s, {seconds:.0f} s each")
    print(f"  alone                     p50 {alone[0]:7.1f} ms   p99 {alone[1]:7.1f} ms")
    print(f"  with a failing neighbour  p50 {crowded[0]:7.1f} ms   p99 {crowded[1]:7.1f} ms")
    verdict = "PASS" if ratio <= 1.5 else "FAIL"
    print(f"  median ratio              {ratio:.2f}x (target <= 1.5x)  {verdict}")
    return 0 if verdict == "PASS" else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", help="host:port of a running broker (default: start a local one, stop it after)")
    p.add_argument("--rate", type=int, default=1000, help="records/s written (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement (default 10)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("datasync").setLevel(logging.CRITICAL)  # the failing plugin's errors are the point
    if args.bootstrap:
        return asyncio.run(bench(args.bootstrap, args.rate, args.seconds))
    sys.path.insert(0, str(ROOT / "tools"))
    from localkafka import LocalBroker

    broker = LocalBroker().start()
    try:
        return asyncio.run(bench(broker.bootstrap, args.rate, args.seconds))
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
