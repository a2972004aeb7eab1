"""Prometheus metrics of one engine, in a registry of its own (several engines may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter("datasync_records_consumed", "Records read from table topics", ["topic"], registry=r)
        self.bad_records = Counter(
            "datasync_bad_records",
            "Records that could not be applied (undecodable value or key)",
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
            "datasync_resyncs", "Full resyncs (table rebuilt from the topics)", ["reason"], registry=r
        )
        self.resync_seconds = Gauge("datasync_resync_last_seconds", "Duration of the last table rebuild", registry=r)
        self.table_keys = Gauge("datasync_table_keys", "Keys in the state table", ["topic"], registry=r)
