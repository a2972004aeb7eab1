"""Exceptions with a stable meaning, shared by every module."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(Exception):
    """Bindings, schemas or settings are invalid. Names the file and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class SettingsError(Exception):
    """Settings cannot be used. The message is one line naming the variables (or CLI flags) at fault."""


class DecodeError(ValueError):
    """A record's bytes cannot be decoded with the topic's codec."""


class EncodeError(ValueError):
    """A value does not fit the codec (for example it does not match the Avro schema).

    ``fields`` names the offending fields of the value (``ip_addresses[1]``), if any.
    """

    def __init__(self, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = list(fields)


class TopicError(Exception):
    """A declared topic is missing or cannot be described on the broker."""
