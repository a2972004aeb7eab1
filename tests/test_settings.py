"""Settings from the environment, .env and CLI flags: every mistake is one line naming the variable, exit status 2.

The ``datasync`` command runs in-process here (no broker needed): each test starts from an environment
without DATASYNC_ variables, in an empty directory (no .env).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datasync.cli import main
from datasync.settings import load_settings


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("DATASYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def datasync(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of the command."""
    status = main(list(args))
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_a_flag_is_validated_like_its_variable(capsys: pytest.CaptureFixture[str], port: str) -> None:
    bound = "less than or equal to 65535" if port == "99999" else "greater than or equal to 0"
    line = f"datasync: invalid setting --http-port: Input should be {bound}"
    assert datasync(capsys, "run", "--http-port", port) == (2, [line])


def test_a_variable_is_named_and_a_flag_overrides_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATASYNC_HTTP__PORT", "99999")
    expected = "datasync: invalid setting DATASYNC_HTTP__PORT: Input should be less than or equal to 65535"
    assert datasync(capsys, "check") == (2, [expected])
    status, lines = datasync(capsys, "run", "--http-port", "8081", "--topics-dir", "nowhere")
    assert status == 2 and lines[0].startswith("datasync: invalid bindings: nowhere")  # past the settings


@pytest.mark.parametrize(("env", "line"), [
    ({"DATASYNC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "DATASYNC_KAFKA__SASL_USERNAME": "alice"},
     "DATASYNC_KAFKA__SASL_MECHANISM, DATASYNC_KAFKA__SASL_PASSWORD: needed with security_protocol SASL_SSL"),
    ({"DATASYNC_HTTP__WRITES_ENABLED": "true", "DATASYNC_HTTP__TOKEN": "short"},
     "DATASYNC_HTTP__WRITES_ENABLED, DATASYNC_HTTP__TOKEN: needs a token of at least 16 characters"),
    ({"DATASYNC_GROUP__HEARTBEAT_INTERVAL_MS": "5000"},
     "DATASYNC_GROUP__HEARTBEAT_INTERVAL_MS, DATASYNC_GROUP__SESSION_TIMEOUT_MS: "
     "the heartbeat interval must be at most a third of the session timeout"),
    ({"DATASYNC_REGISTRY__URLS": "ftp://registry"},
     "DATASYNC_REGISTRY__URLS: every URL must start with http:// or https://"),
])  # fmt: skip
def test_checks_across_a_group_name_the_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert datasync(capsys, "check") == (2, [f"datasync: invalid setting {line}"])


def test_every_problem_is_named_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATASYNC_LOG_LEVEL", "loud")
    monkeypatch.setenv("DATASYNC_SYNC__FETCH_MAX_RECORDS", "0")
    assert datasync(capsys, "check") == (2, [
        "datasync: invalid setting DATASYNC_SYNC__FETCH_MAX_RECORDS: Input should be greater than or equal to 1; "
        "DATASYNC_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"
    ])  # fmt: skip


def test_a_group_variable_that_is_not_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASYNC_KAFKA", "notjson")
    line = "datasync: invalid setting DATASYNC_KAFKA: not JSON (Expecting value: line 1 column 1 (char 0))"
    assert datasync(capsys, "check") == (2, [line])


def test_a_dotenv_that_cannot_be_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"DATASYNC_LOG_LEVEL=\xff\n")
    assert datasync(capsys, "check") == (2, ["datasync: cannot read .env: not UTF-8 at byte 19"])
    (tmp_path / ".env").unlink()
    (tmp_path / ".env").symlink_to("/proc/self/mem")  # a file that fails to read, even for root
    assert datasync(capsys, "check") == (2, ["datasync: cannot read .env: Input/output error"])


@pytest.mark.parametrize(("servers", "why"), [
    ("127.0.0.1:abc", "'127.0.0.1:abc' is not host:port (host:port[,host:port])"),
    ("127.0.0.1:99999", "'127.0.0.1:99999': the port must be 1-65535"),
    ("kafka:0", "'kafka:0': the port must be 1-65535"),
    ("http://127.0.0.1:1", "'http://127.0.0.1:1' is a URL: give host:port"),
    ("a b:1", "'a b:1' is not host:port (host:port[,host:port])"),
    ("kafka", "'kafka' is not host:port (host:port[,host:port])"),
    (",", "'' is not host:port (host:port[,host:port])"),
    ("a:1,,b:2", "'' is not host:port (host:port[,host:port])"),
])  # fmt: skip
def test_bootstrap_servers_must_be_host_port_pairs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, servers: str, why: str
) -> None:
    for command in (["run"], ["check", "--broker"], ["topics", "create"]):
        assert datasync(capsys, *command, "--bootstrap-servers", servers) == (
            2, [f"datasync: invalid setting --bootstrap-servers: {why}"]
        )  # fmt: skip
    monkeypatch.setenv("DATASYNC_KAFKA__BOOTSTRAP_SERVERS", servers)
    assert datasync(capsys, "check") == (2, [f"datasync: invalid setting DATASYNC_KAFKA__BOOTSTRAP_SERVERS: {why}"])


def test_bootstrap_servers_of_every_form() -> None:
    servers = " kafka-1.example.com:9092 , 10.0.0.7:19092,[::1]:9093,broker_2:1"
    loaded = load_settings({("kafka", "bootstrap_servers"): ("--bootstrap-servers", servers)})
    assert loaded.kafka.bootstrap_servers == "kafka-1.example.com:9092,10.0.0.7:19092,[::1]:9093,broker_2:1"
    assert load_settings({("kafka", "bootstrap_servers"): ("--bootstrap-servers", " ")}).kafka.bootstrap_servers == ""
