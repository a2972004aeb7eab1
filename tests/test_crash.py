"""The service killed with SIGKILL, during a resync and during live traffic: a restart converges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
async def main(bootstrap, topic, start, count, pause_every):
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await p.start()
    for i in range(start, start + count):
        value = None if i % 7 == 3 else b"v%d" % i
        await p.send(topic, key=b"k%d" % (i % 300), value=value)
        if pause_every and i % pause_every == 0:
            await asyncio.sleep(0.01)
    await p.stop()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


def expected_after(count: int) -> dict[str, str]:
    view: dict[str, str] = {}
    for i in range(count):
        key = f"k{i % 300}"
        if i % 7 == 3:
            view.pop(key, None)
        else:
            view[key] = f"v{i}"
    return view


class Service:
    def __init__(self, workdir: Path, bootstrap: str, topic: str) -> None:
        self.workdir, self.bootstrap, self.topic = workdir, bootstrap, topic
        self.process: subprocess.Popen[bytes] | None = None

    def bindings(self, resync_delay_s: float) -> None:
        (self.workdir / "topics").mkdir(exist_ok=True)
        (self.workdir / "topics" / "t.yaml").write_text(f"""
topics: [{{name: {self.topic}, partitions: 3, value: string}}]
plugins:
  - name: view
    class: fileview:FileView
    settings: {{path: {self.workdir / "view.json"}, resync_delay_s: {resync_delay_s}}}
    watch: [{{topic: {self.topic}}}]
""")

    def start(self) -> None:
        env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap, "DATASYNC_HTTP__ENABLED": "false",
               "PYTHONPATH": str(ROOT / "tests")}  # fmt: skip
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
        return (self.workdir / "service.log").read_text(errors="replace")[-3000:]


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
