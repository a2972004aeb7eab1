"""The service killed with SIGKILL, during a resync and during live traffic: a restart converges."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from conftest import CHILD_PYTHONPATH

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
async def main(bootstrap, topic, start, count, pause_every):
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await p.start()
    for i in range(start, start + count):
        value = None if i % 7 == 3 else b'{"n": %d}' % i
        await p.send(topic, key=b"k%d" % (i % 300), value=value)
        if pause_every and i % pause_every == 0:
            await asyncio.sleep(0.01)
    await p.stop()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


def expected_after(count: int) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for i in range(count):
        key = f"k{i % 300}"
        if i % 7 == 3:
            view.pop(key, None)
        else:
            view[key] = {"n": i}
    return view


def expected_feed(count: int) -> dict[str, list[Any]]:
    """Per key, the envelopes (op, before, after) and tombstones the changefeed must emit, in order."""
    view: dict[str, Any] = {}
    feed: dict[str, list[Any]] = {}
    for i in range(count):
        key = f"k{i % 300}"
        if i % 7 == 3:
            if key in view:
                feed.setdefault(key, []).extend([("d", view.pop(key), None), "tombstone"])
        else:
            feed.setdefault(key, []).append(("u" if key in view else "c", view.get(key), {"n": i}))
            view[key] = {"n": i}
    return feed


class Service:
    def __init__(self, workdir: Path, bootstrap: str, topic: str) -> None:
        self.workdir, self.bootstrap, self.topic = workdir, bootstrap, topic
        self.process: subprocess.Popen[bytes] | None = None

    def bindings(self, resync_delay_s: float) -> None:
        self.write_bindings(f"""
topics: [{{name: {self.topic}, partitions: 3, value: json}}]
plugins:
  - name: view
    class: fileview:FileView
    settings: {{path: {self.workdir / "view.json"}, resync_delay_s: {resync_delay_s}}}
    watch: [{{topic: {self.topic}}}]
""")

    def write_bindings(self, text: str) -> None:
        (self.workdir / "topics").mkdir(exist_ok=True)
        (self.workdir / "topics" / "t.yaml").write_text(text)

    def wait_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def start(self, **extra_env: str) -> None:
        env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap, "DATASYNC_HTTP__ENABLED": "false",
               "PYTHONPATH": CHILD_PYTHONPATH, **extra_env}  # fmt: skip
        log = open(self.workdir / "service.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "datasync.cli", "run"], cwd=self.workdir, env=env,
                                        stdout=log, stderr=log)  # fmt: skip
        log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def view(self) -> dict[str, str] | None:
        path = self.workdir / "view.json"
        return json.loads(path.read_text()) if path.exists() else None

    def wait_view(self, expected: dict[str, str], timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()
            if self.view() == expected:
                return
            time.sleep(0.2)
        raise AssertionError(f"view never converged; {len(self.view() or {})} keys\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "service.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def service(tmp_path: Path, bootstrap: str, topic: str) -> Iterator[Service]:
    svc = Service(tmp_path, bootstrap, topic)
    yield svc
    if svc.process is not None and svc.process.poll() is None:
        svc.process.terminate()
        svc.process.wait(timeout=30)


def write(bootstrap: str, topic: str, start: int, count: int, pause_every: int = 0) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", WRITER, bootstrap, topic, str(start), str(count), str(pause_every)]
    return subprocess.Popen(args)


def test_sigkill_during_resync_then_restart_converges(service: Service, bootstrap: str, topic: str) -> None:
    service.bindings(resync_delay_s=3)
    service.start()  # creates the topic
    assert write(bootstrap, topic, 0, 2000).wait(timeout=60) == 0
    service.kill()
    (service.workdir / "resync-started").unlink(missing_ok=True)
    service.start()
    deadline = time.monotonic() + 30
    while not (service.workdir / "resync-started").exists():
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.05)
    service.kill()  # in the middle of the plugin's resync
    assert service.view() is None
    service.bindings(resync_delay_s=0)
    service.start()
    service.wait_view(expected_after(2000))


def test_sigkill_during_live_traffic_then_restart_converges(service: Service, bootstrap: str, topic: str) -> None:
    service.bindings(resync_delay_s=0)
    service.start()
    service.wait_view({})
    writer = write(bootstrap, topic, 0, 6000, pause_every=20)
    time.sleep(1.5)
    assert writer.poll() is None, "the writer finished before the crash"
    service.kill()  # mid-stream
    time.sleep(0.5)
    service.start()
    assert writer.wait(timeout=120) == 0
    service.wait_view(expected_after(6000))


def test_changefeed_killed_mid_stream_has_no_gap_and_no_repeat(service: Service, bootstrap: str, topic: str) -> None:
    """SIGKILL the service while its changefeed emits; after a restart the outbound topic is exactly right."""
    outbound = f"{topic}.changes"
    service.write_bindings(f"""
topics:
  - {{name: {topic}, partitions: 3, value: json}}
  - {{name: {outbound}, partitions: 3, value: json}}
publishers: [{{name: feed, topic: {outbound}}}]
plugins:
  - name: feed
    class: datasync.changefeed:Changefeed
    settings: {{publisher: feed, tombstones: true}}
    watch: [{{topic: {topic}}}]
""")
    service.start()
    service.wait_log("resynced")
    writer = write(bootstrap, topic, 0, 6000, pause_every=20)
    time.sleep(1.5)
    assert writer.poll() is None, "the writer finished before the crash"
    service.kill()
    time.sleep(0.5)
    service.start()
    assert writer.wait(timeout=120) == 0
    expected = expected_feed(6000)
    deadline = time.monotonic() + 60
    while True:
        got = asyncio.run(read_feed(bootstrap, outbound))
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = {k: len(v) - len(got.get(k, [])) for k, v in expected.items() if got.get(k) != v}
    assert got == expected, f"keys differing (expected minus got lengths): {dict(list(missing.items())[:5])}"


async def read_feed(bootstrap: str, topic: str) -> dict[str, list[Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        feed: dict[str, list[Any]] = {}
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                for r in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    if r.value is None:
                        feed.setdefault(r.key.decode(), []).append("tombstone")
                    else:
                        v = json.loads(r.value)
                        feed.setdefault(v["key"], []).append((v["op"], v["before"], v["after"]))
        return feed
    finally:
        await consumer.stop()
