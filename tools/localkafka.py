"""A single-node Apache Kafka broker (KRaft) on 127.0.0.1, for tests and ``make run``.

The broker's jars come from Maven Central through ``tools/kafka/pom.xml`` and
are cached under ``$DATASYNC_KAFKA_CACHE`` (default ``~/.cache/datasync``).
Data lives in a temporary directory that is removed on stop.

    python tools/localkafka.py run     # start, print the bootstrap address, wait for Ctrl-C
    python tools/localkafka.py fetch   # only download the jars
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "kafka" / "pom.xml"
LOG4J = HERE / "kafka" / "log4j2.yaml"


def cache_dir() -> Path:
    root = Path(os.environ.get("DATASYNC_KAFKA_CACHE", Path.home() / ".cache" / "datasync"))
    version = POM.read_text().split("<kafka.version>")[1].split("<")[0]
    return root / f"kafka-{version}"


def fetch_jars() -> Path:
    """Download the broker's jars once; return the directory holding them."""
    libs = cache_dir() / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ],
        check=True,
    )
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.touch()
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM ``process`` (if still running) and wait; SIGKILL it if it is not gone within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalBroker:
    """Start with ``start()``, stop with ``stop()``; ``bootstrap`` is the address to use.

    ``scram_users`` adds a SASL_PLAINTEXT listener (SCRAM-SHA-256/512) at
    ``sasl_bootstrap``; ``tls`` adds an SSL listener at ``ssl_bootstrap`` whose
    CA certificate is ``ca_file``. ``stop(keep_data=True)`` and ``start()``
    restart the same broker (same ports, same data), for fault tests.
    """

    def __init__(self, port: int | None = None, scram_users: dict[str, str] | None = None, tls: bool = False) -> None:
        self.port = port or free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.scram_users = scram_users or {}
        self.sasl_bootstrap = f"127.0.0.1:{free_port()}" if self.scram_users else ""
        self.ssl_bootstrap = f"127.0.0.1:{free_port()}" if tls else ""
        self.workdir = Path(tempfile.mkdtemp(prefix="datasync-kafka-"))
        self.ca_file = self.workdir / "ca.crt"
        self.process: subprocess.Popen[bytes] | None = None

    def _listeners(self) -> list[str]:
        listeners = [f"PLAINTEXT://{self.bootstrap}"]
        if self.sasl_bootstrap:
            listeners.append(f"SASL_PLAINTEXT://{self.sasl_bootstrap}")
        if self.ssl_bootstrap:
            listeners.append(f"SSL://{self.ssl_bootstrap}")
        return listeners

    def _security_properties(self) -> list[str]:
        lines = []
        if self.scram_users:
            module = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            lines += [
                "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512",
                f"listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config={module}",
                f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={module}",
            ]
        if self.ssl_bootstrap:
            keystore = self._make_certificates()
            lines += [
                "ssl.keystore.type=PKCS12",
                f"ssl.keystore.location={keystore}",
                "ssl.keystore.password=changeit",
                "ssl.key.password=changeit",
            ]
        return lines

    def _make_certificates(self) -> Path:
        """A throw-away CA and a server certificate for 127.0.0.1, with openssl."""
        d = self.workdir
        keystore = d / "server.p12"
        if keystore.exists():
            return keystore

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        ssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=datasync-test-ca",
            "-keyout",
            str(d / "ca.key"),
            "-out",
            str(self.ca_file),
        )
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(d / "server.key"),
            "-out",
            str(d / "server.csr"),
        )
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ssl(
            "x509",
            "-req",
            "-in",
            str(d / "server.csr"),
            "-CA",
            str(self.ca_file),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / "san.ext"),
            "-out",
            str(d / "server.crt"),
        )
        ssl(
            "pkcs12",
            "-export",
            "-in",
            str(d / "server.crt"),
            "-inkey",
            str(d / "server.key"),
            "-out",
            str(keystore),
            "-passout",
            "pass:changeit",
        )
        return keystore

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return ["java", "-Xms256m", "-Xmx768m", "-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={LOG4J}", main, *args]

    def start(self, timeout: float = 60.0) -> LocalBroker:
        libs = fetch_jars()
        props = self.workdir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners={','.join(self._listeners())},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners={','.join(self._listeners())}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map="
                    "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL",
                    *self._security_properties(),
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.cleaner.backoff.ms=1000",
                    "",
                ]
            )
        )
        if not (self.workdir / "data" / "meta.properties").exists():
            scram = []
            for user, password in self.scram_users.items():
                for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    scram += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
            format_args = ["format", "-t", uuid.uuid4().hex[:22], "-c", str(props), *scram]
            subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", *format_args), check=True, stdout=subprocess.DEVNULL
            )
        with open(self.workdir / "broker.log", "ab") as log:  # the broker keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self._java(libs, "kafka.Kafka", str(props)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Kafka broker exited early:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Kafka broker not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "broker.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, keep_data: bool = False) -> None:
        """Stop the broker; with ``keep_data`` a later ``start()`` brings the same broker back."""
        terminate(self.process)
        self.process = None
        if not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "run"
    if command == "fetch":
        print(fetch_jars())
        return 0
    if command != "run":
        print(__doc__, file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    broker = LocalBroker(port=int(os.environ.get("KAFKA_PORT", "0")) or None).start()
    print(f"Kafka broker ready on {broker.bootstrap} (data in {broker.workdir})", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
