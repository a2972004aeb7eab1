"""Settings from the environment, .env and CLI flags: every mistake is one line naming the variable, exit status 2.

The ``datasync`` command runs in-process here (no broker needed): each test starts from an environment
without DATASYNC_ variables, in an empty directory (no .env).
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from datasync.cli import main
from datasync.settings import KafkaSettings, load_settings


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("DATASYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    loggers = [logging.getLogger(), logging.getLogger("aiokafka")]
    saved = [(logger, logger.handlers[:], logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:  # as they were before main() set logging up
        logger.handlers[:] = handlers
        logger.setLevel(level)


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
    servers = " kafka-1.example.com:9092 , 10.0.0.7:19092,[::1]:9093,broker_2:1,kafka"
    loaded = load_settings({("kafka", "bootstrap_servers"): ("--bootstrap-servers", servers)})
    assert loaded.kafka.bootstrap_servers == "kafka-1.example.com:9092,10.0.0.7:19092,[::1]:9093,broker_2:1,kafka"
    assert load_settings({("kafka", "bootstrap_servers"): ("--bootstrap-servers", " ")}).kafka.bootstrap_servers == ""


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cert.pem and its key.pem (encrypted.pem: the same key, password "pw"), other.pem (another key), bad.pem."""
    folder = tmp_path_factory.mktemp("pem")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem",
            "-out", "cert.pem", "-days", "1", "-subj", "/CN=datasync-test")  # fmt: skip
    openssl("pkey", "-in", "key.pem", "-aes256", "-passout", "pass:pw", "-out", "encrypted.pem")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.pem")
    (folder / "bad.pem").write_text("not PEM\n")
    return folder


NO_CERT = "no certificate could be read from it (NO_CERTIFICATE_OR_CRL_FOUND)"
NO_KEY = "no private key could be read from it (not PEM, or encrypted and ssl_password missing or wrong)"


@pytest.mark.parametrize(("env", "line"), [
    ({"SSL_CAFILE": "bad.pem"}, f"DATASYNC_KAFKA__SSL_CAFILE: {{pem}}/bad.pem: {NO_CERT}"),
    ({"SSL_CERTFILE": "bad.pem", "SSL_KEYFILE": "key.pem"},
     f"DATASYNC_KAFKA__SSL_CERTFILE: {{pem}}/bad.pem: {NO_CERT}"),
    ({"SSL_CERTFILE": "cert.pem", "SSL_KEYFILE": "bad.pem"}, f"DATASYNC_KAFKA__SSL_KEYFILE: {{pem}}/bad.pem: {NO_KEY}"),
    ({"SSL_CERTFILE": "cert.pem"}, f"DATASYNC_KAFKA__SSL_CERTFILE: {{pem}}/cert.pem: {NO_KEY}"),
    ({"SSL_CERTFILE": "cert.pem", "SSL_KEYFILE": "encrypted.pem"},
     f"DATASYNC_KAFKA__SSL_KEYFILE: {{pem}}/encrypted.pem: {NO_KEY}"),
    ({"SSL_CERTFILE": "cert.pem", "SSL_KEYFILE": "encrypted.pem", "SSL_PASSWORD": "wrong"},
     f"DATASYNC_KAFKA__SSL_KEYFILE: {{pem}}/encrypted.pem: {NO_KEY}"),
    ({"SSL_CERTFILE": "cert.pem", "SSL_KEYFILE": "other.pem"},
     "DATASYNC_KAFKA__SSL_KEYFILE: {pem}/other.pem: the key does not match the certificate in {pem}/cert.pem"),
    ({"SSL_KEYFILE": "key.pem"}, "DATASYNC_KAFKA__SSL_KEYFILE: needs ssl_certfile (the client certificate)"),
])  # fmt: skip
def test_tls_files_are_loaded_when_settings_are_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pem: Path, env: dict[str, str], line: str
) -> None:
    monkeypatch.setenv("DATASYNC_KAFKA__SECURITY_PROTOCOL", "SSL")
    for name, value in env.items():
        monkeypatch.setenv(f"DATASYNC_KAFKA__{name}", value if name == "SSL_PASSWORD" else str(pem / value))
    for command in (["check"], ["run"]):
        assert datasync(capsys, *command) == (2, [f"datasync: invalid setting {line.format(pem=pem)}"])


def test_a_registry_ca_file_is_loaded_when_settings_are_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pem: Path
) -> None:
    monkeypatch.setenv("DATASYNC_REGISTRY__CA_FILE", str(pem / "bad.pem"))
    line = f"datasync: invalid setting DATASYNC_REGISTRY__CA_FILE: {pem}/bad.pem: {NO_CERT}"
    assert datasync(capsys, "check") == (2, [line])


def test_an_encrypted_key_with_its_password(pem: Path) -> None:
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=pem / "cert.pem",
        ssl_certfile=pem / "cert.pem",
        ssl_keyfile=pem / "encrypted.pem",
        ssl_password="pw",  # type: ignore[arg-type]
        ssl_check_hostname=False,
    )
    context = kafka.client_options()["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and not context.check_hostname
    assert context is kafka.client_options()["ssl_context"]  # made once, shared by every client


@pytest.mark.parametrize(("name", "value", "why"), [
    ("DATASYNC_SYNC__CREATE_TOPIC", "false",
     "DATASYNC_SYNC__CREATE_TOPIC: no such setting (did you mean DATASYNC_SYNC__CREATE_TOPICS?)"),
    ("DATASYNC_SYNC__BOGUS", "1", "DATASYNC_SYNC__BOGUS: no such setting"),
    ("DATASYNC_KAFKA", '{"bogus": 1}', "DATASYNC_KAFKA__BOGUS: no such setting"),
    ("DATASYNC_LOG_LEVL", "debug", "DATASYNC_LOG_LEVL: no such setting (did you mean DATASYNC_LOG_LEVEL?)"),
    ("DATASYNC_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092",
     "DATASYNC_KAFKA_BOOTSTRAP_SERVERS: no such setting (did you mean DATASYNC_KAFKA__BOOTSTRAP_SERVERS?)"),
    ("DATASYNC_NOSUCH__KEY", "1", "DATASYNC_NOSUCH__KEY: no such setting"),
    ("datasync_http__prot", "1", "DATASYNC_HTTP__PROT: no such setting (did you mean DATASYNC_HTTP__PORT?)"),
])  # fmt: skip
def test_an_unknown_variable_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str, why: str
) -> None:
    monkeypatch.setenv(name, value)
    assert datasync(capsys, "check") == (2, [f"datasync: invalid setting {why}"])
    monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(f"{name}='{value}'\n")
    assert datasync(capsys, "check") == (2, [f"datasync: invalid setting {why}"])


def test_variables_that_are_not_ours_are_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATASYNC_KAFKA_CACHE", str(tmp_path))  # read by tools/localkafka.py
    monkeypatch.setenv("DATASYNC_TEST_BOOTSTRAP", "127.0.0.1:9092")  # read by the tests
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "demo")
    (tmp_path / ".env").write_text("COMPOSE_PROJECT_NAME=demo\nDATASYNC_SYNC__CREATE_TOPICS=false\n")
    assert load_settings().sync.create_topics is False


def test_an_http_host_that_does_not_resolve(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "topics").mkdir()
    (tmp_path / "topics" / "t.yaml").write_text("topics: [{name: t, value: string}]\n")
    (tmp_path / "schemas").mkdir()
    monkeypatch.setenv("DATASYNC_HTTP__HOST", "nosuch.invalid")
    status, lines = datasync(capsys, "run", "--bootstrap-servers", "127.0.0.1:1")
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith("datasync: cannot serve HTTP on nosuch.invalid:8080: the host name does not resolve (")
