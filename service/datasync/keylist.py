"""``GET /v1/topics/{topic}/keys?prefix=P&limit=N&after=K&values=true``: a table's keys in order, paged.

The answer holds at most ``limit`` keys (default 100, at most 1000) greater
than ``after`` and starting with ``prefix``; ``next`` is present when more
follow and is the ``after`` of the next page. With ``values=true`` each item
carries its value, revision and partition. Pages come from the live table, so
a key written between two pages shows up in a later page if it sorts after
the cursor, else not; a deleted key simply stops appearing.
"""

from __future__ import annotations

from aiohttp import web

from datasync.api import KeyValue
from datasync.codecs import Codec
from datasync.engine import DataSync
from datasync.errors import DecodeError
from datasync.httpauth import read_refused
from datasync.settings import HttpSettings
from datasync.table import StateTable

PATH = "/v1/topics/{topic}/keys"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def add_key_listing(app: web.Application, engine: DataSync, settings: HttpSettings) -> None:
    async def list_keys(request: web.Request) -> web.Response:
        refused = read_refused(request, settings)
        if refused is not None:
            return refused
        query = request.query
        topic, prefix, after = request.match_info["topic"], query.get("prefix", ""), query.get("after")
        try:
            limit = int(query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
        values = query.get("values", "false").lower()
        if values not in ("true", "false", "1", "0"):
            return _error(400, "values must be true or false")
        found = readable_table(engine, topic)
        if isinstance(found, web.Response):
            return found
        table, codec = found
        keys = table.keys_under(prefix, after, limit + 1)
        body: dict[str, object] = {"topic": topic, "prefix": prefix}
        if values in ("true", "1"):
            items = [KeyValue(topic, key, table.data[key], codec) for key in keys[:limit]]
            try:
                decoded = [(kv, kv.value) for kv in items]
            except DecodeError as exc:
                return _error(503, f"a value cannot be decoded now: {exc}")
            if any(isinstance(value, bytes) for _, value in decoded):
                return _error(406, "the values are raw bytes; list keys only, or use `datasync dump`")
            body["items"] = [{"key": kv.key, "value": value, "revision": kv.revision, "partition": kv.partition}
                             for kv, value in decoded]  # fmt: skip
        else:
            body["keys"] = keys[:limit]
        if len(keys) > limit:
            body["next"] = keys[limit - 1]
        return web.json_response(body)

    app.router.add_get(PATH, list_keys)


def readable_table(engine: DataSync, topic: str) -> tuple[StateTable, Codec] | web.Response:
    """The table of ``topic`` and its codec, or the answer saying why it cannot be read now."""
    if not engine.running:
        return _error(503, "the engine is not running (starting, or stopped): no tables to read")
    if engine.rebuilding:
        return _error(503, "the tables are being rebuilt (full resync); try again shortly")
    if engine.handing_over(topic):
        return _error(503, f"partitions of {topic!r} are moving between instances (a rebalance); try again shortly")
    codec = engine.codec(topic)
    try:
        table = engine.table(topic)
    except KeyError:
        return _error(404, f"topic {topic!r} is not read into a table")
    assert codec is not None  # every table topic has one
    return table, codec


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
