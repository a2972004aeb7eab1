"""Avro schemas from ``schemas/``: parsed once, indexed by full name and fingerprint.

Every ``.avsc`` file is a writer schema that records may carry (by its
CRC-64-AVRO fingerprint). The *reader* schema of a full name ``a.b.Name`` is
the file ``a/b/Name.avsc``; other files defining the same name (for example
``a/b/Name.v1.avsc``) are older versions, kept so their records still decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from datasync.errors import ConfigError


@dataclass(frozen=True)
class Schema:
    fullname: str
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian, as in the single-object encoding
    source: str


class SchemaStore:
    """All schemas of one ``schemas/`` directory."""

    def __init__(self, schemas: list[Schema] | None = None) -> None:
        self._by_name: dict[str, Schema] = {}
        self.by_fingerprint: dict[bytes, Schema] = {}
        for schema in schemas or []:
            self.add(schema)

    def add(self, schema: Schema) -> None:
        self.by_fingerprint.setdefault(schema.fingerprint, schema)
        canonical = schema.fullname.replace(".", "/") + ".avsc"
        if schema.fullname not in self._by_name or schema.source.endswith(canonical):
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
        pending: dict[Path, Any] = {}
        for path in sorted(directory.rglob("*.avsc")):
            try:
                pending[path] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(str(path), "", f"cannot read schema: {exc}") from exc
        named: dict[str, Any] = {}
        while pending:
            errors: dict[Path, Exception] = {}
            for path, obj in list(pending.items()):
                try:
                    schema = _parse(path, obj, named)
                except Exception as exc:  # fastavro raises several unrelated types
                    errors[path] = exc
                    continue
                del pending[path]
                store.add(schema)
            if len(errors) == len(pending) and errors:
                bad, error = next(iter(errors.items()))
                raise ConfigError(str(bad), "", f"invalid Avro schema: {error}")
        return store


def _parse(path: Path, obj: Any, named: dict[str, Any]) -> Schema:
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
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return Schema(fullname=fullname, parsed=parsed, fingerprint=fp, source=str(path))
