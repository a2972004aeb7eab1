"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, ``/v1/status`` and the key endpoints.

aiohttp serves it on the engine's event loop, so a loop that stops answering
makes ``/healthz`` time out, and a stuck engine makes it fail.

``GET /v1/topics/{topic}/keys/{key}`` reads the state table. ``PUT`` (a JSON
body, validated by the topic's codec) and ``DELETE`` (a tombstone) write to
Kafka; they are off unless enabled and then need the bearer token. Nothing
reaches Kafka unless the request is authorised and the value valid.
``POST /v1/plugins/{name}/resync`` (bearer token too) resyncs one plugin now.

``datasync run`` serves HTTP before it connects: until the engine runs,
``/healthz`` says "starting" (200) and ``/readyz`` says what it waits for (503).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from datasync.confluent import prepare_decode, prepare_encode
from datasync.engine import DataSync
from datasync.errors import DecodeError, EncodeError
from datasync.httpauth import read_refused, refusal
from datasync.keylist import add_key_listing, readable_table
from datasync.publish import PublishError
from datasync.registry import BadSchema, RegistryError
from datasync.settings import HttpSettings
from datasync.startup import Startup
from datasync.status import PluginState

ENGINE: web.AppKey[DataSync] = web.AppKey("engine", DataSync)
SETTINGS: web.AppKey[HttpSettings] = web.AppKey("settings", HttpSettings)
STARTUP: web.AppKey[Startup] = web.AppKey("startup", Startup)


def build_app(engine: DataSync, settings: HttpSettings, startup: Startup | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[ENGINE] = engine
    app[SETTINGS] = settings
    app[STARTUP] = startup or Startup(starting=False)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    app.router.add_get(KEY_PATH, get_key)
    app.router.add_put(KEY_PATH, put_key)
    app.router.add_delete(KEY_PATH, delete_key)
    app.router.add_post("/v1/plugins/{name}/resync", resync_plugin)
    add_key_listing(app, engine, settings)
    return app


KEY_PATH = "/v1/topics/{topic}/keys/{key:.+}"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _unauthorised(request: web.Request) -> web.Response | None:
    """403 without a configured token, 401 unless the request carries it; None if authorised."""
    return refusal(request, request.app[SETTINGS])


async def get_key(request: web.Request) -> web.Response:
    engine, topic, key = request.app[ENGINE], request.match_info["topic"], request.match_info["key"]
    if (refused := read_refused(request, request.app[SETTINGS])) is not None:
        return refused
    found = readable_table(engine, topic)
    if isinstance(found, web.Response):
        return found
    table, codec = found
    entry = table.get(key)
    if entry is None:
        return _error(404, f"no key {key!r} in {topic!r}")
    try:
        await prepare_decode(codec, [entry.value], retry=False)  # a schema evicted since the read
        value = codec.decode(entry.value)
    except (DecodeError, RegistryError) as exc:  # the registry is away
        return _error(503, f"the value cannot be decoded now: {exc}")
    if isinstance(value, bytes):
        return _error(406, "the value is raw bytes; use `datasync dump`")
    body = {"topic": topic, "key": key, "value": value, "revision": entry.offset, "partition": entry.partition}
    return web.json_response(body)


async def put_key(request: web.Request) -> web.Response:
    return await _write(request, delete=False)


async def delete_key(request: web.Request) -> web.Response:
    return await _write(request, delete=True)


async def _write(request: web.Request, delete: bool) -> web.Response:
    engine, settings = request.app[ENGINE], request.app[SETTINGS]
    if not settings.writes_enabled:
        return _error(403, "writes are disabled (DATASYNC_HTTP__WRITES_ENABLED)")
    if (refused := _unauthorised(request)) is not None:
        return refused
    topic, key = request.match_info["topic"], request.match_info["key"]
    codec = engine.codec(topic)
    if codec is None:
        return _error(404, f"topic {topic!r} is not declared")
    raw: bytes | None = None
    if not delete:
        try:
            value = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {settings.max_body_bytes} bytes")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"body is not JSON: {exc}")
        try:
            await prepare_encode(codec, attempts=1)
        except RegistryError as exc:
            return _error(422 if isinstance(exc, BadSchema) else 503, f"schema registry: {exc}")
        try:
            raw = codec.encode(value)
        except EncodeError as exc:
            return web.json_response({"error": str(exc), "fields": exc.fields}, status=422)
    try:
        [delivery] = await engine.publishing.send_many("http", topic, [(key.encode(), raw)])
    except PublishError as exc:
        return _error(503, str(exc))
    body = {"topic": topic, "key": key, "partition": delivery.partition, "offset": delivery.offset}
    return web.json_response(body, status=200)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ENGINE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def resync_plugin(request: web.Request) -> web.Response:
    """An operator's request to resync one plugin now (for example after its dependency is back)."""
    if (refused := _unauthorised(request)) is not None:
        return refused
    name = request.match_info["name"]
    try:
        request.app[ENGINE].request_plugin_resync(name)
    except KeyError:
        return _error(404, f"no plugin named {name!r}")
    return web.json_response({"plugin": name, "resync": "requested"}, status=202)


async def healthz(request: web.Request) -> web.Response:
    engine, settings, startup = request.app[ENGINE], request.app[SETTINGS], request.app[STARTUP]
    if not engine.running:
        if startup.starting:  # alive, waiting for the broker: restarting would not help
            return web.json_response({"status": "starting", "reason": startup.waiting or "connecting"})
        return web.json_response({"status": "down", "reason": "engine task is not running"}, status=503)
    if (failed := _failed_too_long(engine)) is not None:
        return web.json_response({"status": "failed", "reason": failed}, status=503)
    stuck = time.monotonic() - engine.last_step
    if stuck > settings.wedged_after_s:
        return web.json_response({"status": "wedged", "reason": f"no engine progress for {stuck:.0f}s"}, status=503)
    return web.json_response({"status": "ok"})


def _failed_too_long(engine: DataSync) -> str | None:
    """Why a plugin failed for longer than ``unhealthy_after_failed_s`` (a restart may cure it), or None."""
    limit = engine.sync.unhealthy_after_failed_s
    if limit is None:
        return None
    now = time.time()
    for name, st in engine.status().items():
        if st.failed_since is not None and now - st.failed_since > limit:
            return f"plugin {name} failed for {now - st.failed_since:.0f}s: {st.last_error}"
    return None


async def readyz(request: web.Request) -> web.Response:
    engine, startup = request.app[ENGINE], request.app[STARTUP]
    if not engine.running and startup.starting:
        body = {"ready": False, "starting": startup.waiting or "connecting to the broker"}
        return web.json_response(body, status=503)
    waiting: dict[str, Any] = {
        name: {"state": st.state.value, "last_error": st.last_error}
        for name, st in engine.status().items()
        if st.state is not PluginState.READY
    }
    rebuilding = {
        name: t["resync_remaining"] for name, t in (await engine.topics_status()).items() if t["resync_remaining"]
    }
    ready = engine.running and engine.broker_connected and not waiting and not engine.rebuilding
    body = {
        "ready": ready,
        "broker": "connected" if engine.broker_connected else "unreachable",
        "plugins_not_ready": waiting,
        "topics_resyncing": rebuilding,
        "rebuilding": engine.rebuilding,
    }
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response(
        {
            "broker": "connected" if engine.broker_connected else "unreachable",
            "group": engine.group_status(),
            "plugins": {name: st.as_dict() for name, st in engine.status().items()},
            "topics": await engine.topics_status(),
        }
    )


class HttpServer:
    """Owns the aiohttp runner; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, engine: DataSync, settings: HttpSettings, startup: Startup | None = None) -> None:
        self._runner = web.AppRunner(build_app(engine, settings, startup), access_log=None)
        self._settings = settings
        self.port = settings.port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        try:
            await site.start()
        except BaseException:  # e.g. the port is taken: leave nothing behind
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()
