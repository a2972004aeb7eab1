"""Service settings: environment (``DATASYNC_``, nested with ``__``), ``.env``, CLI flags."""

from __future__ import annotations

import difflib
import re
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic_settings
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from datasync.errors import SettingsError


class Invalid(ValueError):
    """A group's own check failed: names the settings at fault, so that errors name their variables."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(f"{', '.join(fields)}: {message}")
        self.message = message
        self.fields = fields


def _tls_context(cafile: Path | None, field: str) -> ssl.SSLContext:
    """A client TLS context trusting the certificates in ``cafile`` (without one, the system's)."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError too
        why = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise Invalid(f"{cafile}: no certificate could be read from it ({why})", field) from exc


def _key_problem(exc: OSError, certfile: Path) -> str:
    """Why the private key of the client certificate in ``certfile`` (which was read) could not be loaded."""
    if not isinstance(exc, ssl.SSLError):
        return str(exc.strerror)
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"the key does not match the certificate in {certfile}"
    return "no private key could be read from it (not PEM, or encrypted and ssl_password missing or wrong)"


PREFIX = "DATASYNC_"


class Group(BaseModel):
    """A group of settings (``DATASYNC_GROUP__KEY``): a key it does not have, a typo, is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


# One bootstrap server: a host name, an IPv4 address or a bracketed IPv6 address, and a port
# (without one, Kafka's 9092, as every Kafka client).
HOST_PORT = re.compile(r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?::(\d+))?", re.ASCII)


class KafkaSettings(Group):
    """How to reach the Kafka cluster, including TLS and SASL for production clusters."""

    bootstrap_servers: str = Field(default="", description="host[:port][,host[:port]]; empty: none configured")
    client_id: str = "datasync"
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = Field(default=None, description="the password of an encrypted private key")
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    connect_backoff_max_s: float = Field(default=30.0, gt=0, description="longest wait between start-up attempts")
    connect_give_up_s: float | None = Field(
        default=None, ge=0, description="`run` exits 1 when the broker stays unreachable this long; None: never"
    )
    _ssl_context: ssl.SSLContext | None = PrivateAttr(default=None)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, servers: str) -> str:
        """Refused here, not retried for ever as an unreachable broker (or a client's traceback)."""
        listed = [server.strip() for server in servers.split(",")] if servers.strip() else []
        for server in listed:
            if "://" in server:
                raise ValueError(f"{server!r} is a URL: give host:port")
            found = HOST_PORT.fullmatch(server)
            if not found:
                raise ValueError(f"{server!r} is not host:port (host:port[,host:port])")
            if found[1] is not None and not 1 <= int(found[1]) <= 65535:
                raise ValueError(f"{server!r}: the port must be 1-65535")
        return ",".join(listed)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if not getattr(self, name)]
            if missing:
                raise Invalid(f"needed with security_protocol {self.security_protocol}", *missing)
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise Invalid(f"no such file {path}", name)
        stray = [name for name in ("ssl_keyfile", "ssl_password") if getattr(self, name) and not self.ssl_certfile]
        if stray:
            raise Invalid("needs ssl_certfile (the client certificate)", *stray)
        return self

    @model_validator(mode="after")
    def _tls(self) -> KafkaSettings:
        """Load the TLS files now: a bad one is a settings error naming it, not an unreachable broker."""
        if not self.security_protocol.endswith("SSL"):
            return self
        context = _tls_context(self.ssl_cafile, "ssl_cafile")
        if self.ssl_certfile is not None:
            _tls_context(self.ssl_certfile, "ssl_certfile")  # it holds a certificate: what fails below is the key
            key, field = (self.ssl_keyfile, "ssl_keyfile") if self.ssl_keyfile else (self.ssl_certfile, "ssl_certfile")
            # A password, even "", keeps OpenSSL from prompting on the terminal for that of an encrypted key.
            password = self.ssl_password.get_secret_value() if self.ssl_password else ""
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
            except OSError as exc:  # ssl.SSLError too
                raise Invalid(f"{key}: {_key_problem(exc, self.ssl_certfile)}", field) from exc
        context.check_hostname = self.ssl_check_hostname
        self._ssl_context = context
        return self

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client we create."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self._ssl_context is not None:  # with SSL (made by _tls)
            options["ssl_context"] = self._ssl_context
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None  # checked by _consistent
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password.get_secret_value(),
            )
        return options


class SyncSettings(Group):
    """How the engine reads, retries and batches."""

    fetch_max_records: int = Field(default=5000, ge=1, description="records per CHANGE batch at most")
    resync_max_attempts: int = Field(default=5, ge=1, description="failures in a row before a plugin is 'failed'")
    resync_backoff_s: float = Field(default=0.5, gt=0)
    resync_backoff_max_s: float = Field(default=30.0, gt=0)
    resync_timeout_s: float = Field(default=300.0, gt=0, description="time limit of one resync call")
    change_max_attempts: int = Field(default=3, ge=1)
    change_timeout_s: float = Field(default=30.0, gt=0, description="time limit of one change call")
    change_backoff_s: float = Field(default=0.1, ge=0)
    plugin_queue_max_records: int = Field(default=50_000, ge=1, description="changes queued per plugin at most")
    unhealthy_after_failed_s: float | None = Field(
        default=None, gt=0, description="/healthz fails once a plugin has been 'failed' this long (None: never)"
    )
    emit_identical_puts: bool = Field(default=False, description="deliver puts equal to the current value")
    create_topics: bool = Field(default=True, description="create declared topics that do not exist")
    broker_probe_s: float = Field(default=2.0, gt=0, description="how often broker reachability is checked")
    broker_probe_failures: int = Field(default=3, ge=1, description="failed probes in a row that mean 'lost'")
    shutdown_timeout_s: float = Field(default=10.0, ge=0, description="time in-flight plugin calls get at shutdown")


class GroupSettings(Group):
    """Running several instances: the Kafka consumer group that divides partitioned topics among them."""

    id: str | None = Field(default=None, min_length=1, description="group id; unset: a single instance reads all")
    session_timeout_ms: int = Field(default=10_000, ge=1000, description="a member silent this long is dropped")
    heartbeat_interval_ms: int = Field(
        default=1_000,
        ge=100,
        description="members learn of a rebalance at their next heartbeat: it delays every handover",
    )
    rebalance_timeout_ms: int = Field(default=60_000, ge=1000, description="how long a rebalance waits for members")

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> GroupSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise Invalid("the heartbeat interval must be at most a third of the session timeout",
                          "heartbeat_interval_ms", "session_timeout_ms")  # fmt: skip
        return self


class SnapshotSettings(Group):
    """When state-table snapshots are written (only with a state directory, ``DATASYNC_STATE_DIR``)."""

    interval_s: float = Field(default=600.0, ge=0, description="periodic snapshots; 0: none")
    after_rebuild: bool = Field(default=True, description="once every plugin resynced after a rebuild")
    on_shutdown: bool = Field(default=True, description="at a clean shutdown")


class HttpSettings(Group):
    """The HTTP server: metrics, health, readiness, status."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    wedged_after_s: float = Field(default=300.0, gt=0, description="/healthz fails when the engine is stuck this long")
    writes_enabled: bool = Field(default=False, description="accept PUT/DELETE of keys (needs token)")
    token: SecretStr | None = Field(default=None, description="bearer token required by the write endpoints")
    reads_need_token: bool = Field(default=False, description="the key read endpoints need the token too")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _token_for_writes(self) -> HttpSettings:
        for name in ("writes_enabled", "reads_need_token"):
            if getattr(self, name) and (self.token is None or len(self.token.get_secret_value()) < 16):
                raise Invalid("needs a token of at least 16 characters", name, "token")
        return self


class RegistrySettings(Group):
    """A Confluent-compatible schema registry, for topics declared ``value: registry:NAME``."""

    urls: str = Field(default="", description="base URL(s), comma-separated, tried in turn; empty: none")
    username: str | None = Field(default=None, description="basic auth user (with password)")
    password: SecretStr | None = None
    bearer_token: SecretStr | None = Field(default=None, description="instead of basic auth")
    ca_file: Path | None = Field(default=None, description="PEM CA bundle for https registries")
    timeout_s: float = Field(default=10.0, gt=0, description="time limit of one registry request")
    retry_backoff_s: float = Field(default=0.5, gt=0, description="first wait after a failed request, doubling")
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    cache_size: int = Field(default=1000, ge=1, description="writer schemas kept in memory (LRU)")
    auto_register: bool = Field(default=True, description="publishing registers a missing schema (else: look up)")
    subject_strategy: Literal["topic", "record", "topic_record"] = "topic"
    _ssl_context: ssl.SSLContext | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> RegistrySettings:
        if (self.username is None) != (self.password is None):
            raise Invalid("basic auth needs both", "username", "password")
        if self.username is not None and self.bearer_token is not None:
            raise Invalid("use basic auth or a bearer token, not both", "username", "bearer_token")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise Invalid(f"no such file {self.ca_file}", "ca_file")
        if self.ca_file is not None:  # loaded now: a bad file is a settings error naming it
            self._ssl_context = _tls_context(self.ca_file, "ca_file")
        if not all(url.startswith(("http://", "https://")) for url in self.url_list):
            raise Invalid("every URL must start with http:// or https://", "urls")
        return self

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context trusting ``ca_file``; None: the client's default."""
        return self._ssl_context

    @property
    def url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.urls.split(",") if u.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",  # DATASYNC_ variables that name no setting, see _Unknown
        dotenv_filtering="only_existing",  # other variables in .env are not ours
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    group: GroupSettings = Field(default_factory=GroupSettings)
    snapshot: SnapshotSettings = Field(default_factory=SnapshotSettings)
    state_dir: Path | None = Field(default=None, description="where table snapshots live; unset: none")
    topics_dir: Path = Path("topics")
    schemas_dir: Path = Path("schemas")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        unknown = _Unknown(settings_cls, env_settings, dotenv_settings)
        return init_settings, env_settings, dotenv_settings, file_secret_settings, unknown


# Variables of the project's tools (tools/localkafka.py, the tests) that are not the service's settings.
NOT_SETTINGS = frozenset({"DATASYNC_KAFKA_CACHE", "DATASYNC_TEST_BOOTSTRAP"})


class _Unknown(PydanticBaseSettingsSource):
    """The DATASYNC_ variables (environment and .env) that name no setting, for extra="forbid" to refuse.

    The other sources read only the names of settings, so a misspelled top-level one would go unnoticed; a
    misspelled key of a group is refused by the group itself.
    """

    def __init__(self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._sources = [source for source in sources if isinstance(source, EnvSettingsSource)]

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not asked: __call__ is

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        unknown: dict[str, Any] = {}
        for source in self._sources:
            for name, value in source.env_vars.items():  # in lower case
                if not name.startswith(PREFIX.lower()) or name.upper() in NOT_SETTINGS:
                    continue
                key = name.removeprefix(PREFIX.lower())
                head, nested, _ = key.partition("__")
                if head not in fields or (nested and _group(fields[head]) is None):
                    unknown[key] = value
        return unknown


def _group(field: FieldInfo) -> type[Group] | None:
    """The model of a group of settings (kafka, sync, ...); None for a setting of its own."""
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, Group) else None


def _settings_variables() -> list[str]:
    """Every setting's variable, for suggestions."""
    names = []
    for name, field in Settings.model_fields.items():
        group = _group(field)
        names += [variable((name, key)) for key in group.model_fields] if group else [variable((name,))]
    return names


def variable(loc: Sequence[str | int]) -> str:
    """The environment variable of a setting: ("kafka", "ssl_cafile") -> DATASYNC_KAFKA__SSL_CAFILE."""
    return PREFIX + "__".join(str(part) for part in loc).upper()


def load_settings(flags: Mapping[tuple[str, ...], tuple[str, object]] | None = None) -> Settings:
    """Settings from CLI ``flags`` (setting -> (flag, value)), the environment and ``.env``, all validated alike.

    Raises SettingsError, one line naming the variables at fault (or the flags, for values given by flags).
    """
    overrides: dict[str, Any] = {}
    for loc, (_, value) in (flags or {}).items():
        group = overrides
        for part in loc[:-1]:
            group = group.setdefault(part, {})
        group[loc[-1]] = value
    env_file = Settings.model_config["env_file"]
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        names = {loc: flag for loc, (flag, _) in (flags or {}).items()}
        raise SettingsError("invalid setting " + "; ".join(_problem(e, names) for e in exc.errors())) from None
    except pydantic_settings.SettingsError as exc:  # a group's variable (DATASYNC_KAFKA) that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        where = variable([field[1]]) if field else str(exc)
        raise SettingsError(f"invalid setting {where}: not JSON ({exc.__cause__ or exc})") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"cannot read {env_file}: not UTF-8 at byte {exc.start}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read {exc.filename or env_file}: {exc.strerror}") from None


def _problem(error: ErrorDetails, names: Mapping[tuple[str, ...], str]) -> str:
    """``NAME[, NAME]: why`` for one validation error."""
    loc = tuple(str(part) for part in error["loc"])
    cause = error.get("ctx", {}).get("error")
    locs = [(*loc, field) for field in cause.fields] if isinstance(cause, Invalid) else [loc]
    why = cause.message if isinstance(cause, Invalid) else str(cause) if cause is not None else error["msg"]
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(variable(loc), _settings_variables(), n=1, cutoff=0.8)
        why = "no such setting" + (f" (did you mean {near[0]}?)" if near else "")
    return f"{', '.join(names.get(at) or variable(at) for at in locs)}: {why}"
