"""The ``datasync`` command.

  run                     run the service on the bindings
  check [--broker]        validate topics/ and schemas/ (and, with --broker, the topics on the broker)
  topics create           create the declared topics that are missing
  dump TOPIC              read a topic to its end and print its state as JSON lines
  publish TOPIC KEY VALUE encode a value with the topic's codec and produce it (--delete: a tombstone)
  resync PLUGIN           ask the running service to resync one plugin (over its HTTP API)

Exit status: 0 success, 1 runtime failure (broker unreachable, topic missing, ...), 2 invalid
settings or bindings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from datasync import __version__
from datasync.admin import (
    COMPACTED_ON_DELETE,
    DOES_NOT_EXIST,
    check_topics,
    dead_letter_topics,
    missing_topics,
    prepare_topics,
)
from datasync.api import KeyValues
from datasync.bindings import Bindings, Topic, load_bindings
from datasync.confluent import prepare_encode
from datasync.engine import DataSync
from datasync.errors import ConfigError, EncodeError, SettingsError, TopicError
from datasync.logs import setup_logging
from datasync.metrics import Metrics
from datasync.publish import PublishError, Publishing
from datasync.registry import RegistryError
from datasync.settings import Settings, SyncSettings, load_settings
from datasync.startup import UNREACHABLE, GaveUp, Startup, connect_with_retry, reason
from datasync.web import HttpServer

EXIT_CONFIG = 2
log = logging.getLogger("datasync")


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option left out after the command must not reset one given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--topics-dir", type=Path, help="bindings directory (DATASYNC_TOPICS_DIR, default topics)")
    common.add_argument("--schemas-dir", type=Path, help="Avro schemas (DATASYNC_SCHEMAS_DIR, default schemas)")
    common.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (DATASYNC_KAFKA__BOOTSTRAP_SERVERS)")
    common.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="DATASYNC_LOG_LEVEL (any case)")  # fmt: skip
    common.add_argument("--log-format", choices=["text", "json"], help="DATASYNC_LOG_FORMAT")
    parser = argparse.ArgumentParser(
        prog="datasync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"datasync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[common], help="run the service on the bindings")
    run.add_argument("--http-port", type=int, default=argparse.SUPPRESS,
                     help="HTTP port (DATASYNC_HTTP__PORT, default 8080)")  # fmt: skip
    check = commands.add_parser("check", parents=[common], help="validate topics/ and schemas/")
    check.add_argument("--broker", action="store_true", help="also check the declared topics on the broker")
    topics = commands.add_parser("topics", parents=[common], help="manage the declared topics")
    topics.add_argument("action", choices=["create"], help="create: create the declared topics that are missing")
    dump = commands.add_parser("dump", parents=[common], help="print a topic's current state as JSON lines")
    dump.add_argument("topic")
    dump.add_argument("--prefix", default="", help="only keys with this prefix")
    publish = commands.add_parser("publish", parents=[common], help="encode and produce one value")
    publish.add_argument("topic")
    publish.add_argument("key")
    publish.add_argument("value", nargs="?", help=VALUE_HELP)
    publish.add_argument("--delete", action="store_true", help="write a tombstone (no VALUE)")
    resync = commands.add_parser("resync", parents=[common], help="ask the running service to resync a plugin")
    resync.add_argument("plugin")
    resync.add_argument("--url", help="the service's HTTP address (default http://DATASYNC_HTTP__HOST:PORT)")
    return parser


VALUE_HELP = (
    "as `dump` prints it: JSON for json and avro topics ('null' writes a tombstone), "
    "the text itself for string topics, base64 for bytes topics"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"datasync: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # One-shot commands report broker errors in one line of their own: the client's are noise there.
    quiet = args.command != "run" and settings.log_level != "DEBUG"
    setup_logging(settings.log_level, settings.log_format, logging.CRITICAL if quiet else None)
    if args.command == "resync":
        return asyncio.run(_resync(settings, args))
    # Plugin classes are named relative to the working directory (e.g. examples.demo:Interfaces).
    sys.path.insert(0, str(Path.cwd()))
    try:
        bindings = load_bindings(settings.topics_dir, settings.schemas_dir, settings.registry)
    except ConfigError as exc:
        print(f"datasync: invalid bindings: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check" and not args.broker:
        _describe(bindings)
        return 0
    if not settings.kafka.bootstrap_servers:
        print("datasync: no Kafka configured: set DATASYNC_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    command = {"run": _run, "check": _check_broker, "topics": _create_topics, "dump": _dump, "publish": _publish}
    try:
        return asyncio.run(command[args.command](settings, bindings, args))
    except ConfigError as exc:
        print(f"datasync: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (TopicError, GaveUp) as exc:
        print(f"datasync: {exc}", file=sys.stderr)
        return 1
    except UNREACHABLE as exc:
        print(f"datasync: broker at {settings.kafka.bootstrap_servers} unreachable: {reason(exc)}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"datasync: schema registry: {exc}", file=sys.stderr)
        return 1
    except PublishError as exc:
        print(f"datasync: {exc}", file=sys.stderr)
        return 1


# The settings that flags set: validated like the environment's, and named as given in errors.
FLAGS = {
    "topics_dir": ("topics_dir",),
    "schemas_dir": ("schemas_dir",),
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "log_level": ("log_level",),
    "log_format": ("log_format",),
    "http_port": ("http", "port"),
}


def _settings(args: argparse.Namespace) -> Settings:
    given = vars(args)  # a flag left out is not there (argparse.SUPPRESS)
    flags = {loc: ("--" + flag.replace("_", "-"), given[flag]) for flag, loc in FLAGS.items() if flag in given}
    return load_settings(flags)


def _describe(bindings: Bindings) -> None:
    for name, topic in bindings.topics.items():
        spec = topic.spec
        print(f"topic {name}: {spec.partitions} partition(s), compacted={spec.compacted}, value={topic.codec.spec}")
    for i, plugin in enumerate(bindings.plugins, 1):
        watches = "; ".join(f"{w.topic} {list(w.prefixes)}" for w in plugin.spec.watch)
        print(f"plugin {i}. {plugin.spec.name} ({plugin.spec.class_}): {watches}")
    print("bindings OK")


def _topic(bindings: Bindings, name: str) -> Topic:
    if name not in bindings.topics:
        raise ConfigError(name, "", f"not a declared topic (declared: {', '.join(bindings.topics)})")
    return bindings.topics[name]


async def _require(settings: Settings, topic: Topic) -> None:
    """Fail fast on a topic missing from the broker (a producer would wait a whole request time-out)."""
    if await missing_topics(settings.kafka, [topic.spec.name]):
        raise TopicError(f"topic {topic.spec.name} does not exist on the broker (`datasync topics create`)")


async def _run(settings: Settings, bindings: Bindings, args: argparse.Namespace) -> int:
    """Serve HTTP at once, connect (retrying while the broker is away), run until SIGTERM/SIGINT."""
    engine = DataSync.from_bindings(
        bindings, settings.kafka, settings.sync, settings.group, settings.state_dir, settings.snapshot
    )
    startup = Startup()
    http = HttpServer(engine, settings.http, startup) if settings.http.enabled else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if http is not None:
        try:
            await http.start()
        except OSError as exc:
            where = f"{settings.http.host}:{settings.http.port}"
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            if isinstance(exc, socket.gaierror):  # its errno is no OS error number
                why = f"the host name does not resolve ({exc.strerror})"
            print(f"datasync: cannot serve HTTP on {where}: {why}", file=sys.stderr)
            return 1
    _summary(settings, bindings, http)

    async def connect() -> None:
        problems = await check_topics(settings.kafka, [t.spec for t in bindings.topics.values()])
        fatal = [p for p in problems if p.endswith(COMPACTED_ON_DELETE)]
        for problem in problems:
            if problem not in fatal and not (settings.sync.create_topics and problem.endswith(DOES_NOT_EXIST)):
                log.warning("%s", problem)  # a missing topic is about to be created: no warning for that
        if fatal:
            raise ConfigError(str(settings.topics_dir), "", "; ".join(fatal))
        await engine.start()

    failure: BaseException | None = None
    try:
        if await connect_with_retry(connect, settings.kafka, startup, stop):
            startup.starting = False
            log.info("connected to %s", settings.kafka.bootstrap_servers)
            failure = await _until_stopped(stop, engine)
    finally:
        startup.starting = False
        log.info("shutting down")
        if http is not None:
            await http.stop()
        await engine.stop()
    log.info("stopped")
    if failure is not None:  # logged with its traceback when it happened
        print(f"datasync: the engine failed: {failure!r}", file=sys.stderr)
        return 1
    return 0


async def _until_stopped(stop: asyncio.Event, engine: DataSync) -> BaseException | None:
    """Wait for SIGTERM/SIGINT, or for the engine to fail (a bug: exit 1, so that an orchestrator
    restarts the service rather than leave it serving stale tables)."""
    stopped, ended = asyncio.create_task(stop.wait()), asyncio.create_task(engine.wait_ended())
    try:
        await asyncio.wait([stopped, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        ended.cancel()
    return None if stop.is_set() else ended.result()


def _summary(settings: Settings, bindings: Bindings, http: HttpServer | None) -> None:
    """One line telling an operator what this process is about to do."""
    served = "off"
    if http is not None:
        writes = "on" if settings.http.writes_enabled else "off"
        served = f"{settings.http.host}:{http.port} (/metrics /healthz /readyz /v1/status; writes {writes})"
    log.info(
        "datasync %s: brokers %s; topics %s; plugins in resync order %s; HTTP %s",
        __version__,
        settings.kafka.bootstrap_servers,
        ", ".join(bindings.topics) or "none",
        ", ".join(p.spec.name for p in bindings.plugins) or "none",
        served,
    )


async def _check_broker(settings: Settings, bindings: Bindings, args: argparse.Namespace) -> int:
    _describe(bindings)
    declared = [t.spec for t in bindings.topics.values()]
    problems = await check_topics(settings.kafka, declared)
    dead = [spec.name for spec in dead_letter_topics(declared)]
    problems += [f"dead-letter topic {name}{DOES_NOT_EXIST}" for name in await missing_topics(settings.kafka, dead)]
    for problem in problems:
        print(problem)
    print("broker OK" if not problems else f"{len(problems)} problem(s) on the broker")
    return 1 if problems else 0


async def _create_topics(settings: Settings, bindings: Bindings, args: argparse.Namespace) -> int:
    declared = [t.spec for t in bindings.topics.values()]
    specs = [*declared, *dead_letter_topics(declared)]
    missing = await missing_topics(settings.kafka, [s.name for s in specs])
    await prepare_topics(settings.kafka, specs, create=True)
    for spec in specs:
        print(f"{spec.name}: {'created' if spec.name in missing else 'exists'}")
    return 0


DUMP_SHUTDOWN_S = 1.0  # a dump has no plugin calls to wait for: only the engine's current step
PROGRESS_EVERY_S = 0.2  # how often a terminal's progress line is redrawn


async def _dump(settings: Settings, bindings: Bindings, args: argparse.Namespace) -> int:
    topic = _topic(bindings, args.topic)
    await _require(settings, topic)
    engine = DataSync(settings.kafka, SyncSettings(create_topics=False, shutdown_timeout_s=DUMP_SHUTDOWN_S))
    engine.add_topic(topic.spec.model_copy(update={"dead_letter": None}), topic.codec)  # reading only: no copies
    await engine.start()
    try:
        failure = await _read_to_end(engine, topic.spec.name, settings.kafka.bootstrap_servers)
        if failure is None:
            table = engine.table(topic.spec.name)
            items = KeyValues([(topic.spec.name, topic.codec, table.keys_under(args.prefix), table.data)])
            for kv in items:
                line = {"key": kv.key, "value": kv.value, "revision": kv.revision, "partition": kv.partition,
                        "timestamp": kv.timestamp}  # fmt: skip
                print(json.dumps(line, default=_jsonable))
    finally:
        await engine.stop()
    if failure is not None:  # last, after what stopping logged
        print(f"datasync: {failure}", file=sys.stderr)
        return 1
    return 0


async def _read_to_end(engine: DataSync, name: str, servers: str) -> str | None:
    """Wait until the engine has read topic ``name`` to its end; None, or why it cannot (one line)."""

    def over() -> bool:
        return engine.generation > 0 or not engine.broker_connected or not engine.running

    progress = sys.stderr.isatty()
    try:
        while not over():
            if progress:
                left = (await engine.topics_status())[name]["resync_remaining"]
                print(f"\rreading {name}: {left} records left   ", end="", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_EVERY_S if progress else None):
                    await engine.wait_for(over)
    finally:
        if progress:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    if engine.generation > 0:
        return None
    if not engine.running:
        return f"reading {name} failed: the engine task ended (its error is logged above)"
    return f"broker at {servers} lost while reading {name}"


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _parse_value(codec_spec: str, text: str) -> Any:
    """The VALUE argument in the form `dump` prints it for this codec."""
    if codec_spec == "string":
        return text
    if codec_spec == "bytes":
        try:
            return base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise ConfigError("VALUE", "", f"not base64 (bytes topics take base64): {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("VALUE", "", f"not JSON: {exc}") from exc


async def _publish(settings: Settings, bindings: Bindings, args: argparse.Namespace) -> int:
    topic = _topic(bindings, args.topic)
    if args.delete == (args.value is not None):
        raise ConfigError("VALUE", "", "give either a VALUE or --delete")
    value = None if args.delete else _parse_value(topic.codec.spec, args.value)
    if value is not None:
        await prepare_encode(topic.codec)
    try:
        raw = None if value is None else topic.codec.encode(value)
    except EncodeError as exc:
        raise ConfigError("VALUE", "", str(exc)) from exc
    await _require(settings, topic)
    # The service's own producer: a broker gone after the check is a PublishError, not a hang.
    publishing = Publishing(settings.kafka, Metrics(), settings.sync.shutdown_timeout_s)
    try:
        await publishing.start()
        (meta,) = await publishing.send_many("cli", topic.spec.name, [(args.key.encode(), raw)])
    finally:
        await publishing.stop()
    print(f"{'deleted' if raw is None else 'put'} {args.key} -> {meta.topic}/{meta.partition}@{meta.offset}")
    return 0


async def _resync(settings: Settings, args: argparse.Namespace) -> int:
    """POST /v1/plugins/{name}/resync to the running service, with the bearer token."""
    base = args.url or f"http://{settings.http.host}:{settings.http.port}"
    url = f"{base.rstrip('/')}/v1/plugins/{quote(args.plugin, safe='')}/resync"
    headers = {}
    if settings.http.token is not None:
        headers["Authorization"] = f"Bearer {settings.http.token.get_secret_value()}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(url, headers=headers) as response:
                body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"datasync: no answer from {base}: {exc!r}", file=sys.stderr)
        return 1
    if response.status != 202:
        error = body.get("error", body) if isinstance(body, dict) else body
        print(f"datasync: {url}: {response.status} {error}", file=sys.stderr)
        return 1
    print(f"resync of {args.plugin} requested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
