"""The container, for real: our image from ``Dockerfile`` and the stack of ``docker-compose.yml``.

Run by ``make container-test`` (``tools/container.py``), which installs and starts the
engine and builds the images the compose file names; the name keeps it out of ``make test``.
One stack for the module, under its own project name and on free loopback ports; the
last test stops it with ``docker-compose down``, and the fixture removes what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from localkafka import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"  # Debian's, whatever else is first on the PATH
COMPOSE = "/usr/bin/docker-compose"
IMAGE = "datasync:local"
IFACES = "config/vpp/v2/interfaces/"
T = TypeVar("T")

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def docker(*args: str) -> str:
    return subprocess.run([DOCKER, *args], check=True, text=True, capture_output=True, timeout=120).stdout.strip()


def get(url: str) -> tuple[int, str]:
    """Status and body; 0 and the reason when nothing answers."""
    try:
        with _no_proxy.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s", pytrace=False)
        time.sleep(1)


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    http: str
    prometheus: str
    kafka: str

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [COMPOSE, "--project-name", self.project, "--file", str(ROOT / "docker-compose.yml"), *args]
        done = subprocess.run(command, cwd=ROOT, env=self.env, text=True, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            failed = f"docker-compose {' '.join(args)}: exit {done.returncode}"
            pytest.fail(f"{failed}\n{done.stderr[-3000:]}", pytrace=False)
        return done

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, container: str) -> str:
        return docker("inspect", "--format", "{{.State.Health.Status}}", container)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: `make container-test` starts one", pytrace=False)
    ports = {name: free_port() for name in ("HOST_HTTP_PORT", "HOST_PROMETHEUS_PORT", "HOST_KAFKA_PORT")}
    env = {**os.environ, "HOST_ADDRESS": "127.0.0.1", **{k: str(v) for k, v in ports.items()}}
    s = Stack(
        project=f"datasyncct{uuid.uuid4().hex[:8]}",
        env=env,
        http=f"http://127.0.0.1:{ports['HOST_HTTP_PORT']}",
        prometheus=f"http://127.0.0.1:{ports['HOST_PROMETHEUS_PORT']}",
        kafka=f"127.0.0.1:{ports['HOST_KAFKA_PORT']}",
    )
    try:
        s.compose("build", timeout=1200)
        s.compose("up", "--detach", timeout=600)  # waits for kafka healthy and topics exited 0
        yield s
    finally:
        if request.session.testsfailed:
            logs = subprocess.run(
                [COMPOSE, "-p", s.project, "logs", "--no-color", "--tail", "40"],
                cwd=ROOT,
                env=env,
                text=True,
                capture_output=True,
            )
            print(logs.stdout[-8000:], file=sys.stderr)
        s.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")


def test_image_runs_as_a_non_root_user(stack: Stack) -> None:
    assert docker("image", "inspect", "--format", "{{.Config.User}}", IMAGE) == "datasync"
    uid = stack.compose("exec", "-T", "datasync", "id", "-u").stdout.strip()
    assert uid.isdigit() and uid != "0", uid


def test_healthcheck_turns_healthy(stack: Stack) -> None:
    datasync = stack.container("datasync")
    assert "healthz" in docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", datasync)
    wait_for("datasync healthy", lambda: stack.health(datasync) == "healthy", 120)


def test_healthcheck_follows_the_configured_port(stack: Stack) -> None:
    """A second instance on another port turns healthy too (a check on 8080 would not)."""
    name = f"{stack.project}-port"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        f"{stack.project}_default",
        "--health-interval",
        "2s",
        "--env",
        "DATASYNC_KAFKA__BOOTSTRAP_SERVERS=kafka:9092",
        "--env",
        "DATASYNC_HTTP__PORT=8099",
        "--env",
        "DATASYNC_SYNC__CREATE_TOPICS=false",
        IMAGE,
    )
    try:
        wait_for("a datasync on port 8099 healthy", lambda: stack.health(name) == "healthy", 90)
    finally:
        docker("rm", "--force", "--volumes", name)


def test_topics_service_exits_0(stack: Stack) -> None:
    topics = stack.container("topics")
    assert docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", topics) == "exited 0"
    assert "demo.interfaces:" in stack.compose("logs", "--no-color", "topics").stdout


def test_http_endpoints_answer(stack: Stack) -> None:
    wait_for("/readyz 200", lambda: get(stack.http + "/readyz")[0] == 200, 120)
    assert get(stack.http + "/healthz") == (200, json.dumps({"status": "ok"}))
    code, metrics = get(stack.http + "/metrics")
    assert code == 200 and "datasync_" in metrics
    code, body = get(stack.http + "/v1/status")
    assert code == 200
    status = json.loads(body)
    assert status["broker"] == "connected"
    assert set(status["plugins"]) == {"interfaces", "routes"}


def _table_value(stack: Stack, key: str) -> dict[str, Any] | None:
    code, body = get(f"{stack.http}/v1/topics/demo.interfaces/keys/{key}")
    return json.loads(body)["value"] if code == 200 else None


def test_a_published_record_reaches_the_tables_and_the_plugin(stack: Stack) -> None:
    name = f"ct{uuid.uuid4().hex[:8]}"
    value = {"name": name, "enabled": True, "mtu": 9000, "ip_addresses": ["10.9.9.1/24"]}
    publish = [
        str(Path(sys.executable).with_name("datasync")),
        "publish",
        "--bootstrap-servers",
        stack.kafka,
        "demo.interfaces",
        IFACES + name,
        json.dumps(value),
    ]
    done = subprocess.run(publish, cwd=ROOT, text=True, capture_output=True, timeout=60)  # from the host
    assert done.returncode == 0, done.stderr
    assert wait_for("the record in the table", lambda: _table_value(stack, IFACES + name), 60) == value
    plugin_line = f"put {IFACES}{name}"  # the example Interfaces plugin logs each change it gets
    wait_for("the plugin's change line", lambda: plugin_line in stack.compose("logs", "datasync").stdout, 30)
    assert wait_for("the demo producer's eth0", lambda: _table_value(stack, IFACES + "eth0"), 60)["name"] == "eth0"


def test_state_directory_is_a_writable_volume(stack: Stack) -> None:
    shell = 'test -w "$DATASYNC_STATE_DIR" && echo "$DATASYNC_STATE_DIR"'
    assert stack.compose("exec", "-T", "datasync", "sh", "-c", shell).stdout.strip() == "/var/lib/datasync"
    mounts = json.loads(docker("inspect", "--format", "{{json .Mounts}}", stack.container("datasync")))
    assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/var/lib/datasync")]


def _datasync_target_up(stack: Stack) -> bool:
    code, body = get(stack.prometheus + "/api/v1/targets")
    targets = json.loads(body)["data"]["activeTargets"] if code == 200 else []
    return any(t["labels"]["job"] == "datasync" and t["health"] == "up" for t in targets)


def test_prometheus_scrapes_datasync(stack: Stack) -> None:
    wait_for("Prometheus' datasync target up", lambda: _datasync_target_up(stack), 90)


def test_down_stops_datasync_gracefully(stack: Stack) -> None:
    """Last: ``docker-compose down`` sends SIGTERM; datasync must exit 0 within its grace period."""
    datasync = stack.container("datasync")
    since = str(int(time.time()) - 1)
    logs = subprocess.Popen(
        [DOCKER, "logs", "--follow", "--tail", "60", datasync],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack.compose("down", "--timeout", "30", timeout=180)
    until = str(int(time.time()) + 1)
    died = ["--filter", f"container={datasync}", "--filter", "event=die"]
    exits = docker("events", "--since", since, "--until", until, *died, "--format", "{{.Actor.Attributes.exitCode}}")
    last_lines = logs.communicate(timeout=30)[0]
    assert exits.split() == ["0"], f"datasync's exit status on down: {exits}; its last lines:\n{last_lines}"
