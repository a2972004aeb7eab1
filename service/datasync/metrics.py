"""Prometheus metrics of one engine, in a registry of its own (several engines may share a process).

Names follow Prometheus conventions (``_total`` is added to counters by the
client, units in the name); label sets are bounded by the bindings (topics,
partitions, plugins, publishers) and by small fixed vocabularies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds... (Linux)
        ProcessCollector(registry=r)
        self.records = Counter("datasync_records_consumed", "Records read from table topics", ["topic"], registry=r)
        self.bad_records = Counter(
            "datasync_bad_records",
            "Records that could not be applied (undecodable value, bad key)",
            ["topic", "reason"],
            registry=r,
        )
        self.changes = Counter(
            "datasync_changes_dispatched", "Changes delivered to plugins", ["plugin", "op"], registry=r
        )
        self.plugin_failures = Counter(
            "datasync_plugin_failures", "Plugin calls that raised", ["plugin", "kind"], registry=r
        )
        self.plugin_seconds = Histogram(
            "datasync_plugin_call_seconds",
            "Duration of plugin calls",
            ["plugin", "kind"],
            registry=r,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        self.resyncs = Counter(
            "datasync_resyncs", "Full resyncs (tables rebuilt from the topics)", ["topic"], registry=r
        )
        self.resync_seconds = Gauge(
            "datasync_resync_duration_seconds", "Duration of the last table rebuild", ["topic"], registry=r
        )
        self.resync_last_success = Gauge(
            "datasync_resync_last_success_timestamp_seconds", "When the table was last rebuilt", ["topic"], registry=r
        )
        self.resync_remaining = Gauge(
            "datasync_resync_records_remaining", "Records left to read in the running rebuild", ["topic"], registry=r
        )
        self.table_keys = Gauge("datasync_table_keys", "Keys in the state table", ["topic"], registry=r)
        self.lag = Gauge(
            "datasync_consumer_lag", "Records between position and high watermark", ["topic", "partition"], registry=r
        )
        self.dead_letters = Counter(
            "datasync_dead_letters", "Rejected records copied to the dead-letter topic", ["topic"], registry=r
        )
        self.dead_letter_failures = Counter(
            "datasync_dead_letter_failures", "Rejected records that could not be copied", ["topic"], registry=r
        )
        self.published = Counter("datasync_records_published", "Records acknowledged", ["publisher"], registry=r)
        self.publish_failures = Counter(
            "datasync_publish_failures", "Records the broker did not acknowledge", ["publisher"], registry=r
        )
        self.publish_callback_failures = Counter(
            "datasync_publish_callback_failures", "put_nowait on_done callbacks that raised", ["publisher"], registry=r
        )
        self.broker_up = Gauge("datasync_broker_connected", "1 while the broker answers, else 0", registry=r)
        self.owned_partitions = Gauge(
            "datasync_owned_partitions", "Partitions this member owns in its group", ["topic"], registry=r
        )
        self.rebalances = Counter("datasync_rebalances", "Assignment changes this member went through", registry=r)
        self.rebalance_seconds = Gauge(
            "datasync_rebalance_duration_seconds",
            "Last rebalance: from revocation until the moved partitions were read and the plugins resynced",
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            "datasync_snapshot_bytes", "Size of the last snapshot written", ["topic"], registry=r
        )
        self.snapshot_write_seconds = Gauge(
            "datasync_snapshot_write_seconds", "Duration of the last snapshot write", ["topic"], registry=r
        )
        self.snapshot_write_failures = Counter(
            "datasync_snapshot_write_failures", "Snapshot writes that failed (disk full, not writable)", ["topic"],
            registry=r,
        )  # fmt: skip
        self.snapshot_partitions_loaded = Gauge(
            "datasync_snapshot_partitions_loaded",
            "Partitions the last table rebuild loaded from a snapshot (0: read from the beginning)",
            ["topic"],
            registry=r,
        )
        self.snapshot_load_seconds = Gauge(
            "datasync_snapshot_load_seconds",
            "Time the last table rebuild spent loading snapshot files (checksums included)",
            ["topic"],
            registry=r,
        )
        self.snapshot_rejected = Counter(
            "datasync_snapshot_rejected", "Snapshots found but not used, by reason", ["topic", "reason"], registry=r
        )
        self.snapshot_taken: dict[str, float] = {}  # topic -> unix time the last snapshot's positions were taken
        r.register(_SnapshotAge(self.snapshot_taken))


class _SnapshotAge(Collector):
    """``datasync_snapshot_age_seconds``: computed when scraped, so it grows between writes."""

    def __init__(self, taken: dict[str, float]) -> None:
        self._taken = taken

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "datasync_snapshot_age_seconds", "Age of the newest snapshot written", labels=["topic"]
        )
        now = time.time()
        for topic, taken in sorted(self._taken.items()):
            family.add_metric([topic], now - taken)
        yield family
