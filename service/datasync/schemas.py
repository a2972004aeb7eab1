"""Avro schemas from ``schemas/``: parsed once, indexed by full name and fingerprint.

Every ``.avsc`` file (hidden ones skipped) is a writer schema that records may carry (by its
CRC-64-AVRO fingerprint). The *reader* schema of a full name ``a.b.Name`` is
the file ``a/b/Name.avsc`` (or the one file defining it); other files defining
the same name (for example ``a/b/Name.v1.avsc``) are older versions, kept so
their records still decode. References between files resolve to readers.

For every record ``a.b.Name`` the store also derives ``a.b.NameChange``, the
changefeed's envelope: ``{op, key, before, after, source, ts_ms}`` with
``before``/``after`` of type ``a.b.Name`` (see ``datasync.changefeed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from datasync.errors import ConfigError
from datasync.tree import files_under


@dataclass(frozen=True)
class Schema:
    fullname: str
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian, as in the single-object encoding
    source: str
    aliases: tuple[bytes, ...] = ()  # other fingerprints that denote the same schema


class SchemaStore:
    """All schemas of one ``schemas/`` directory."""

    def __init__(self, schemas: list[Schema] | None = None) -> None:
        self._by_name: dict[str, Schema] = {}
        self.by_fingerprint: dict[bytes, Schema] = {}
        for schema in schemas or []:
            self.add(schema)

    def add(self, schema: Schema, reader: bool = True) -> None:
        """A schema records may be written with; unless an older version, also the reader of its name."""
        for fp in (schema.fingerprint, *schema.aliases):
            self.by_fingerprint.setdefault(fp, schema)
        if reader:
            self._by_name[schema.fullname] = schema

    def get(self, fullname: str) -> Schema | None:
        return self._by_name.get(fullname)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    @classmethod
    def load(cls, directory: Path) -> SchemaStore:
        """Parse every ``*.avsc`` below ``directory``; references between files resolve."""
        store = cls()
        if not directory.is_dir():
            return store
        files: dict[Path, Any] = {}
        for path in files_under(directory, "*.avsc"):
            try:
                files[path] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(str(path), "", f"cannot read schema: {exc}") from exc
        older = _older_versions(directory, files)
        named: dict[str, Any] = {}  # the readers' types, which every file's references resolve to
        _parse_all(store, {p: obj for p, obj in files.items() if p not in older}, named, reader=True)
        _parse_all(store, older, named, reader=False)
        for name in store.names():
            reader = store.get(name)
            if reader is not None and _is_record(reader.parsed) and store.get(f"{name}Change") is None:
                # Parsed against the reader's own definitions, not whichever version came first.
                own = dict(reader.parsed.get("__named_schemas", {}))
                try:
                    store.add(_parse(directory / f"(derived from {name})", change_envelope(reader), own))
                except Exception as exc:  # e.g. a type of the user's named like the envelope's parts
                    raise ConfigError(reader.source, "", f"cannot derive {name}Change: {exc}") from exc
        return store


def _parse_all(store: SchemaStore, pending: dict[Path, Any], named: dict[str, Any], reader: bool) -> None:
    """Parse these files into ``store``; with ``reader``, the types they define join ``named``."""
    while pending:  # files may refer to types of files parsed later: go round until none parses
        errors: dict[Path, Exception] = {}
        before = len(pending)
        for path, obj in list(pending.items()):
            try:
                schema = _parse(path, obj, named if reader else dict(named))
            except Exception as exc:  # fastavro raises several unrelated types
                errors[path] = exc
                continue
            del pending[path]
            store.add(schema, reader)
        if len(pending) == before:
            bad, error = next(iter(errors.items()))
            raise ConfigError(str(bad), "", f"invalid Avro schema: {error}")


def _older_versions(directory: Path, files: dict[Path, Any]) -> dict[Path, Any]:
    """The files that are older versions: of several defining one name, all but ``a/b/Name.avsc``.

    Raises ConfigError naming two of them when none is at that path: which one is the reader is unclear.
    """
    defining: dict[str, list[Path]] = {}
    for path, obj in files.items():
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name, namespace = obj["name"], obj.get("namespace")
            defining.setdefault(name if "." in name or not namespace else f"{namespace}.{name}", []).append(path)
    older: dict[Path, Any] = {}
    for name, paths in defining.items():
        reader = directory / (name.replace(".", "/") + ".avsc")
        if len(paths) == 1:
            continue
        if reader not in paths:
            message = f"{name} is also defined in {paths[0]}: put its reader schema in {reader}"
            raise ConfigError(str(paths[1]), "", message)
        older |= {path: files[path] for path in paths if path != reader}
    return older


def _parse(path: Path, obj: Any, named: dict[str, Any]) -> Schema:
    """Parse one file against the types of ``named``, adding those it defines to ``named``."""
    own: dict[str, Any] = dict(named)
    try:
        parsed = fastavro.parse_schema(obj, named_schemas=own)
    except fastavro.schema.SchemaParseException:
        # A second version of an already known name: parse it on its own.
        own = {}
        parsed = fastavro.parse_schema(obj, named_schemas=own)
    for name, value in own.items():
        named.setdefault(name, value)
    fullname = parsed["name"] if isinstance(parsed, dict) and "name" in parsed else str(obj)
    # Types defined in other files are inlined (once) so that the fingerprint covers them too.
    canonical = to_parsing_canonical_form(_inline_once(parsed, own, set()))
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    # fastavro's own canonical form leaves types of other files as bare names; writers that use
    # it get this fingerprint, which is accepted for decoding too.
    try:
        aliases: tuple[bytes, ...] = (bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")),)
    except Exception:  # a top-level union or array of another file's type: fastavro cannot write that form
        aliases = ()
    return Schema(fullname=fullname, parsed=parsed, fingerprint=fp, source=str(path), aliases=aliases)


def _inline_once(node: Any, named: dict[str, Any], seen: set[str]) -> Any:
    """A self-contained copy of a type: each named type defined at its first use, named after."""
    if isinstance(node, str):
        return _inline_once(named[node], named, seen) if node in named and node not in seen else node
    if isinstance(node, list):  # a union
        return [_inline_once(item, named, seen) for item in node]
    kind = node["type"]
    if kind in ("record", "enum", "fixed"):
        if node["name"] in seen:
            return node["name"]
        seen.add(node["name"])
    out = {key: value for key, value in node.items() if not key.startswith("__")}
    if kind == "record":
        out["fields"] = [{**field, "type": _inline_once(field["type"], named, seen)} for field in node["fields"]]
    elif kind == "array":
        out["items"] = _inline_once(node["items"], named, seen)
    elif kind == "map":
        out["values"] = _inline_once(node["values"], named, seen)
    elif not isinstance(kind, str) or kind in named:
        out["type"] = _inline_once(kind, named, seen)
    return out


def _is_record(parsed: Any) -> bool:
    return isinstance(parsed, dict) and parsed.get("type") == "record"


def change_envelope(value: Schema) -> dict[str, Any]:
    """The Avro schema of the changefeed's envelope for records of ``value``."""
    name = value.fullname
    source_fields = [{"name": "topic", "type": "string"}, {"name": "partition", "type": "int"},
                     {"name": "offset", "type": "long"}]  # fmt: skip
    return {
        "type": "record",
        "name": f"{name}Change",
        "doc": f"A change of a {name} (Debezium-style envelope); written by the datasync changefeed.",
        "fields": [
            {"name": "op", "type": {"type": "enum", "name": f"{name}ChangeOp", "symbols": ["c", "u", "d", "r"]}},
            {"name": "key", "type": "string"},
            {"name": "before", "type": ["null", name], "default": None},
            {"name": "after", "type": ["null", name], "default": None},
            {"name": "source", "type": {"type": "record", "name": f"{name}ChangeSource", "fields": source_fields}},
            {"name": "ts_ms", "type": "long"},
        ],
    }


def definition(schema: Schema) -> Any:
    """The schema as self-contained JSON (types of other files inlined), as a registry stores it."""
    named = schema.parsed.get("__named_schemas", {}) if isinstance(schema.parsed, dict) else {}
    return _inline_once(schema.parsed, named, set())
