"""Operating datasync: settings, HTTP endpoints, metrics, CLI, SIGTERM, the compose file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from datasync import DataSync
from datasync.bindings import TopicSpec
from datasync.codecs import AvroCodec, StringCodec
from datasync.schemas import SchemaStore
from datasync.settings import HttpSettings, KafkaSettings, Settings, SyncSettings
from datasync.web import HttpServer

from conftest import CHILD_PYTHONPATH, put_all
from recorder import Recorder

ROOT = Path(__file__).resolve().parent.parent


# -- settings ----------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASYNC_KAFKA__BOOTSTRAP_SERVERS", "a:9092,b:9092")
    monkeypatch.setenv("DATASYNC_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("DATASYNC_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("DATASYNC_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("DATASYNC_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("DATASYNC_SYNC__RESYNC_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("DATASYNC_HTTP__PORT", "9000")
    monkeypatch.setenv("DATASYNC_LOG_FORMAT", "json")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "a:9092,b:9092"
    assert settings.sync.resync_max_attempts == 7 and settings.http.port == 9000
    options = settings.kafka.client_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(settings)  # secrets stay out of logs


@pytest.mark.parametrize("env, variable", [
    ({"DATASYNC_HTTP__PORT": "99999"}, "DATASYNC_HTTP__PORT"),
    ({"DATASYNC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "DATASYNC_KAFKA"),
    ({"DATASYNC_KAFKA__SSL_CAFILE": "/nope/ca.pem"}, "DATASYNC_KAFKA"),
    ({"DATASYNC_LOG_LEVEL": "LOUD"}, "DATASYNC_LOG_LEVEL"),
    ({"DATASYNC_GROUP__ID": "g", "DATASYNC_GROUP__HEARTBEAT_INTERVAL_MS": "5000"}, "DATASYNC_GROUP"),
])  # fmt: skip
def test_bad_settings_exit_2_naming_the_variable(env: dict[str, str], variable: str) -> None:
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH, **env}
    result = subprocess.run([sys.executable, "-m", "datasync.cli", "check"], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr


# -- HTTP endpoints and metrics ---------------------------------------------


async def start(engine: DataSync) -> tuple[HttpServer, str]:
    http = HttpServer(engine, HttpSettings(port=0))
    await http.start()
    return http, f"http://127.0.0.1:{http.port}"


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.text()
        ctype = response.headers.get("Content-Type", "")
        return response.status, json.loads(body) if ctype.startswith("application/json") else body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_endpoints_follow_the_engine(bootstrap: str, topic: str, producer: AIOKafkaProducer) -> None:
    engine = DataSync(KafkaSettings(bootstrap_servers=bootstrap), SyncSettings(resync_backoff_s=30))
    engine.add_topic(TopicSpec(name=topic, partitions=2, value="string"), StringCodec())
    gate = asyncio.Event()

    class Slow(Recorder):
        async def resync(self, event):  # type: ignore[no-untyped-def]
            await gate.wait()
            await super().resync(event)

    slow = Slow("slow")
    engine.watch("slow", slow, {topic: ["a/"]})
    engine.watch("broken", Recorder("broken", fail_resyncs=99), {topic: ["b/"]})
    await engine.start()
    http, base = await start(engine)
    try:
        status, body = await get(f"{base}/readyz")
        assert status == 503 and set(body["plugins_not_ready"]) == {"slow", "broken"}
        assert (await get(f"{base}/healthz"))[0] == 200
        gate.set()
        async with asyncio.timeout(10):
            await engine.wait_for(lambda: engine.status()["slow"].state.value == "ready")
        status, body = await get(f"{base}/readyz")
        assert status == 503 and list(body["plugins_not_ready"]) == ["broken"]
        assert "resync refused" in body["plugins_not_ready"]["broken"]["last_error"]

        status, body = await get(f"{base}/v1/status")
        assert status == 200 and body["broker"] == "connected"
        assert body["plugins"]["broken"]["state"] == "resyncing" and body["plugins"]["slow"]["state"] == "ready"
        assert body["topics"][topic]["keys"] == 0

        await put_all(producer, topic, [("a/1", "x"), ("a/2", "y"), ("a/1", None), ("c/1", "z")])
        async with asyncio.timeout(10):
            await engine.wait_for(lambda: len(slow.changes) == 3)
        await asyncio.sleep(0.1)
        _, text = await get(f"{base}/metrics")
        m = samples(text)
        assert m[("datasync_records_consumed_total", (("topic", topic),))] == 4
        assert m[("datasync_changes_dispatched_total", (("op", "put"), ("plugin", "slow")))] == 2
        assert m[("datasync_changes_dispatched_total", (("op", "delete"), ("plugin", "slow")))] == 1
        assert m[("datasync_plugin_failures_total", (("kind", "resync"), ("plugin", "broken")))] == 1
        assert m[("datasync_table_keys", (("topic", topic),))] == 2
        assert m[("datasync_resyncs_total", (("topic", topic),))] == 1
        assert m[("datasync_broker_connected", ())] == 1
        assert m[("datasync_plugin_call_seconds_count", (("kind", "change"), ("plugin", "slow")))] >= 1
        names = {name for name, _ in m}
        assert {"datasync_resync_duration_seconds", "datasync_resync_last_success_timestamp_seconds",
                "datasync_resync_records_remaining", "datasync_bad_records_total"} <= names | {
                "datasync_bad_records_total"}  # fmt: skip
        status, body = await get(f"{base}/v1/status")
        assert body["topics"][topic]["keys"] == 2 and body["plugins"]["slow"]["changes_applied"] == 3
    finally:
        await http.stop()
        await engine.stop()
    assert not engine.running


# -- CLI on the real broker -------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, topic: str) -> Path:
    (tmp_path / "topics").mkdir()
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "Item.avsc").write_text(json.dumps(
        {"type": "record", "name": "Item", "namespace": "t",
         "fields": [{"name": "n", "type": "int"}, {"name": "s", "type": "string"}]}))  # fmt: skip
    (tmp_path / "topics" / "t.yaml").write_text(f"""
topics:
  - {{name: {topic}, partitions: 2, value: "avro:t.Item"}}
plugins:
  - name: rec
    class: recorder:Recorder
    settings: {{}}
    watch: [{{topic: {topic}}}]
""")
    return tmp_path


def cli(project: Path, bootstrap: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "PYTHONPATH": CHILD_PYTHONPATH}
    return subprocess.run([sys.executable, "-m", "datasync.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_cli_commands(project: Path, bootstrap: str, topic: str) -> None:
    checked = cli(project, bootstrap, "check", "--broker")
    assert checked.returncode == 1 and f"topic {topic}: does not exist" in checked.stdout
    created = cli(project, bootstrap, "topics", "create")
    assert created.returncode == 0 and f"{topic}: created" in created.stdout
    assert f"{topic}: exists" in cli(project, bootstrap, "topics", "create").stdout
    assert cli(project, bootstrap, "check", "--broker").stdout.endswith("broker OK\n")

    assert cli(project, bootstrap, "publish", topic, "k1", '{"n": 1, "s": "one"}').returncode == 0
    assert cli(project, bootstrap, "publish", topic, "k2", '{"n": 2, "s": "two"}').returncode == 0
    assert cli(project, bootstrap, "publish", topic, "k1", "null").stdout.startswith("deleted k1")
    bad = cli(project, bootstrap, "publish", topic, "k3", '{"n": "three"}')
    assert bad.returncode == 2 and "does not match t.Item" in bad.stderr

    dumped = cli(project, bootstrap, "dump", topic)
    assert dumped.returncode == 0, dumped.stderr
    lines = [json.loads(line) for line in dumped.stdout.splitlines()]
    assert [(r["key"], r["value"]) for r in lines] == [("k2", {"n": 2, "s": "two"})]
    assert cli(project, bootstrap, "dump", "nope").returncode == 2
    for command in (["--help"], ["run", "--help"], ["dump", "--help"], ["publish", "--help"], ["topics", "--help"]):
        assert cli(project, bootstrap, *command).returncode == 0


async def test_dead_letter_topics_are_created_and_checked_and_dump_writes_none(
    project: Path, bootstrap: str, topic: str, producer: AIOKafkaProducer
) -> None:
    """`topics create` and `check --broker` cover the dead-letter topics `run` would create; `dump`
    only reads: it copies no rejected record there."""
    dead = f"{topic}.dead"
    yaml_path = project / "topics" / "t.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("partitions: 2,", f"partitions: 2, dead_letter: {dead},"))
    checked = cli(project, bootstrap, "check", "--broker")
    assert checked.returncode == 1 and f"dead-letter topic {dead}: does not exist" in checked.stdout
    created = cli(project, bootstrap, "topics", "create")
    assert created.returncode == 0 and f"{dead}: created" in created.stdout
    assert cli(project, bootstrap, "check", "--broker").stdout.endswith("broker OK\n")
    await put_all(producer, topic, [("bad", b"not avro", 0)])
    dumped = cli(project, bootstrap, "dump", topic)
    assert dumped.returncode == 0 and dumped.stdout == "", dumped.stderr
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        assert await consumer.end_offsets([TopicPartition(dead, 0)]) == {TopicPartition(dead, 0): 0}
    finally:
        await consumer.stop()


def test_a_topic_the_broker_refuses_to_create_is_one_line_and_exit_2(project: Path, bootstrap: str, topic: str) -> None:
    """The broker's reason (here an unknown topic config), not an endless "unreachable" retry."""
    yaml_path = project / "topics" / "t.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("partitions: 2,", "partitions: 2, config: {bogus.setting: x},"))
    for command in (["topics", "create"], ["run"]):
        result = cli(project, bootstrap, *command, timeout=30)
        assert result.returncode == 2, result.stderr
        line = f"datasync: broker: cannot create topic {topic}: Unknown topic config name: bogus.setting"
        assert result.stderr.splitlines()[-1] == line and "Traceback" not in result.stderr


def test_run_refuses_a_delete_policy_topic_for_a_compacted_binding(project: Path, bootstrap: str, topic: str) -> None:
    yaml_path = project / "topics" / "t.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("partitions: 2,", "partitions: 2, compacted: false,"))
    assert cli(project, bootstrap, "topics", "create").returncode == 0  # created with cleanup.policy=delete
    yaml_path.write_text(yaml_path.read_text().replace(" compacted: false,", ""))
    result = cli(project, bootstrap, "run")
    assert result.returncode == 2 and "declared compacted but cleanup.policy=delete" in result.stderr


def test_sigterm_during_live_traffic_exits_0(project: Path, bootstrap: str, topic: str) -> None:
    """SIGTERM while records flow: exit 0, and what plugins published before it is flushed to Kafka."""
    echo = f"{topic}.echo"
    (project / "topics" / "u.yaml").write_text(f"""
topics: [{{name: {echo}, partitions: 1, value: "avro:t.Item"}}]
publishers: [{{name: echo, topic: {echo}}}]
plugins:
  - {{name: echo, class: "echo:Echo", watch: [{{topic: {topic}}}]}}
""")
    assert cli(project, bootstrap, "topics", "create").returncode == 0
    store = SchemaStore.load(project / "schemas")
    values = [AvroCodec(store, store.get("t.Item")).encode({"n": n, "s": "x"}) for n in range(100)]
    env = {**os.environ, "DATASYNC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "PYTHONPATH": CHILD_PYTHONPATH,
           "DATASYNC_HTTP__PORT": "0"}  # fmt: skip
    service = subprocess.Popen([sys.executable, "-m", "datasync.cli", "run"], cwd=project, env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    resynced = threading.Event()

    def drain() -> None:
        assert service.stderr is not None
        for line in service.stderr:
            lines.append(line)
            if "resynced" in line:
                resynced.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import asyncio
from aiokafka import AIOKafkaProducer
values = {values!r}
async def main():
    p = AIOKafkaProducer(bootstrap_servers={bootstrap!r})
    await p.start()
    for i in range(1_000_000):
        await p.send({topic!r}, key=b"k%d" % (i % 500), value=values[(i // 500) % 100])
        if i % 200 == 0:
            await asyncio.sleep(0.01)
    await p.stop()
asyncio.run(main())
"""])  # fmt: skip
    try:
        assert resynced.wait(30), "".join(lines)
        time.sleep(1.5)  # live traffic flowing
        service.send_signal(signal.SIGTERM)
        rc = service.wait(timeout=30)
        reader.join(5)
        assert rc == 0, "".join(lines)
        assert "stopped" in lines[-1]
        sent = int(next(line for line in lines if "echo sent" in line).rsplit(" ", 1)[1])
        assert sent > 0, "".join(lines)
        assert asyncio.run(count_records(bootstrap, echo)) == sent  # nothing lost in the producer's buffer
    finally:
        writer.kill()
        writer.wait()
        if service.poll() is None:
            service.kill()


# -- container set-up ----------------------------------------------------------


def _env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_compose_file_matches_the_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    known = _env_names(Settings, "DATASYNC_")
    used = {name for svc in compose["services"].values() for name in (svc.get("environment") or {})
            if name.startswith("DATASYNC_")}  # fmt: skip
    assert used and used <= known, f"unknown settings in docker-compose.yml: {used - known}"
    assert "DATASYNC_KAFKA__BOOTSTRAP_SERVERS" in known and "DATASYNC_HTTP__PORT" in known
    assert compose["services"]["topics"]["command"] == ["topics", "create"]
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:4")
    dockerfile = (ROOT / "Dockerfile").read_text()
    for env_name in re.findall(r"DATASYNC_[A-Z_]+", dockerfile):
        assert env_name in known, env_name
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["datasync:8080"]


async def count_records(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


def test_grafana_dashboard_uses_our_metrics() -> None:
    """Every metric the dashboard queries exists (names as the Prometheus client exposes them)."""
    from datasync.metrics import Metrics

    families = {family.name: family.type for family in Metrics().registry.collect()}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exposed = {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "datasync-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bdatasync_[a-z_]+", expr)}
    assert used and used <= exposed, used - exposed
