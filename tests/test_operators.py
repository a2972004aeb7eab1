"""No surprises for operators: start before Kafka, one-line CLI errors, up-front validation, resync on request.

CLI tests run the real ``datasync`` command; an unreachable broker is a closed loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

import datasync
from datasync import DataSync, KafkaSettings, StringCodec, SyncSettings, TopicSpec
from datasync.bindings import load_bindings
from datasync.cli import main
from datasync.logs import JsonFormatter, RepeatFilter
from datasync.metrics import Metrics
from datasync.reader import TableReader
from datasync.settings import HttpSettings
from datasync.web import HttpServer

from conftest import CHILD_PYTHONPATH
from localkafka import LocalBroker
from recorder import Recorder

ROOT = Path(__file__).resolve().parent.parent
DATASYNC = str(Path(sys.executable).parent / "datasync")
TOKEN = "t0ken-of-sixteen-chars"
ITEM = {"type": "record", "name": "Item", "namespace": "t",
        "fields": [{"name": "n", "type": "int"}, {"name": "s", "type": "string"}]}  # fmt: skip


def free_port() -> int:
    """A loopback port nobody listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_project(tmp_path: Path, bindings: str, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "topics").mkdir(exist_ok=True)
    (tmp_path / "schemas").mkdir(exist_ok=True)
    (tmp_path / "schemas" / "Item.avsc").write_text(json.dumps(ITEM))
    (tmp_path / "topics" / "t.yaml").write_text(bindings)
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def recorder_project(tmp_path: Path, topic: str) -> Path:
    return make_project(
        tmp_path,
        f"""
topics: [{{name: {topic}, partitions: 2, value: "avro:t.Item"}}]
plugins: [{{name: rec, class: "recorder:Recorder", watch: [{{topic: {topic}}}]}}]
""",
    )


def env_for(bootstrap: str, **extra: str) -> dict[str, str]:
    """The CLI's environment; ``service`` first, so the command runs this checkout's package, not an installed one."""
    return {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "PYTHONPATH": CHILD_PYTHONPATH, **extra}


def cli(
    project: Path, bootstrap: str, *args: str, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DATASYNC, *args], cwd=project, env=env_for(bootstrap, **extra), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


class Service:
    """``datasync run`` in the background, its stderr collected line by line."""

    def __init__(self, project: Path, bootstrap: str, http_port: int, **extra: str) -> None:
        env = env_for(bootstrap, DATASYNC_HTTP__PORT=str(http_port), **extra)
        self.proc = subprocess.Popen([DATASYNC, "run"], cwd=project, env=env, stderr=subprocess.PIPE, text=True)
        self.port = http_port
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 30) -> str:
        with self._seen:
            found = self._seen.wait_for(lambda: any(text in line for line in self.lines), timeout)
            assert found, f"no {text!r} in:\n{''.join(self.lines)}"
            return next(line for line in self.lines if text in line)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- item 1: Kafka not there yet -----------------------------------------------


def test_run_waits_for_the_broker_then_starts(tmp_path: Path, bootstrap: str, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    port = free_port()
    service = Service(project, f"127.0.0.1:{port}", free_port(), DATASYNC_LOG_FORMAT="json")
    forward = None
    try:
        service.wait_for(f'"message": "broker at 127.0.0.1:{port} unreachable (attempt 2)')
        status, body = service.get("/healthz")
        assert status == 200 and body["status"] == "starting"
        status, body = service.get("/readyz")
        assert status == 503 and body["starting"].startswith(f"waiting for broker at 127.0.0.1:{port}: ")
        assert service.get(f"/v1/topics/{topic}/keys/k")[0] == 503
        status, body = service.get("/v1/status")
        assert status == 200 and body["plugins"]["rec"]["state"] == "resyncing"
        # The broker "appears" on the port the service was told about.
        forward = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tcpforward.py"), str(port), bootstrap],
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert forward.stdout is not None and forward.stdout.readline() == "listening\n"
        service.wait_for("plugin rec: resynced")
        deadline = time.monotonic() + 20
        while service.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert service.get("/readyz")[0] == 200 and service.get("/healthz") == (200, {"status": "ok"})
        assert service.stop() == 0
    finally:
        service.kill()
        if forward is not None:
            forward.kill()
            forward.wait()
    entries = [json.loads(line) for line in service.lines]  # every line is JSON, no traceback
    messages = [e["message"] for e in entries]
    summary = next(m for m in messages if m.startswith("datasync "))
    assert summary == (f"datasync {datasync.__version__}: brokers 127.0.0.1:{port}; topics {topic}; "
                       f"plugins in resync order rec; HTTP 127.0.0.1:{service.port} "
                       "(/metrics /healthz /readyz /v1/status; writes off)")  # fmt: skip
    assert not any("does not exist" in m for m in messages)  # the missing topic was created without a warning
    resynced = next(e for e in entries if e["message"].startswith("plugin rec: resynced"))
    assert resynced["plugin"] == "rec"  # the context as a field of its own
    client_errors = [e for e in entries if e["logger"].startswith("aiokafka")]
    assert len(client_errors) <= 1, client_errors  # the client's repeats are held back


def test_run_gives_up_after_the_configured_time(tmp_path: Path, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    port = free_port()
    result = cli(project, f"127.0.0.1:{port}", "run", DATASYNC_KAFKA__CONNECT_GIVE_UP_S="2",
                 DATASYNC_HTTP__PORT="0")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"datasync: broker at 127.0.0.1:{port} unreachable for ")
    assert "(attempt 1)" in result.stderr


def test_sigterm_while_waiting_for_the_broker_exits_0(tmp_path: Path, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    service = Service(project, f"127.0.0.1:{free_port()}", free_port())
    try:
        service.wait_for("(attempt 1)")
        assert service.stop() == 0
        assert "stopped" in service.lines[-1]
    finally:
        service.kill()


@pytest.mark.parametrize("args", [
    ["check", "--broker"], ["topics", "create"], ["dump", "TOPIC"], ["publish", "TOPIC", "k", '{"n": 1, "s": "x"}'],
])  # fmt: skip
def test_cli_commands_answer_an_unreachable_broker_in_one_line(tmp_path: Path, topic: str, args: list[str]) -> None:
    project = recorder_project(tmp_path, topic)
    port = free_port()
    result = cli(project, f"127.0.0.1:{port}", *[topic if a == "TOPIC" else a for a in args])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"datasync: broker at 127.0.0.1:{port} unreachable: KafkaConnectionError: Unable to bootstrap"
    ]


def test_cli_commands_answer_a_missing_topic_in_one_line(tmp_path: Path, bootstrap: str, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    published = cli(project, bootstrap, "publish", topic, "k", '{"n": 1, "s": "x"}', timeout=20)
    assert published.returncode == 1
    assert published.stderr.splitlines() == [
        f"datasync: topic {topic} does not exist on the broker (`datasync topics create`)"
    ]
    dumped = cli(project, bootstrap, "dump", topic, timeout=20)
    assert dumped.returncode == 1
    assert dumped.stderr.splitlines() == [
        f"datasync: topic {topic} does not exist on the broker (`datasync topics create`)"
    ]


def dump_in_process(project: Path, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """``datasync dump`` in this process (so that a test can interfere with it), in a thread of its own:
    a dump that never ends fails the test instead of hanging it."""
    monkeypatch.chdir(project)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(main(["dump", topic, "--bootstrap-servers", bootstrap])),
                              daemon=True)  # fmt: skip
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "dump still running after 60s"
    return result[0]


def test_dump_ends_on_a_broker_lost_mid_read_with_one_line(
    tmp_path: Path, own_broker: LocalBroker, topic: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    project = recorder_project(tmp_path, topic)
    assert cli(project, own_broker.bootstrap, "topics", "create").returncode == 0
    started = DataSync.start

    async def start_then_lose_the_broker(engine: DataSync) -> None:
        await started(engine)
        own_broker.stop(keep_data=True)  # blocking: the engine task has not read anything yet

    monkeypatch.setattr(DataSync, "start", start_then_lose_the_broker)
    assert dump_in_process(project, own_broker.bootstrap, topic, monkeypatch) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err  # an outage is no bug
    assert err.splitlines()[-1] == f"datasync: broker at {own_broker.bootstrap} lost while reading {topic}"


def test_dump_ends_on_an_engine_failure_with_one_line(
    tmp_path: Path, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = recorder_project(tmp_path, topic)
    assert cli(project, bootstrap, "topics", "create").returncode == 0

    async def rewind(reader: TableReader) -> dict[Any, int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(TableReader, "rewind", rewind)  # the engine task dies on it
    assert dump_in_process(project, bootstrap, topic, monkeypatch) == 1
    out, err = capsys.readouterr()
    assert out == "" and "RuntimeError: a bug" in err  # a bug: logged with its traceback when the engine stops
    assert (
        err.splitlines()[-1] == f"datasync: reading {topic} failed: the engine task ended (its error is logged above)"
    )


# -- item 5: the HTTP port is bound first ----------------------------------------


def test_a_taken_http_port_is_one_line_and_exit_1(tmp_path: Path, bootstrap: str, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(project, bootstrap, "run", DATASYNC_HTTP__PORT=str(port))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"datasync: cannot serve HTTP on 127.0.0.1:{port}: Address already in use"]


# -- item 3: check refuses what run would ---------------------------------------

BAD_PLUGINS = """
from pydantic import BaseModel, ConfigDict, field_validator
from datasync import Plugin

class SyncResync(Plugin):
    def resync(self, event): pass
    async def change(self, event): pass

class NeedsArgs(Plugin):
    def __init__(self, url, retries=3): self.url = url
    async def resync(self, event): pass
    async def change(self, event): pass

class Boom(Plugin):
    def __init__(self): raise RuntimeError("no config file")
    async def resync(self, event): pass
    async def change(self, event): pass

class Declared(Plugin):
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        url: str
    async def resync(self, event): pass
    async def change(self, event): pass

class Careless(Declared):
    class Settings(Declared.Settings):
        @field_validator("url")
        def _known(cls, url): return {"a": url}[url]
"""


@pytest.mark.parametrize("plugin, field, message", [
    ("{class: 'bad:SyncResync'}", "plugins[0].class", "bad:SyncResync.resync must be a coroutine function"),
    ("{class: 'bad:NeedsArgs'}", "plugins[0].class", "bad:NeedsArgs cannot be created without arguments (needs url)"),
    ("{class: 'bad:Boom'}", "plugins[0].class", "cannot create the plugin: RuntimeError('no config file')"),
    ("{class: 'bad:Declared', settings: {url: x, retires: 3}}", "plugins[0].settings.retires",
     "Extra inputs are not permitted"),
    ("{class: 'bad:Declared', settings: {}}", "plugins[0].settings.url", "Field required"),
    ("{class: 'bad:Careless', settings: {url: x}}", "plugins[0].settings", "KeyError('x')"),
    ("{class: 'datasync.changefeed:Changefeed'}", "plugins[0].settings.publisher", "Field required"),
    ("{class: 'datasync.changefeed:Changefeed', settings: {publisher: nope}}", "plugins[0].settings.publisher",
     "unknown publisher 'nope' (declared: out, loop)"),
    ("{class: 'datasync.changefeed:Changefeed', settings: {publisher: out, checkpoint_topic: 'bad name!'}}",
     "plugins[0].settings.checkpoint_topic", "a Kafka topic name: 1-249 of [A-Za-z0-9._-]"),
    ("{class: 'datasync.changefeed:Changefeed', settings: {publisher: out, tombstone: false}}",
     "plugins[0].settings.tombstone", "Extra inputs are not permitted"),
    ("{class: 'datasync.changefeed:Changefeed', settings: {publisher: loop}}", "plugins[0].settings.publisher",
     "'loop' writes to src, which this feed watches"),
    ("{class: 'datasync.changefeed:Changefeed', settings: {publisher: out}, resync: delta}", "plugins[0].resync",
     "this plugin must never miss a change: it needs 'full'"),
])  # fmt: skip
def test_check_and_run_refuse_bad_plugins(tmp_path: Path, plugin: str, field: str, message: str) -> None:
    project = make_project(tmp_path, f"""
topics: [{{name: src, value: json}}, {{name: out, value: json}}]
publishers: [{{name: out, topic: out}}, {{name: loop, topic: src}}]
plugins:
  - {{name: p, watch: [{{topic: src}}], {plugin[1:-1]}}}
""", {"bad.py": BAD_PLUGINS})  # fmt: skip
    unreachable = f"127.0.0.1:{free_port()}"
    for command in (["check"], ["run"]):
        result = cli(project, unreachable, *command, DATASYNC_HTTP__PORT="0")
        assert result.returncode == 2, (command, result.stderr)
        [line] = result.stderr.splitlines()  # refused before connecting, in the same words
        assert line.startswith(f"datasync: invalid bindings: topics/t.yaml: {field}: {message}"), result.stderr


def test_a_valid_changefeed_passes_check(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        """
topics: [{name: src, value: json}, {name: out, value: json}]
publishers: [{name: out, topic: out}]
plugins:
  - {name: feed, class: 'datasync.changefeed:Changefeed', watch: [{topic: src}],
     settings: {publisher: out, tombstones: false, snapshot: true}}
""",
    )
    result = cli(project, "", "check")
    assert result.returncode == 0 and result.stdout.endswith("bindings OK\n"), result.stderr


def test_bindings_in_sub_directories_are_read(tmp_path: Path) -> None:
    project = make_project(tmp_path, "topics: [{name: top, value: json}]",
                           {"topics/more/sub.yaml": "topics: [{name: nested, value: string}]"})  # fmt: skip
    assert set(load_bindings(project / "topics", project / "schemas").topics) == {"top", "nested"}


# -- item 4: unknown fields ------------------------------------------------------


def test_publish_refuses_unknown_fields(tmp_path: Path, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    result = cli(project, f"127.0.0.1:{free_port()}", "publish", topic, "k", '{"n": 1, "s": "x", "nn": 2}')
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["datasync: VALUE: does not match t.Item: unknown field(s) nn"]


async def test_http_put_refuses_unknown_fields_with_a_clean_body(tmp_path: Path) -> None:
    make_project(tmp_path, "topics: [{name: items, value: 'avro:t.Item'}]")
    bindings = load_bindings(tmp_path / "topics", tmp_path / "schemas")
    engine = DataSync.from_bindings(bindings, KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    http = HttpServer(engine, HttpSettings(port=0, writes_enabled=True, token=TOKEN))
    await http.start()
    url = f"http://127.0.0.1:{http.port}/v1/topics/items/keys/k"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            for value, fields, error in [
                ({"n": 1, "s": "x", "mtuu": 9000}, ["mtuu"], "does not match t.Item: unknown field(s) mtuu"),
                ({"n": "one", "s": "x"}, ["n"], "does not match t.Item: n: expected int, got str"),
            ]:
                async with session.put(url, json=value) as response:
                    assert response.status == 422
                    assert await response.json() == {"error": error, "fields": fields}
    finally:
        await http.stop()


# -- item 2: resync on request, /healthz after a long failure --------------------


async def test_resync_on_request_and_healthz_after_a_long_failure(bootstrap: str, topic: str) -> None:
    # failed after one attempt, and the engine's own next attempt far away: only a request brings it back
    sync = SyncSettings(resync_max_attempts=1, resync_backoff_s=60, unhealthy_after_failed_s=0.5)
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), sync)
    engine.add_topic(TopicSpec(name=topic, value="string"), StringCodec())
    plugin = Recorder("flaky", fail_resyncs=1)
    engine.watch("flaky", plugin, {topic: [""]})
    http = HttpServer(engine, HttpSettings(port=0, token=TOKEN))
    await http.start()
    base = f"http://127.0.0.1:{http.port}"
    await engine.start()
    try:
        async with asyncio.timeout(20):
            await engine.wait_for(lambda: engine.status()["flaky"].state.value == "failed")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200  # failed, but not for long yet
            await asyncio.sleep(0.6)
            async with session.get(f"{base}/healthz") as response:
                body = await response.json()
                assert response.status == 503 and body["status"] == "failed"
                assert body["reason"].startswith("plugin flaky failed for ")
            async with session.post(f"{base}/v1/plugins/flaky/resync") as response:
                assert response.status == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(f"{base}/v1/plugins/nope/resync", headers=auth) as response:
                assert response.status == 404
            unknown = await asyncio.create_subprocess_exec(
                DATASYNC, "resync", "nope", "--url", base, env={**os.environ, "DATASYNC_HTTP__TOKEN": TOKEN},
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await unknown.communicate()
            assert unknown.returncode == 1 and "404 no plugin named 'nope'" in err.decode()
            known = await asyncio.create_subprocess_exec(
                DATASYNC, "resync", "flaky", "--url", base, env={**os.environ, "DATASYNC_HTTP__TOKEN": TOKEN},
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await known.communicate()
            assert known.returncode == 0 and out.decode() == "resync of flaky requested\n"
            async with asyncio.timeout(20):
                await engine.wait_for(lambda: engine.status()["flaky"].state.value == "ready")
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
        assert len(plugin.resyncs) == 1  # the failed one and the requested one: one succeeded
    finally:
        await http.stop()
        await engine.stop()


# -- should change: publish and dump round-trip every codec ----------------------


def test_publish_and_dump_round_trip_string_and_bytes(tmp_path: Path, bootstrap: str, topic: str) -> None:
    project = make_project(
        tmp_path,
        f"""
topics: [{{name: {topic}.s, value: string}}, {{name: {topic}.b, value: bytes}}]
""",
    )
    assert cli(project, bootstrap, "topics", "create").returncode == 0
    text, raw = 'say "hi"\nnull', base64.b64encode(b"\x00\xff binary").decode()
    assert cli(project, bootstrap, "publish", f"{topic}.s", "k", text).returncode == 0
    assert cli(project, bootstrap, "publish", f"{topic}.b", "k", raw).returncode == 0
    assert cli(project, bootstrap, "publish", f"{topic}.b", "gone", raw).returncode == 0
    assert cli(project, bootstrap, "publish", f"{topic}.b", "gone", "--delete").returncode == 0
    bad = cli(project, bootstrap, "publish", f"{topic}.b", "k", "not base64!")
    assert bad.returncode == 2 and "not base64" in bad.stderr
    for name, expected in ((f"{topic}.s", text), (f"{topic}.b", raw)):
        dumped = cli(project, bootstrap, "dump", name)
        assert dumped.returncode == 0, dumped.stderr
        [line] = [json.loads(line) for line in dumped.stdout.splitlines()]
        assert (line["key"], line["value"]) == ("k", expected)
        # what dump prints is what publish takes
        assert cli(project, bootstrap, "publish", name, "k2", line["value"]).returncode == 0


# -- item 6 and 8: logs, version, metrics ---------------------------------------


def test_json_log_lines_carry_context_fields() -> None:
    record = logging.LogRecord("datasync", logging.WARNING, __file__, 1, "bad record %s", ("x",), None)
    for name, value in {"plugin": "p", "topic": "t", "partition": 2, "offset": 41, "key": "a/b"}.items():
        setattr(record, name, value)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "bad record x" and entry["level"] == "WARNING"
    assert {k: entry[k] for k in ("plugin", "topic", "partition", "offset", "key")} == {
        "plugin": "p", "topic": "t", "partition": 2, "offset": 41, "key": "a/b"}  # fmt: skip
    plain = json.loads(JsonFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)))
    assert set(plain) == {"ts", "level", "logger", "message"}
    own = logging.LogRecord("datasync.plugin.routes", logging.INFO, __file__, 1, "m", (), None)
    assert json.loads(JsonFormatter().format(own))["plugin"] == "routes"  # a plugin's own logger


def test_repeated_client_errors_pass_once_per_window() -> None:
    limiter = RepeatFilter("aiokafka", window_s=60)
    client = logging.getLogger("aiokafka.conn")

    def record(msg: str, name: str = "aiokafka.conn") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("x",), None)

    assert client.getEffectiveLevel() > logging.DEBUG
    passed = [limiter.filter(record('Unable connect to "%s"')) for _ in range(100)]
    assert passed.count(True) == 1
    assert limiter.filter(record("another message %s"))  # another template passes
    assert all(limiter.filter(record('Unable connect to "%s"', "datasync")) for _ in range(3))  # ours untouched
    client.setLevel(logging.DEBUG)
    try:
        repeat = record('Unable connect to "%s"')
        assert limiter.filter(repeat) and repeat.levelno == logging.DEBUG  # kept, at DEBUG
    finally:
        client.setLevel(logging.NOTSET)


def test_version_and_case_insensitive_log_level(tmp_path: Path, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    version = cli(project, "", "--version")
    assert version.returncode == 0 and version.stdout == f"datasync {datasync.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", datasync.__version__)
    assert cli(project, "", "check", "--log-level", "debug").returncode == 0
    assert cli(project, "", "check", DATASYNC_LOG_LEVEL="warning").returncode == 0


def test_metrics_include_the_process_metrics() -> None:
    text = generate_latest(Metrics().registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name


# -- should change: the embedded API -------------------------------------------


def test_package_exports_and_ships_py_typed() -> None:
    for name in ("KafkaSettings", "SyncSettings", "TopicSpec", "JsonCodec", "AvroCodec", "StringCodec",
                 "BytesCodec", "SchemaStore", "EncodeError"):  # fmt: skip
        assert name in datasync.__all__ and hasattr(datasync, name)
    assert (Path(datasync.__file__).parent / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'datasync = ["py.typed"]' in pyproject


def test_readme_embedded_snippet_runs_as_shown(bootstrap: str, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### From another asyncio program") :]
    start = section.index("```python\n") + 10
    snippet = section[start : section.index("\n```", start)]
    assert "import" in snippet and "127.0.0.1:9092" in snippet
    (tmp_path / "snippet.py").write_text(snippet.replace("127.0.0.1:9092", bootstrap))
    for _ in range(2):  # twice in a row: a second run must not wait for a change that never comes
        result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "change: put config/interfaces/eth0" in result.stdout and "READY" in result.stdout


def test_embedded_example_runs_twice_in_a_row(bootstrap: str) -> None:
    for _ in range(2):
        result = subprocess.run([sys.executable, "examples/embedded.py"], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                                     "PYTHONPATH": str(ROOT)}, timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "change: put config/interfaces/eth0" in result.stdout


# -- item 8: log floods during an outage -------------------------------------------


def test_a_broker_outage_logs_state_changes_not_a_flood(tmp_path: Path, own_broker: LocalBroker, topic: str) -> None:
    project = recorder_project(tmp_path, topic)
    service = Service(project, own_broker.bootstrap, free_port(), DATASYNC_LOG_FORMAT="json",
                      DATASYNC_SYNC__BROKER_PROBE_S="0.5", DATASYNC_KAFKA__REQUEST_TIMEOUT_MS="5000")  # fmt: skip
    try:
        service.wait_for("plugin rec: resynced")
        before = len(service.lines)
        own_broker.stop(keep_data=True)
        service.wait_for(f"broker at {own_broker.bootstrap} lost (3 probes failed); probing every 0.5s")
        time.sleep(8)  # the outage goes on
        own_broker.start()
        service.wait_for(f"broker at {own_broker.bootstrap} regained: full resync")
        outage = [json.loads(line) for line in service.lines[before:]]
        assert service.stop() == 0
    finally:
        service.kill()
    client = [e for e in outage if e["logger"].startswith("aiokafka")]
    assert len(client) <= 10, [e["message"] for e in client]  # each of the client's messages once
    assert len({e["message"] for e in client}) == len(client)


def test_make_run_prints_the_export_line_and_fails_with_the_service(bootstrap: str) -> None:
    """`make run` (tools/run_demo.py) with port 8080 taken: the service's exit status, not 0."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = env_for(bootstrap, DATASYNC_HTTP__PORT=str(taken.getsockname()[1]))
        result = subprocess.run([sys.executable, "tools/run_demo.py"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
    assert f"export DATASYNC_KAFKA__BOOTSTRAP_SERVERS={bootstrap}\n" in result.stdout
    assert result.returncode == 1 and "Address already in use" in result.stderr
