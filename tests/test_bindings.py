"""Bindings validation: every mistake names the file and the field, and the CLI exits 2."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datasync.bindings import load_bindings
from datasync.cli import main
from datasync.errors import ConfigError
from datasync.settings import RegistrySettings

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
topics:
  - name: demo.config
    partitions: 3
    value: avro:demo.Interface
plugins:
  - name: interfaces
    class: recorder:Recorder
    watch: [{topic: demo.config, prefixes: ["config/interfaces/"]}]
"""


def refusal(topics: Path, schemas: Path, registry: RegistrySettings | None = None) -> str:
    """The ConfigError that load_bindings raises, as the CLI prints it after "invalid bindings: "."""
    with pytest.raises(ConfigError) as err:
        load_bindings(topics, schemas, registry)
    return str(err.value)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    topics, schemas = tmp_path / "topics", tmp_path / "schemas"
    topics.mkdir()
    shutil.copytree(ROOT / "schemas", schemas)
    return topics, schemas


def test_example_bindings_load() -> None:
    bindings = load_bindings(ROOT / "topics", ROOT / "schemas")
    assert [p.spec.name for p in bindings.plugins] == ["interfaces", "routes"]
    assert bindings.topics["demo.interfaces"].codec.spec == "avro:demo.Interface"


def test_good_file(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD)
    bindings = load_bindings(topics, schemas)
    assert bindings.topics["demo.config"].spec.partitions == 3


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (("recorder:Recorder", "recorder:Nope"), "plugins[0].class", "has no attribute 'Nope'"),
        (("recorder:Recorder", "no_such_module:X"), "plugins[0].class", "cannot import module"),
        (("avro:demo.Interface", "avro:demo.Missing"), "topics[0].value", "unknown Avro schema"),
        (("{topic: demo.config,", "{topic: demo.other,"), "plugins[0].watch[0].topic", "unknown topic 'demo.other'"),
        (("partitions: 3", "partitions: 0"), "topics[0].partitions", "greater than or equal to 1"),
        (("partitions: 3", "partitons: 3"), "topics[0].partitons", "Extra inputs"),
        (("name: demo.config", "name: bad/name"), "topics[0].name", "a Kafka topic name"),
        (
            ("partitions: 3", "partitions: 3\n    config: {cleanup.policy: delete}"),
            "topics[0].config",
            "cleanup.policy=delete contradicts compacted: true",
        ),
        (
            ("partitions: 3", "partitions: 3\n    compacted: false\n    config: {cleanup.policy: compact}"),
            "topics[0].config",
            "cleanup.policy=compact contradicts compacted: false",
        ),
        (("watch: [", "watch: [[["), "", "invalid YAML at line 10, column 1: while parsing a flow sequence"),
        (("plugins:", "plugins: []\nplugins:"), "", "invalid YAML at line 7, column 1: duplicate key 'plugins'"),
        (("value: avro", "value: json\n    value: avro"), "", "duplicate key 'value' (first at line 5)"),
    ],
)
def test_errors_name_file_and_field(dirs: tuple[Path, Path], edit: tuple[str, str], field: str, message: str) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_bindings(topics, schemas)
    assert err.value.source.endswith("a.yaml") and err.value.field == field
    assert message in err.value.message and "\n" not in err.value.message
    assert not err.value.message.startswith("Value error")  # pydantic's prefix says nothing to an operator


def test_duplicate_names_across_files(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD)
    (topics / "b.yaml").write_text(GOOD)
    with pytest.raises(ConfigError, match=r"b.yaml: topics\[0\].name: topic 'demo.config' is already declared"):
        load_bindings(topics, schemas)
    (topics / "b.yaml").write_text(
        GOOD.split("plugins:")[0].replace("demo.config", "x") + "plugins:" + GOOD.split("plugins:")[1]
    )
    with pytest.raises(ConfigError, match=r"plugins\[0\].name: plugin 'interfaces' is already declared"):
        load_bindings(topics, schemas)


def test_check_command_exit_codes(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD)
    assert main(["--topics-dir", str(topics), "--schemas-dir", str(schemas), "check"]) == 0
    (topics / "a.yaml").write_text(GOOD.replace("recorder:Recorder", "recorder:Nope"))
    assert main(["--topics-dir", str(topics), "--schemas-dir", str(schemas), "check"]) == 2
    assert "a.yaml: plugins[0].class" in capsys.readouterr().err
    assert main(["--topics-dir", str(topics / "missing"), "check"]) == 2


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATASYNC_SYNC__RESYNC_MAX_ATTEMPTS", "zero")
    assert main(["check"]) == 2
    assert "DATASYNC_SYNC__RESYNC_MAX_ATTEMPTS" in capsys.readouterr().err


def test_unreadable_file_is_named(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").mkdir()  # not a readable file
    with pytest.raises(ConfigError, match=r"a\.yaml: cannot read"):
        load_bindings(topics, schemas)


def test_publishers_are_validated(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD + "publishers: [{name: out, topic: nope}]\n")
    with pytest.raises(ConfigError, match=r"publishers\[0\]\.topic: unknown topic 'nope'"):
        load_bindings(topics, schemas)
    (topics / "a.yaml").write_text(GOOD.replace("    class:", "    status: missing\n    class:"))
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.status: unknown publisher 'missing'"):
        load_bindings(topics, schemas)


@pytest.mark.parametrize("value", ["avro", "registry"])
def test_a_publisher_needs_a_schema_to_write(dirs: tuple[Path, Path], value: str) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(f"topics: [{{name: any, value: {value}}}]\npublishers: [{{name: out, topic: any}}]")
    assert refusal(topics, schemas, RegistrySettings(urls="http://127.0.0.1:1")) == (
        f"{topics / 'a.yaml'}: publishers[0].topic: topic 'any' (value: {value}) cannot be written: "
        f"name the schema ({value}:NAME)"
    )


def test_a_prefix_watched_twice_is_named(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD.replace('prefixes: ["config/interfaces/"]', 'prefixes: ["x/", "x/"]'))
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.watch\[0\]\.prefixes: 'x/' is watched twice"):
        load_bindings(topics, schemas)


def test_partitioned_topics_must_be_co_partitioned(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(
        "topics: [{name: a, partitions: 6, sharding: partitioned}, {name: r, partitions: 2}]"
    )
    (topics / "b.yaml").write_text("topics: [{name: b, partitions: 4, sharding: partitioned}]")
    assert refusal(topics, schemas) == (
        f"{topics / 'b.yaml'}: topics[0].partitions: partitioned topics must have equal partition counts "
        "(co-partitioned): a has 6, b has 4"
    )
    (topics / "b.yaml").write_text("topics: [{name: b, partitions: 6, sharding: partitioned}]")
    bindings = load_bindings(topics, schemas)
    assert [t.spec.sharding for t in bindings.topics.values()] == ["partitioned", "replicated", "partitioned"]
    (topics / "b.yaml").write_text("topics: [{name: b, partitions: 6, sharding: sharded}]")
    with pytest.raises(ConfigError, match=r"topics\[0\]\.sharding: Input should be 'replicated' or 'partitioned'"):
        load_bindings(topics, schemas)


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Makes a directory unlistable: chmod 000 and, for root (whom that does not stop), os.scandir refuses it."""
    made: list[Path] = []
    scandir = os.scandir

    def refuse(path: str) -> object:
        if Path(path) in made:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    def make(path: Path) -> None:
        path.chmod(0)
        made.append(path)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "scandir", refuse)
    yield make
    for path in made:
        path.chmod(0o755)


@pytest.mark.parametrize("under", ["topics", "schemas"])
def test_an_unreadable_directory_is_named(
    dirs: tuple[Path, Path], unreadable: Callable[[Path], None], under: str
) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD)
    sub = (topics if under == "topics" else schemas) / "more"
    sub.mkdir()
    unreadable(sub)
    assert refusal(topics, schemas) == f"{sub}: cannot read: Permission denied"


def test_hidden_files_and_directories_are_skipped(dirs: tuple[Path, Path]) -> None:
    """A Kubernetes ConfigMap mount: each file links into ``..data``, a link to a hidden timestamped directory."""
    topics, schemas = dirs
    (topics / "..2024_01_01").mkdir()
    (topics / "..2024_01_01" / "demo.yaml").write_text(GOOD)
    (topics / "..data").symlink_to("..2024_01_01")
    (topics / "demo.yaml").symlink_to("..data/demo.yaml")
    (topics / ".#demo.yaml").write_text("an editor's lock file")
    (schemas / ".old").mkdir()
    (schemas / ".old" / "Interface.avsc").write_text("a backup, half written")
    bindings = load_bindings(topics, schemas)
    assert list(bindings.topics) == ["demo.config"]
    assert bindings.topics["demo.config"].source == str(topics / "demo.yaml")


def test_a_dead_letter_topic_is_not_read(dirs: tuple[Path, Path]) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(GOOD.replace("partitions: 3", "partitions: 3\n    dead_letter: demo.config"))
    with pytest.raises(ConfigError, match=r"a\.yaml: topics\[0\]\.dead_letter: a topic cannot be its own dead-letter"):
        load_bindings(topics, schemas)
    (topics / "a.yaml").write_text(GOOD)
    (topics / "b.yaml").write_text("topics: [{name: other, dead_letter: demo.config}]")
    assert refusal(topics, schemas) == (
        f"{topics / 'b.yaml'}: topics[0].dead_letter: 'demo.config' is a state topic (plugin 'interfaces' watches it): "
        "rejected records would be read again"
    )
    (topics / "b.yaml").write_text("topics: [{name: other, dead_letter: dead}, {name: dead}]")  # declared, not read
    assert load_bindings(topics, schemas).topics["other"].spec.dead_letter == "dead"


FEED = """
topics: [{name: src, value: "SOURCE"}, {name: out, value: "OUT"}]
publishers: [{name: changes, topic: out}]
plugins: [{name: feed, class: "datasync.changefeed:Changefeed", watch: [{topic: src}], settings: {publisher: changes}}]
"""


@pytest.mark.parametrize(
    "source, out, unfit",
    [
        ("avro:demo.Interface", "avro:demo.Interface", "which cannot hold change envelopes"),
        ("avro:demo.Interface", "json:demo.Interface", "which cannot hold change envelopes"),
        ("avro:demo.Interface", "string", "which cannot hold change envelopes"),
        ("registry:demo.Interface", "registry:demo.Route", "which cannot hold change envelopes"),
        ("avro:demo.Interface", "avro:demo.RouteChange", "whose envelopes cannot hold demo.Interface values"),
        ("string", "avro:demo.InterfaceChange", "whose envelopes cannot hold string values"),
        ("avro:demo.Interface", "avro:demo.InterfaceChange", None),
        ("registry:demo.Interface", "registry:demo.InterfaceChange", None),
        ("avro:demo.Interface", "json", None),
        ("json", "avro:demo.InterfaceChange", None),  # the values will tell
    ],
)
def test_the_changefeed_publishes_with_a_codec_holding_its_envelopes(
    dirs: tuple[Path, Path], source: str, out: str, unfit: str | None
) -> None:
    topics, schemas = dirs
    (topics / "a.yaml").write_text(FEED.replace("SOURCE", source).replace("OUT", out))
    registry = RegistrySettings(urls="http://127.0.0.1:1")
    if unfit is None:
        assert load_bindings(topics, schemas, registry).plugins[0].spec.name == "feed"
        return
    kind = "registry" if out.startswith("registry") else "avro"
    assert refusal(topics, schemas, registry) == (
        f"{topics / 'a.yaml'}: plugins[0].settings.publisher: 'changes' writes to out (value: {out}), {unfit}: "
        f"use value: json or {kind}:NAMEChange (NAME: the watched topic's schema)"
    )
