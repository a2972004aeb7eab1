"""Topic-to-plugin bindings: the YAML files under ``topics/``, validated before connecting.

Files (also in sub-directories; hidden ones skipped) are read in path order; plugins resync in the order
they are declared (file by file). Every error names the file and the field.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from datasync.api import Plugin
from datasync.codecs import Codec, codec_for
from datasync.errors import ConfigError
from datasync.registry import RegistryClient
from datasync.schemas import SchemaStore
from datasync.settings import RegistrySettings
from datasync.tree import files_under

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _topic_name(name: str) -> str:
    if not _TOPIC_NAME.match(name) or name in (".", ".."):
        raise ValueError("a Kafka topic name: 1-249 of [A-Za-z0-9._-]")
    return name


TopicName = Annotated[str, AfterValidator(_topic_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TopicSpec(_Model):
    """A topic holding desired state (or, later, receiving published records)."""

    name: TopicName
    partitions: int = Field(default=1, ge=1)
    replication_factor: int | None = Field(default=None, ge=1, description="default: min(3, brokers)")
    compacted: bool = True
    key: str = "string"
    value: str = "bytes"
    config: dict[str, str] = Field(default_factory=dict, description="extra topic configs")
    max_value_bytes: int | None = Field(default=None, ge=1, description="larger values are rejected")
    dead_letter: TopicName | None = Field(default=None, description="topic receiving copies of rejected records")
    sharding: Literal["replicated", "partitioned"] = Field(
        default="replicated", description="with a group: every member reads it, or each reads the partitions it owns"
    )

    @field_validator("config")
    @classmethod
    def _policy_agrees(cls, config: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """``compacted`` sets cleanup.policy; a policy in ``config`` saying otherwise would win at creation."""
        policy, compacted = config.get("cleanup.policy"), info.data.get("compacted")
        if policy is not None and compacted is not None and ("compact" in policy) != compacted:
            raise ValueError(f"cleanup.policy={policy} contradicts compacted: {str(compacted).lower()}")
        return config

    @field_validator("key")
    @classmethod
    def _string_keys(cls, key: str) -> str:
        if key != "string":
            raise ValueError("keys are UTF-8 strings: use 'string'")
        return key


class WatchSpec(_Model):
    topic: str
    prefixes: list[str] = Field(default_factory=lambda: [""], min_length=1)


class PublisherSpec(_Model):
    """A named outbound target for plugins (``ctx.publisher(name)``); values use the topic's codec."""

    name: str = Field(min_length=1)
    topic: str


class PluginSpec(_Model):
    name: str = Field(min_length=1)
    class_: str = Field(alias="class", pattern=r"^[\w.]+:[\w.]+$")
    watch: list[WatchSpec] = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    resync: Literal["full", "delta"] = Field(default="full", description="after a fault: full resync or deltas")
    status: str | None = Field(default=None, description="publisher receiving each key's apply status")
    after: list[str] = Field(default_factory=list, description="plugins whose earlier changes come first")


class BindingsFile(_Model):
    topics: list[TopicSpec] = Field(default_factory=list)
    publishers: list[PublisherSpec] = Field(default_factory=list)
    plugins: list[PluginSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class Topic:
    spec: TopicSpec
    codec: Codec
    source: str


@dataclass(frozen=True)
class PluginBinding:
    spec: PluginSpec
    plugin: Plugin  # created here, so that check refuses a class that cannot be created as run would
    source: str
    field: str  # where it is declared, e.g. plugins[1]


@dataclass(frozen=True)
class Bindings:
    topics: dict[str, Topic]
    publishers: dict[str, PublisherSpec]
    plugins: list[PluginBinding]
    schemas: SchemaStore


def load_bindings(topics_dir: Path, schemas_dir: Path, registry: RegistrySettings | None = None) -> Bindings:
    """Read, validate and resolve every binding file. Raises ConfigError."""
    schemas = SchemaStore.load(schemas_dir)
    client = RegistryClient(registry) if registry is not None and registry.url_list else None
    files = files_under(topics_dir, "*.y*ml") if topics_dir.is_dir() else []
    if not files:
        raise ConfigError(str(topics_dir), "", "no bindings (*.yaml) found")
    topics: dict[str, Topic] = {}
    plugins: list[PluginBinding] = []
    parsed = [(str(path), _read(path)) for path in files]
    for source, doc in parsed:
        for i, spec in enumerate(doc.topics):
            where = f"topics[{i}]"
            if spec.name in topics:
                raise ConfigError(
                    source, f"{where}.name", f"topic {spec.name!r} is already declared in {topics[spec.name].source}"
                )
            try:
                codec = codec_for(spec.value, schemas, client, spec.name)
            except ValueError as exc:
                raise ConfigError(source, f"{where}.value", str(exc)) from exc
            topics[spec.name] = Topic(spec, codec, source)
    partitioned = [(source, i, spec) for source, doc in parsed for i, spec in enumerate(doc.topics)
                   if spec.sharding == "partitioned"]  # fmt: skip
    try:
        check_copartitioned({spec.name: spec.partitions for _, _, spec in partitioned})
    except ValueError as exc:
        source, i, _ = next(p for p in partitioned if p[2].partitions != partitioned[0][2].partitions)
        raise ConfigError(source, f"topics[{i}].partitions", str(exc)) from exc
    publishers: dict[str, PublisherSpec] = {}
    for source, doc in parsed:
        for i, pub in enumerate(doc.publishers):
            where = f"publishers[{i}]"
            if pub.name in publishers:
                raise ConfigError(source, f"{where}.name", f"publisher {pub.name!r} is already declared")
            if pub.topic not in topics:
                raise ConfigError(source, f"{where}.topic", f"unknown topic {pub.topic!r} (declare it under topics)")
            value = topics[pub.topic].codec.spec
            if value in ("avro", "registry"):  # decodes any writer's schema, but encodes with none
                message = f"topic {pub.topic!r} (value: {value}) cannot be written: name the schema ({value}:NAME)"
                raise ConfigError(source, f"{where}.topic", message)
            publishers[pub.name] = pub
    names: dict[str, str] = {}
    for source, doc in parsed:
        for i, plugin in enumerate(doc.plugins):
            where = f"plugins[{i}]"
            if plugin.name in names:
                raise ConfigError(
                    source, f"{where}.name", f"plugin {plugin.name!r} is already declared in {names[plugin.name]}"
                )
            names[plugin.name] = source
            seen: set[tuple[str, str]] = set()
            for j, watch in enumerate(plugin.watch):
                if watch.topic not in topics:
                    raise ConfigError(
                        source,
                        f"{where}.watch[{j}].topic",
                        f"unknown topic {watch.topic!r} (declared: {', '.join(topics) or 'none'})",
                    )
                for prefix in watch.prefixes:
                    if (watch.topic, prefix) in seen:
                        raise ConfigError(source, f"{where}.watch[{j}].prefixes", f"{prefix!r} is watched twice")
                    seen.add((watch.topic, prefix))
            for j, dependency in enumerate(plugin.after):
                if dependency not in names or dependency == plugin.name:
                    raise ConfigError(
                        source, f"{where}.after[{j}]", f"{dependency!r} is not a plugin declared before {plugin.name!r}"
                    )
            if plugin.status is not None and plugin.status not in publishers:
                raise ConfigError(source, f"{where}.status", f"unknown publisher {plugin.status!r}")
            try:
                factory = import_plugin(plugin.class_)
            except ValueError as exc:
                raise ConfigError(source, f"{where}.class", str(exc)) from exc
            if plugin.resync == "delta" and getattr(factory, "resync_after_failed_change", False):
                raise ConfigError(source, f"{where}.resync", "this plugin must never miss a change: it needs 'full'")
            context = {
                "publishers": {name: pub.topic for name, pub in publishers.items()},
                "watches": {w.topic: w.prefixes for w in plugin.watch},
                "codecs": {name: topic.codec for name, topic in topics.items()},
            }
            try:
                validate_plugin_settings(factory, plugin.settings, context)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = _loc(err["loc"])
                message = err["msg"].removeprefix("Value error, ")
                raise ConfigError(source, f"{where}.settings" + (f".{loc}" if loc else ""), message) from exc
            except Exception as exc:  # a validator raising other than ValueError: pydantic lets it through
                raise ConfigError(source, f"{where}.settings", repr(exc)) from exc
            try:
                instance = factory()
            except Exception as exc:
                raise ConfigError(source, f"{where}.class", f"cannot create the plugin: {exc!r}") from exc
            plugins.append(PluginBinding(plugin, instance, source, where))
    _check_dead_letters(parsed, plugins)
    return Bindings(topics, publishers, plugins, schemas)


def _check_dead_letters(parsed: list[tuple[str, BindingsFile]], plugins: list[PluginBinding]) -> None:
    """A dead-letter topic must not be read: its copies of rejected records would be rejected and copied again."""
    watched = {w.topic: binding.spec.name for binding in plugins for w in binding.spec.watch}
    for source, doc in parsed:
        for i, spec in enumerate(doc.topics):
            target = spec.dead_letter
            if target == spec.name:
                why = "a topic cannot be its own dead-letter topic"
            elif target in watched:
                why = f"{target!r} is a state topic (plugin {watched[target]!r} watches it)"
            else:
                continue
            raise ConfigError(source, f"topics[{i}].dead_letter", f"{why}: rejected records would be read again")


def check_copartitioned(partitions: dict[str, int]) -> None:
    """Partitioned topics are co-partitioned (partition p of each goes to one member): equal counts.

    Raises ValueError naming the topics and their counts.
    """
    if len(set(partitions.values())) > 1:
        counts = ", ".join(f"{name} has {n}" for name, n in sorted(partitions.items()))
        raise ValueError(f"partitioned topics must have equal partition counts (co-partitioned): {counts}")


def import_plugin(path: str) -> type:
    """Import ``module:Class`` and check that it looks like a plugin."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, type) or not all(callable(getattr(obj, m, None)) for m in ("resync", "change")):
        raise ValueError(f"{path!r} is not a plugin class (needs async resync() and change())")
    for method in ("resync", "change", "start", "stop"):
        if hasattr(obj, method) and not inspect.iscoroutinefunction(getattr(obj, method)):
            raise ValueError(f"{path}.{method} must be a coroutine function (async def)")
    try:
        needed = [
            p.name
            for p in inspect.signature(obj).parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):  # no signature to inspect (a C type): creating it will tell
        needed = []
    if needed:
        raise ValueError(f"{path} cannot be created without arguments (needs {', '.join(needed)}); use settings")
    model = getattr(obj, "Settings", None)
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"{path}.Settings must be a pydantic model class")
    return obj


def validate_plugin_settings(plugin: type, settings: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """Validate ``settings`` with the plugin class's ``Settings`` model, if it declares one.

    The model gets ``context``: ``publishers`` (name -> topic), ``watches`` (topic -> prefixes)
    and ``codecs`` (topic -> value codec), for checks across the bindings. Raises ValidationError.
    """
    model = getattr(plugin, "Settings", None)
    return None if model is None else model.model_validate(dict(settings), context=dict(context))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe subset, refusing a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first: dict[Hashable, int] = {}  # key -> its line
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges: explicit keys may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in first:
                problem = f"duplicate key {key!r} (first at line {first[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read(path: Path) -> BindingsFile:
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc}") from exc
    except yaml.MarkedYAMLError as exc:  # one line, with the position in the file
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ": ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(str(path), "", f"invalid YAML{where}: {what}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"invalid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "", "expected a mapping with 'topics' and 'plugins'")
    try:
        return BindingsFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(str(path), _loc(err["loc"]), err["msg"].removeprefix("Value error, ")) from exc


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
