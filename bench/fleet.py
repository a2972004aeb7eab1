"""Fleet benchmark: failover and rolling restart of `datasync run` members sharing a partitioned table.

    .venv/bin/python bench/fleet.py                      # 1,000,000 keys, 12 partitions, 3 members
    .venv/bin/python bench/fleet.py --keys 100000 --bootstrap 127.0.0.1:19092

1. One member holds the whole table (the baseline: its full read, from its own metrics).
2. Two more join; the three share the 12 partitions.
3. kill -9 of one member: the time until every partition is owned, read and resynced on the
   survivors (polled from their /v1/status), against session timeout + a third of the baseline;
   three times (a new member replaces the killed one each time), the median reported.
4. Rolling restart of the three: for each, a new member is started, then the old one gets SIGTERM;
   per partition, the longest stretch no member held it (status polled every 50 ms), against the
   time to read one member's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen import ensure_table
from workload import BENCH, ITEM, RESULTS, ROOT, TableLayout

SESSION_MS = 6000  # the broker's smallest (group.min.session.timeout.ms)
HEARTBEAT_MS = 250  # survivors learn of a rebalance at their next heartbeat: part of every handover
FAILOVER_ROUNDS = 3  # kill -9 of a member, three times; the median is reported
POLL_S = 0.05


@dataclass(frozen=True)
class FleetLayout(TableLayout):
    @property
    def topic(self) -> str:
        return f"bench.fleet.{self.keys}.{self.partitions}"


BINDINGS = """
topics: [{name: TOPIC, partitions: PARTS, value: "avro:ITEM", sharding: partitioned}]
plugins:
  - {name: counter, class: "workload:KeyCounter", watch: [{topic: TOPIC}]}
"""


class Member:
    def __init__(self, workdir: Path, name: str, bootstrap: str, group: str) -> None:
        self.name = name
        self.port = _free_port()
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "DATASYNC_GROUP__ID": group,
               "DATASYNC_GROUP__SESSION_TIMEOUT_MS": str(SESSION_MS),
               "DATASYNC_GROUP__HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
               "DATASYNC_HTTP__PORT": str(self.port), "DATASYNC_SCHEMAS_DIR": str(BENCH / "schemas"),
               "PYTHONPATH": str(BENCH)}  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "datasync.cli", "run"], cwd=workdir, env=env,
                                            stdout=log, stderr=log)  # fmt: skip

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/status", timeout=2) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except (OSError, ValueError):
            return None

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=120)


def _free_port() -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    from localkafka import free_port

    return free_port()


def held(members: list[Member], topic: str) -> dict[int, str]:
    """Partition -> the member that holds it read and resynced (ready plugins)."""
    out: dict[int, str] = {}
    for m in members:
        status = m.status()
        if not status or not status.get("group"):
            continue
        if any(p["state"] != "ready" for p in status["plugins"].values()):
            continue
        for p in status["group"]["owned"].get(topic, []):
            out[p] = m.name
    return out


def stable(member: Member) -> bool:
    """The member's group is stable (it may still be starting: no group yet)."""
    group = (member.status() or {}).get("group")
    return bool(group) and group["state"] == "stable"


def wait_all_held(members: list[Member], topic: str, partitions: int, timeout: float) -> float:
    started = time.monotonic()
    while len(held(members, topic)) < partitions or not all(stable(m) for m in members):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"partitions not all held after {timeout}s: {held(members, topic)}")
        time.sleep(POLL_S)
    return time.monotonic() - started


def progress(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    layout = FleetLayout(args.keys, partitions=args.partitions)
    generated = asyncio.run(ensure_table(bootstrap, layout))
    progress(f"table {layout.topic}: " + ("reused" if generated is None else f"generated in {generated:.1f}s"))
    topic, n = layout.topic, layout.partitions
    group = f"bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="datasync-fleet-"))
    (workdir / "topics").mkdir()
    bindings = BINDINGS.replace("TOPIC", topic).replace("PARTS", str(n)).replace("ITEM", ITEM)
    (workdir / "topics" / "t.yaml").write_text(bindings)
    members: list[Member] = []
    results: dict[str, Any] = {"keys": layout.keys, "partitions": n, "session_timeout_s": SESSION_MS / 1000}
    try:
        members.append(Member(workdir, "m0", bootstrap, group))
        took = wait_all_held(members, topic, n, 600)
        full_read = members[0].metric("datasync_resync_duration_seconds") or took
        results["one_member_full_read_s"] = full_read
        progress(f"one member read all {n} partitions in {full_read:.2f}s (ready after {took:.2f}s)")
        members += [Member(workdir, f"m{i}", bootstrap, group) for i in (1, 2)]
        took = wait_all_held(members, topic, n, 600)
        results["three_members_shared_s"] = took
        progress(f"three members share the partitions after {took:.2f}s")

        rounds = []
        for r in range(FAILOVER_ROUNDS):  # one failover's time moves by half a second between runs here
            victim = members.pop(1)
            moved = [p for p, name in held([*members, victim], topic).items() if name == victim.name]
            victim.stop(signal.SIGKILL)
            took = wait_all_held(members, topic, n, 600)
            rounds.append({"moved_partitions": len(moved), "seconds": took,
                           "after_session_timeout_s": took - SESSION_MS / 1000})  # fmt: skip
            progress(f"kill -9 round {r + 1}: {len(moved)} partitions resynced on the survivors {took:.2f}s later")
            members.append(Member(workdir, f"k{r}", bootstrap, group))
            wait_all_held(members, topic, n, 600)
        median = statistics.median_low(round["seconds"] for round in rounds)
        results["failover"] = {**next(round for round in rounds if round["seconds"] == median),
                               "target_s": SESSION_MS / 1000 + full_read / 3, "rounds": rounds}  # fmt: skip

        results["rolling_restart"] = rolling_restart(workdir, members, bootstrap, group, topic, n)
        results["share_read_s"] = full_read / 3
    finally:
        for m in members:
            m.stop()
    return results


def rolling_restart(
    workdir: Path, members: list[Member], bootstrap: str, group: str, topic: str, n: int
) -> dict[str, Any]:
    """Replace each member: start the new one, wait until it holds partitions, SIGTERM the old one."""
    unheld_since: dict[int, float] = {}
    longest = dict.fromkeys(range(n), 0.0)

    def sample() -> None:
        now, holders = time.monotonic(), held(members, topic)
        for p in range(n):
            if p in holders:
                if p in unheld_since:
                    longest[p] = max(longest[p], now - unheld_since.pop(p))
            else:
                unheld_since.setdefault(p, now)

    def sample_until(done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("rolling restart step did not finish")
            sample()
            time.sleep(POLL_S)
        sample()

    started = time.monotonic()
    for i, old in enumerate(list(members)):
        new = Member(workdir, f"r{i}", bootstrap, group)
        members.append(new)
        sample_until(lambda new=new: len(held(members, topic)) == n and stable(new), 600)
        old.stop(signal.SIGTERM)
        members.remove(old)
        sample_until(lambda: len(held(members, topic)) == n, 600)
    return {"seconds": time.monotonic() - started, "longest_unheld_s": max(longest.values()),
            "per_partition_unheld_s": longest}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--bootstrap", help="host:port of a running broker (default: start a local one, stop it after)")
    p.add_argument("--json", type=Path, default=RESULTS / "fleet.json")
    args = p.parse_args()
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        sys.path.insert(0, str(ROOT / "tools"))
        from localkafka import LocalBroker

        broker = LocalBroker().start()
        bootstrap = broker.bootstrap
    try:
        results = run(args, bootstrap)
    finally:
        if broker is not None:
            broker.stop()
    results["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    f, r = results["failover"], results["rolling_restart"]
    print(f"one member, full read of {results['keys']:,} keys / {results['partitions']} partitions: "
          f"{results['one_member_full_read_s']:.2f}s")  # fmt: skip
    each = ", ".join(f"+ {one['after_session_timeout_s']:.2f}s" for one in f["rounds"])
    print(f"kill -9 of 1 of 3 ({FAILOVER_ROUNDS} times: {each}); median: {f['moved_partitions']} partitions "
          f"resynced elsewhere after {f['seconds']:.2f}s "
          f"(session timeout {SESSION_MS / 1000:.0f}s + {f['after_session_timeout_s']:.2f}s; "
          f"target <= {f['target_s']:.2f}s: {'PASS' if f['seconds'] <= f['target_s'] else 'MISS'})")  # fmt: skip
    print(f"rolling restart of 3: {r['seconds']:.1f}s; longest a partition was not held: {r['longest_unheld_s']:.2f}s "
          f"(one member's share reads in {results['share_read_s']:.2f}s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
