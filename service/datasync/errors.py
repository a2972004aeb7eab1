"""Exceptions with a stable meaning, shared by every module."""

from __future__ import annotations


class ConfigError(Exception):
    """Bindings, schemas or settings are invalid. Names the file and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class DecodeError(ValueError):
    """A record's bytes cannot be decoded with the topic's codec."""


class EncodeError(ValueError):
    """A value does not fit the codec (for example it does not match the Avro schema)."""


class TopicError(Exception):
    """A declared topic is missing or cannot be described on the broker."""
