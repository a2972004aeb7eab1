"""A local Apicurio Registry on 127.0.0.1 (in-memory storage), for the schema registry tests.

Its Confluent-compatible API is under ``/apis/ccompat/v7``. The distribution
comes from Maven Central (``io.apicurio:apicurio-registry-app``, classifier
``all``, a tar.gz of the runner jar and ``lib/``) and is unpacked once under
``$DATASYNC_KAFKA_CACHE`` (default ``~/.cache/datasync``), next to the broker's jars.

    python tools/localregistry.py run     # start, print the URL, wait for Ctrl-C
    python tools/localregistry.py fetch   # only download and unpack
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from localkafka import free_port, terminate

VERSION = "3.0.9"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{VERSION}:tar.gz:all"
RUNNER = f"apicurio-registry-app-{VERSION}-runner.jar"
CCOMPAT = "/apis/ccompat/v7"


def cache_dir() -> Path:
    root = Path(os.environ.get("DATASYNC_KAFKA_CACHE", Path.home() / ".cache" / "datasync"))
    return root / f"apicurio-registry-{VERSION}"


def fetch() -> Path:
    """Download and unpack the registry once; return the directory holding the runner jar."""
    home = cache_dir()
    marker = home / ".complete"
    if marker.exists():
        return home
    with tempfile.TemporaryDirectory(prefix="datasync-apicurio-") as tmp:
        subprocess.run(
            ["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={tmp}"], check=True
        )
        [archive] = Path(tmp).glob("*.tar.gz")
        partial = home.with_name(home.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
    marker.touch()
    return home


class LocalRegistry:
    """``start()`` / ``stop()``; ``url`` is the Confluent-compatible base URL."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + CCOMPAT
        self.workdir = Path(tempfile.mkdtemp(prefix="datasync-registry-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> LocalRegistry:
        home = fetch()
        command = ["java", "-Xmx384m", "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={self.port}",
                   "-jar", str(home / RUNNER)]  # fmt: skip
        with open(self.workdir / "registry.log", "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Apicurio Registry exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/subjects", timeout=2) as response:
                    json.load(response)
                    return self
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"Apicurio Registry not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "registry.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        terminate(self.process)
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "run"
    if command == "fetch":
        print(fetch())
        return 0
    if command != "run":
        print(__doc__, file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    registry = LocalRegistry(port=int(os.environ.get("REGISTRY_PORT", "0")) or None).start()
    print(f"Apicurio Registry ready at {registry.url}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
