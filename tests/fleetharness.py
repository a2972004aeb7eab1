"""Harness for fleet tests: several real ``datasync run`` processes in one consumer group."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from conftest import CHILD_PYTHONPATH
from localkafka import free_port, terminate

ROOT = Path(__file__).resolve().parent.parent


class Member:
    """One ``datasync run`` process with its own directory (bindings, plugin views, log) and HTTP port."""

    def __init__(self, root: Path, name: str, bootstrap: str, group: str, bindings: str, **env: str) -> None:
        self.name = name
        self.dir = root / name
        (self.dir / "topics").mkdir(parents=True)
        (self.dir / "topics" / "t.yaml").write_text(bindings.replace("DIR", str(self.dir)))
        self.port = free_port()
        self.env = {
            **os.environ,
            "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "DATASYNC_GROUP__ID": group,
            "DATASYNC_HTTP__PORT": str(self.port),
            "PYTHONPATH": CHILD_PYTHONPATH,
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Member:
        with open(self.dir / "service.log", "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "datasync.cli", "run"], cwd=self.dir,
                                            env=self.env, stdout=log, stderr=log)  # fmt: skip
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.process.wait(timeout=60)

    def get(self, path: str) -> Any:
        """GET a JSON endpoint (None while the member does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except (OSError, ValueError):
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def view(self, plugin: str) -> dict[str, Any]:
        path = self.dir / f"{plugin}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def journal(self, plugin: str) -> list[str]:
        path = self.dir / f"{plugin}.journal"
        return path.read_text().splitlines() if path.exists() else []

    def log(self) -> str:
        path = self.dir / "service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        terminate(self.process)


def stable(member: Member) -> dict[str, Any] | None:
    """The member's status once its group is stable and every plugin is ready, else None."""
    status = member.get("/v1/status")
    if not status or not status.get("group") or status["group"]["state"] != "stable":
        return None
    if any(p["state"] != "ready" for p in status["plugins"].values()):
        return None
    result: dict[str, Any] = status
    return result


def wait_until(check: Callable[[], bool], timeout: float, members: list[Member], what: str) -> float:
    """Poll ``check`` (outside processes: nothing to await); return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {m.name}\n{m.log()[-2500:]}" for m in members)
            raise AssertionError(f"{what}: not reached in {timeout}s\n{logs}")
        time.sleep(0.2)
    return time.monotonic() - started


def produce(bootstrap: str, topic: str, items: list[tuple[str, Any]]) -> None:
    """Write JSON values (None: a tombstone), keyed, with the default partitioner."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, key=key.encode(), value=None if value is None
                                           else json.dumps(value).encode()) for key, value in items]  # fmt: skip
            for future in futures:
                await future
        finally:
            await producer.stop()

    asyncio.run(run())
