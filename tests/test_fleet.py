"""Several real ``datasync run`` processes in one group: partitioned tables, failover, changefeed handover."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetharness import Member, produce, stable, wait_until
from test_crash import expected_feed, read_feed, write

from datasync.admin import prepare_topics
from datasync.bindings import TopicSpec
from datasync.settings import KafkaSettings

FAST_GROUP = {"DATASYNC_GROUP__SESSION_TIMEOUT_MS": "6000", "DATASYNC_GROUP__HEARTBEAT_INTERVAL_MS": "1000"}

VIEWS = """
topics:
  - {name: P, partitions: 6, value: json, sharding: partitioned}
  - {name: R, partitions: 2, value: json}
plugins:
  - name: view
    class: fileview:FileView
    settings: {path: DIR/view.json, journal: DIR/view.journal}
    watch: [{topic: P}]
  - name: delta
    class: fileview:FileView
    resync: delta
    settings: {path: DIR/delta.json, journal: DIR/delta.journal}
    watch: [{topic: P}]
  - name: joined
    class: fileview:FileView
    settings: {path: DIR/joined.json}
    watch: [{topic: P}, {topic: R}]
"""


@pytest.fixture
def fleet(tmp_path: Path, bootstrap: str) -> Iterator[list[Member]]:
    """Members are added by the test; every one still running is stopped at the end."""
    started: list[Member] = []
    yield started
    for member in started:
        member.stop()


def new_members(fleet: list[Member], root: Path, bootstrap: str, bindings: str, names: list[str],
                group: str, **env: str) -> list[Member]:  # fmt: skip
    out = [Member(root, name, bootstrap, group, bindings, **env) for name in names]
    fleet.extend(out)
    return out


def owned(status: dict[str, Any], topic: str) -> set[int]:
    return set(status["group"]["owned"][topic])


def views_bindings() -> tuple[str, str, str, str]:
    """A fresh group and topics: (group, partitioned topic, replicated topic, bindings)."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    p, r = f"p-{group}", f"r-{group}"
    bindings = VIEWS.replace("name: P,", f"name: {p},").replace("name: R,", f"name: {r},")
    bindings = bindings.replace("{topic: P}", "{topic: " + p + "}").replace("{topic: R}", "{topic: " + r + "}")
    return group, p, r, bindings


def partitioned_view_converged(
    alive: list[Member], topic: str, expected: dict[str, Any], replicated: dict[str, Any]
) -> bool:
    """Every member stable; the members' views of P are disjoint and their union is P's state; every
    member's delta-mode view equals its full-mode view; each joined view is its share of P plus all of R."""
    statuses = [stable(m) for m in alive]
    if not all(statuses):
        return False
    shares = [owned(s, topic) for s in statuses if s is not None]
    if sorted(p for share in shares for p in share) != list(range(6)):
        return False  # partitions not yet divided among exactly these members
    views = [m.view("view") for m in alive]
    union: dict[str, Any] = {}
    for view in views:
        if union.keys() & view.keys():
            return False
        union.update(view)
    if union != expected:
        return False
    for member, view in zip(alive, views, strict=True):
        if member.view("delta") != view or member.view("joined") != {**view, **replicated}:
            return False
    return True


def state_after(ops: list[tuple[str, Any]]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in ops:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return state


def test_partitioned_topic_divided_among_members_and_failover_after_sigkill(
    fleet: list[Member], tmp_path: Path, bootstrap: str
) -> None:
    group, P, R, bindings = views_bindings()
    a, b, c = new_members(fleet, tmp_path, bootstrap, bindings, ["a", "b", "c"], group, **FAST_GROUP)
    a.start()
    wait_until(lambda: stable(a) is not None, 60, [a], "first member ready")
    ops: list[tuple[str, Any]] = [(f"k{i}", {"n": i}) for i in range(600)]
    produce(bootstrap, P, ops)
    replicated = {f"r{i}": {"r": i} for i in range(20)}
    produce(bootstrap, R, list(replicated.items()))

    def converged(alive: list[Member]) -> bool:
        return partitioned_view_converged(alive, P, state_after(ops), replicated)

    wait_until(lambda: converged([a]), 60, [a], "one member holds everything")
    b.start()
    c.start()
    took = wait_until(lambda: converged([a, b, c]), 90, [a, b, c], "three members share the partitions")
    print(f"three members converged in {took:.1f}s")
    statuses = [stable(m) for m in (a, b, c)]
    assert all(statuses)
    shares = [owned(s, P) for s in statuses if s is not None]
    assert all(shares), f"a member owns nothing: {shares}"
    # Replicated: every member reads all of R; each of its partitions is owned (for feeds) by one member.
    r_shares = [owned(s, R) for s in statuses if s is not None]
    assert sorted(p for share in r_shares for p in share) == [0, 1]
    assert len({s["group"]["member_id"] for s in statuses if s is not None}) == 3

    # The first member gave partitions away: its delta-mode plugin got them as releases, never as deletes.
    delta = a.journal("delta")
    released = {line.split(" ", 1)[1] for line in delta if line.startswith("release ")}
    assert released and released.isdisjoint(a.view("view")), delta[:20]
    assert not [line for line in delta if line.startswith("delete ")]
    assert re.search(r"rebalance: gained \S+, lost \S+, kept", a.log())
    metrics = a.metrics()
    assert f'datasync_owned_partitions{{topic="{P}"}} {float(len(shares[0]))}' in metrics
    assert re.search(r"^datasync_rebalances_total [1-9]", metrics, re.M)

    # SIGKILL one member while keys change: the others take its partitions over.
    b.signal(signal.SIGKILL)
    more = [(f"k{i}", {"n": i, "v": 2}) for i in range(0, 600, 3)] + [(f"k{i}", None) for i in range(1, 600, 10)]
    produce(bootstrap, P, more)
    ops += more
    took = wait_until(lambda: converged([a, c]), 90, [a, c], "the survivors own every partition")
    print(f"failover after SIGKILL converged in {took:.1f}s")
    for member in (a, b, c):
        for plugin in ("view", "delta"):
            assert not [line for line in member.journal(plugin) if line.startswith("stale ")], "prev value mismatch"


def test_sigterm_leaves_the_group_at_once(fleet: list[Member], tmp_path: Path, bootstrap: str) -> None:
    """With a one-minute session timeout, the partitions of a member stopped with SIGTERM move in seconds."""
    group, P, _, bindings = views_bindings()
    slow = {"DATASYNC_GROUP__SESSION_TIMEOUT_MS": "60000"}
    a, b = new_members(fleet, tmp_path, bootstrap, bindings, ["a", "b"], group, **slow)
    ops = [(f"k{i}", {"n": i}) for i in range(300)]
    a.start()
    wait_until(lambda: stable(a) is not None, 60, [a], "first member ready")
    produce(bootstrap, P, ops)
    b.start()
    wait_until(lambda: partitioned_view_converged([a, b], P, dict(ops), {}), 90, [a, b], "two members share")
    b.signal(signal.SIGTERM)
    assert b.process is not None and b.process.returncode == 0, b.log()[-2000:]
    # Well under the session timeout: a member that did not leave would hold its partitions for 60 s.
    took = wait_until(lambda: partitioned_view_converged([a], P, dict(ops), {}), 30, [a], "the survivor owns all")
    print(f"partitions moved {took:.1f}s after SIGTERM")
    assert "left group" in b.log()


FEED = """
topics:
  - {name: SRC, partitions: 3, value: json, sharding: partitioned}
  - {name: SRC.changes, partitions: 3, value: json}
publishers: [{name: feed, topic: SRC.changes}]
plugins:
  - name: feed
    class: datasync.changefeed:Changefeed
    settings: {publisher: feed, tombstones: true}
    watch: [{topic: SRC}]
"""


def test_changefeed_handover_has_no_gap_and_no_repeat(fleet: list[Member], tmp_path: Path, bootstrap: str) -> None:
    """Kill -9, a zombie (SIGSTOP past the session timeout, then SIGCONT), a rolling restart (the new
    member started before the old one stops): each source partition's envelopes come out exactly once."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    source = f"src-{group}"
    bindings = FEED.replace("SRC", source)
    a, b, c, d = new_members(fleet, tmp_path, bootstrap, bindings, ["a", "b", "c", "d"], group, **FAST_GROUP)
    a.start()
    wait_until(lambda: stable(a) is not None, 60, [a], "first member ready")
    b.start()
    wait_until(lambda: all(stable(m) for m in (a, b)), 60, [a, b], "two members ready")
    writer = write(bootstrap, source, 0, 9000, pause_every=20)
    time.sleep(1.5)
    a.signal(signal.SIGKILL)  # mid-stream
    c.start()
    time.sleep(3)
    assert writer.poll() is None, "the writer finished too early"
    b.signal(signal.SIGSTOP)  # a zombie: expelled after the session timeout, then it wakes up
    time.sleep(9)
    b.signal(signal.SIGCONT)
    d.start()  # rolling restart: the new one first, then the old one stops
    wait_until(lambda: stable(d) is not None, 90, [b, c, d], "the new member ready")
    c.signal(signal.SIGTERM)
    assert writer.wait(timeout=180) == 0
    expected = expected_feed(9000)
    outbound = f"{source}.changes"

    def complete() -> bool:
        return asyncio.run(read_feed(bootstrap, outbound)) == expected

    wait_until(complete, 90, [b, d], "the outbound topic has every envelope once")
    # The zombie recovered: it is a ready member again (its fenced producers were replaced).
    wait_until(lambda: all(stable(m) for m in (b, d)), 60, [b, d], "both members ready")


def test_partition_counts_on_the_broker_must_match(fleet: list[Member], tmp_path: Path, bootstrap: str) -> None:
    """Declared co-partitioned, but created elsewhere with other counts: the member refuses to start (exit 2)."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    a_topic, b_topic = f"a-{group}", f"b-{group}"
    specs = [TopicSpec(name=a_topic, partitions=6), TopicSpec(name=b_topic, partitions=4)]
    asyncio.run(prepare_topics(KafkaSettings(bootstrap_servers=bootstrap), specs, create=True))
    bindings = f"""
topics:
  - {{name: {a_topic}, partitions: 6, value: json, sharding: partitioned}}
  - {{name: {b_topic}, partitions: 6, value: json, sharding: partitioned}}
plugins:
  - name: view
    class: fileview:FileView
    settings: {{path: DIR/view.json}}
    watch: [{{topic: {a_topic}}}, {{topic: {b_topic}}}]
"""
    (member,) = new_members(fleet, tmp_path, bootstrap, bindings, ["a"], group)
    member.start()
    assert member.process is not None and member.process.wait(timeout=60) == 2
    assert (
        f"datasync: broker: topics: partitioned topics must have equal partition counts (co-partitioned): "
        f"{a_topic} has 6, {b_topic} has 4"
    ) in member.log()
