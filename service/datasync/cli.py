"""The ``datasync`` command: ``run`` the service, ``check`` the bindings offline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from datasync.bindings import Bindings, load_bindings
from datasync.engine import DataSync
from datasync.errors import ConfigError
from datasync.settings import Settings

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="datasync", description=__doc__)
    parser.add_argument("--topics-dir", type=Path, help="bindings directory (default: topics)")
    parser.add_argument("--schemas-dir", type=Path, help="Avro schemas directory (default: schemas)")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (DATASYNC_KAFKA__BOOTSTRAP_SERVERS)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service on the bindings")
    commands.add_parser("check", help="validate topics/ and schemas/ without connecting")
    args = parser.parse_args(argv)

    try:
        settings = _settings(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "DATASYNC_" + "__".join(str(p) for p in err["loc"]).upper()
        print(f"datasync: invalid setting {field}: {err['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Plugin classes are named relative to the working directory (e.g. examples.demo:Interfaces).
    sys.path.insert(0, str(Path.cwd()))
    try:
        bindings = load_bindings(settings.topics_dir, settings.schemas_dir)
    except ConfigError as exc:
        print(f"datasync: invalid bindings: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        _describe(bindings)
        return 0
    if not settings.kafka.bootstrap_servers:
        print(
            "datasync: no Kafka configured: set DATASYNC_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return asyncio.run(_run(settings, bindings))


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.topics_dir:
        overrides["topics_dir"] = args.topics_dir
    if args.schemas_dir:
        overrides["schemas_dir"] = args.schemas_dir
    if args.log_level:
        overrides["log_level"] = args.log_level
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if args.bootstrap_servers:
        settings.kafka.bootstrap_servers = args.bootstrap_servers
    return settings


def _describe(bindings: Bindings) -> None:
    for name, topic in bindings.topics.items():
        spec = topic.spec
        print(f"topic {name}: {spec.partitions} partition(s), compacted={spec.compacted}, value={topic.codec.spec}")
    for i, plugin in enumerate(bindings.plugins, 1):
        watches = "; ".join(f"{w.topic} {list(w.prefixes)}" for w in plugin.spec.watch)
        print(f"plugin {i}. {plugin.spec.name} ({plugin.spec.class_}): {watches}")
    print("bindings OK")


async def _run(settings: Settings, bindings: Bindings) -> int:
    engine = DataSync.from_bindings(bindings, settings.kafka, settings.sync)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    try:
        await stop.wait()
    finally:
        logging.getLogger("datasync").info("shutting down")
        await engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
