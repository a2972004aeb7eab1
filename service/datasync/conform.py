"""Checking a JSON-like value against an Avro schema before it is encoded.

fastavro's ``validate`` ignores fields a record does not declare, so a typo
(``mtuu`` for ``mtu``) would be dropped silently and the schema default stored
instead. ``conform`` also refuses unknown fields, and its errors name the
fields in the value's own terms (``ip_addresses[2]``), not fastavro's.
"""

from __future__ import annotations

from typing import Any

from fastavro.validation import validate

from datasync.errors import EncodeError
from datasync.schemas import Schema


def conform(value: Any, schema: Schema) -> None:
    """Raise EncodeError (with ``fields``) unless ``value`` matches ``schema`` exactly."""
    named: dict[str, Any] = schema.parsed.get("__named_schemas", {}) if isinstance(schema.parsed, dict) else {}
    unknown = _unknown(value, schema.parsed, named, "")
    if unknown:
        raise EncodeError(f"does not match {schema.fullname}: unknown field(s) {', '.join(unknown)}", unknown)
    try:
        validate(value, schema.parsed, raise_errors=True)
    except Exception as exc:  # fastavro's ValidationError and friends
        errors = getattr(exc, "errors", None) or []
        fields = [_field(e.field, schema.fullname) for e in errors if getattr(e, "field", None)]
        details = "; ".join(
            f"{_field(e.field, schema.fullname)}: expected {_type_name(e.schema)}, got {type(e.datum).__name__}"
            for e in errors
            if getattr(e, "field", None)
        )
        raise EncodeError(f"does not match {schema.fullname}: {details or type(exc).__name__}", fields) from None


def _unknown(value: Any, schema: Any, named: dict[str, Any], path: str) -> list[str]:
    """Paths of record fields in ``value`` that ``schema`` does not declare."""
    if isinstance(schema, str):
        schema = named.get(schema, schema)
    if isinstance(schema, list):  # a union: the record branch that fits best
        if not isinstance(value, dict):
            branches = [b for b in schema if _kind(b, named) == "array"] if isinstance(value, list) else []
            return _unknown(value, branches[0], named, path) if branches else []
        found = [_unknown(value, b, named, path) for b in schema if _kind(b, named) in ("record", "map")]
        return min(found, key=len) if found else []
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if kind == "record" and isinstance(value, dict):
        fields = {f["name"]: f["type"] for f in schema["fields"]}
        out = [_join(path, name) for name in value if name not in fields]
        for name, ftype in fields.items():
            if name in value:
                out += _unknown(value[name], ftype, named, _join(path, name))
        return out
    if kind == "array" and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _unknown(item, schema["items"], named, f"{path}[{i}]")]
    if kind == "map" and isinstance(value, dict):
        return [p for k, item in value.items() for p in _unknown(item, schema["values"], named, _join(path, str(k)))]
    return []


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(schema: Any, named: dict[str, Any]) -> Any:
    schema = named.get(schema, schema) if isinstance(schema, str) else schema
    return schema.get("type") if isinstance(schema, dict) else schema


def _field(field: str, fullname: str) -> str:
    return field.removeprefix(fullname + ".")


def _type_name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return " or ".join(_type_name(s) for s in schema)
    return str(schema)
