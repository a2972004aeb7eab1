"""The targets of the issue, the printed table and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phases import Round

MIN_RESYNC_RATE = 100_000  # records/s
MAX_RATIO_BYTES = 1.25  # resync time / time of the limit loop keeping bytes
MAX_RATIO_READING = 1.0  # time of a resync whose plugins read every value / time of the decoding limit loop
MIN_LIVE_RATE = 50_000  # changes/s
MAX_P99_MS = 50.0  # at 5,000 records/s
MEMORY_FACTOR, MEMORY_PER_KEY = 2.0, 200.0  # bytes/key <= 2 x raw key+value bytes + 200
MIN_RESTART_SPEEDUP = 10.0  # full rebuild time / restart-from-snapshot time
MAX_SNAPSHOT_P99_MS = 10.0  # at 5,000 records/s while a snapshot is written
MIN_WRITING_SHARE = 0.9  # of the latency window, a snapshot write running (writes run back to back)


@dataclass
class Row:
    metric: str
    measured: str
    target: str = "-"
    ok: bool | None = None

    @property
    def result(self) -> str:
        return "-" if self.ok is None else ("PASS" if self.ok else "MISS")


def best(rounds: list[Round]) -> Round:
    return min(rounds, key=lambda r: r.seconds)


def summarize_rounds(rounds: list[Round]) -> dict[str, Any]:
    fastest = best(rounds)
    return {
        "best_seconds": fastest.seconds,
        "median_seconds": statistics.median(r.seconds for r in rounds),
        "records": fastest.records,
        "keys": fastest.keys,
        "gc_seconds": fastest.gc_seconds,
        "cpu_seconds": fastest.cpu_seconds,
        "best_cpu_seconds": min(r.cpu_seconds for r in rounds),
        "records_per_s": fastest.rate,
        "rounds_seconds": [r.seconds for r in rounds],
    }


def rows(results: dict[str, Any]) -> list[Row]:
    """One row per measurement, with its target and verdict where the issue sets one."""
    out: list[Row] = []
    limit_bytes, limit = results.get("limit_bytes"), results.get("limit")
    resync, reading = results.get("resync"), results.get("resync_reading")
    if limit_bytes:
        out.append(Row("limit loop keeping bytes", f"{limit_bytes['records_per_s']:,.0f} rec/s"))
    if limit:
        out.append(Row("limit loop decoding (fastavro)", f"{limit['records_per_s']:,.0f} rec/s"))
    if resync:
        rate = resync["records_per_s"]
        out.append(
            Row(
                "resync (2 no-op plugins)",
                f"{rate:,.0f} rec/s",
                f">= {MIN_RESYNC_RATE:,} rec/s",
                rate >= MIN_RESYNC_RATE,
            )
        )
    if reading:
        out.append(Row("resync (2 plugins reading values)", f"{reading['records_per_s']:,.0f} rec/s"))
    for name, (mine, theirs, bound) in {
        "resync / limit keeping bytes": (resync, limit_bytes, MAX_RATIO_BYTES),
        "resync reading / limit decoding": (reading, limit, MAX_RATIO_READING),
    }.items():
        if mine and theirs:
            ratio = mine["best_seconds"] / theirs["best_seconds"]
            key = "ratio_" + name.replace(" / ", "_vs_").replace(" ", "_")
            results[key] = ratio
            results[key + "_median"] = mine["median_seconds"] / theirs["median_seconds"]
            times = f"{ratio:.2f}x ({mine['best_seconds']:.2f}s / {theirs['best_seconds']:.2f}s)"
            out.append(Row(name, times, f"<= {bound:.2f}x", ratio <= bound))
            cpu = mine["best_cpu_seconds"] / theirs["best_cpu_seconds"]
            results[key + "_cpu"] = cpu
            times = f"{cpu:.2f}x ({mine['best_cpu_seconds']:.2f}s / {theirs['best_cpu_seconds']:.2f}s)"
            out.append(Row("  in CPU time of the process", times))
    live = results.get("live")
    if live:
        rate = live["dispatched_per_s"]
        ok = rate >= MIN_LIVE_RATE
        out.append(Row("live dispatch, full-speed writer", f"{rate:,.0f} changes/s", f">= {MIN_LIVE_RATE:,}/s", ok))
        drain = live["drain_per_s"]
        out.append(Row("  writer's rate", f"{live['produced_per_s']:,.0f} rec/s"))
        out.append(Row("  backlog drained after it", "kept up" if drain is None else f"{drain:,.0f} changes/s"))
        lat = f"p50 {live['p50_ms']:.1f} ms, p99 {live['p99_ms']:.1f} ms"
        where = f"latency at {live['latency_rate']:,} rec/s"
        out.append(Row(where, lat, f"p99 <= {MAX_P99_MS:.0f} ms", live["p99_ms"] <= MAX_P99_MS))
    memory = results.get("memory")
    if memory:
        target = MEMORY_FACTOR * memory["raw_bytes_per_key"] + MEMORY_PER_KEY
        memory["target_bytes_per_key"] = target
        measured = f"{memory['bytes_per_key']:,.0f} B (raw {memory['raw_bytes_per_key']:.0f} B)"
        out.append(
            Row("memory per key after resync", measured, f"<= {target:,.0f} B", memory["bytes_per_key"] <= target)
        )
    restart = results.get("restart")
    if restart:
        out.extend(restart_rows(restart))
    return out


def restart_rows(restart: dict[str, Any]) -> list[Row]:
    full, snap = restart["full"], restart["snapshot"]
    times = f"{restart['speedup']:.1f}x ({full['seconds']:.2f}s / {snap['seconds']:.2f}s)"
    where = f"restart, {restart['changed_keys']:,} keys changed"
    equal = restart["equal_tables"] and restart["all_loaded_from_snapshot"]
    mib = 1 << 20
    rss = f"{snap['rss_after'] / mib:,.0f} MiB vs {full['rss_after'] / mib:,.0f} MiB"
    quiet, busy = restart["latency_without_snapshots"], restart["latency_while_writing"]
    lat = f"p50 {busy['p50_ms']:.1f} ms, p99 {busy['p99_ms']:.1f} ms"
    writing = busy["writing_share"] >= MIN_WRITING_SHARE
    return [
        Row(where, times, f">= {MIN_RESTART_SPEEDUP:.0f}x faster", restart["speedup"] >= MIN_RESTART_SPEEDUP),
        Row(
            "  the same without loading the files",
            f"{full['seconds'] / (rest := snap['seconds'] - snap['load_seconds']):.1f}x ({rest:.2f}s, of which "
            f"RESYNC {snap['resync_seconds']:.2f}s)",
        ),
        Row("  table equal to the full rebuild's", "yes" if equal else "NO", "equal", equal),
        Row(
            "  snapshot files",
            f"{restart['seed']['snapshot_bytes'] / mib:,.0f} MiB, written in {restart['seed']['stop_seconds']:.2f}s",
        ),
        Row("  RSS after ready, snapshot vs full", rss, "not above", snap["rss_after"] <= full["rss_after"]),
        Row(
            f"latency at {busy['rate']:,}/s, writing snapshots (median)",
            lat,
            f"p99 <= {MAX_SNAPSHOT_P99_MS:.0f} ms",
            writing and busy["p99_ms"] <= MAX_SNAPSHOT_P99_MS,
        ),
        Row(
            "  share of the window with a write running",
            f"{busy['writing_share']:.0%}",
            f">= {MIN_WRITING_SHARE:.0%}",
            writing,
        ),
        Row("  p99 of each window", ", ".join(f"{p:.1f} ms" for p in busy["p99s_ms"])),
        Row("  same, no snapshots", f"p50 {quiet['p50_ms']:.1f} ms, p99 {quiet['p99_ms']:.1f} ms"),
        Row("  p99 of each window", ", ".join(f"{p:.1f} ms" for p in quiet["p99s_ms"])),
    ]


def table(rows_: list[Row]) -> str:
    header = Row("metric", "measured", "target")
    widths = [max(len(getattr(r, f)) for r in [header, *rows_]) for f in ("metric", "measured", "target")]
    lines = []
    for r in [header, *rows_]:
        cells = [r.metric.ljust(widths[0]), r.measured.ljust(widths[1]), r.target.ljust(widths[2])]
        lines.append("  ".join([*cells, "result" if r is header else r.result]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any], rows_: list[Row]) -> None:
    results["verdicts"] = {r.metric.strip(): r.result for r in rows_ if r.ok is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
