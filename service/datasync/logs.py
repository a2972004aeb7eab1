"""Logging set-up: human-readable text, or JSON lines for log collectors.

JSON lines carry ``ts``, ``level``, ``logger``, ``message`` and, when the
call passed them (``log.info(..., extra={"plugin": name})``), the context
fields ``plugin``, ``topic``, ``partition``, ``offset`` and ``key`` as
separate fields, so collectors can filter on them. A plugin's own logger
(``ctx.logger``, named ``datasync.plugin.NAME``) supplies ``plugin`` itself.

The Kafka client repeats its connection errors many times a second while a
broker is away; ``RepeatFilter`` lets each of its messages through once per
``REPEAT_WINDOW_S`` (the rest go to DEBUG), and datasync logs one line per
state change of its own (lost, retrying, regained).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

CONTEXT_FIELDS = ("plugin", "topic", "partition", "offset", "key")
REPEAT_WINDOW_S = 60.0
PLUGIN_LOGGER = "datasync.plugin."  # + the plugin's name: the logger plugins get in their context


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name.startswith(PLUGIN_LOGGER):
            entry["plugin"] = record.name.removeprefix(PLUGIN_LOGGER)
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RepeatFilter(logging.Filter):
    """For the loggers under ``name``: pass each message template once per window; demote repeats
    to DEBUG (dropped unless DEBUG is enabled). A handler filter, so that it covers child loggers."""

    def __init__(self, name: str, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self._prefix = name
        self._window_s = window_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not (
            record.name == self._prefix or record.name.startswith(self._prefix + ".")
        ):
            return True
        now = time.monotonic()
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is None or now - last >= self._window_s:
            if len(self._last) > 1000:  # the client's templates are few; bound it anyway
                self._last.clear()
            self._last[key] = now
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def setup_logging(level: str, fmt: Literal["text", "json"], client_level: int | None = None) -> None:
    """Configure the root logger; ``client_level`` overrides the Kafka client's threshold."""
    handler = logging.StreamHandler()
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter("aiokafka"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(client_level or max(logging.WARNING, logging.getLevelName(level)))
