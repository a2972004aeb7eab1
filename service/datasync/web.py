"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, ``/v1/status``.

aiohttp serves it on the engine's event loop, so a loop that stops answering
makes ``/healthz`` time out, and a stuck engine makes it fail.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from datasync.engine import DataSync
from datasync.settings import HttpSettings
from datasync.status import PluginState

ENGINE: web.AppKey[DataSync] = web.AppKey("engine", DataSync)
SETTINGS: web.AppKey[HttpSettings] = web.AppKey("settings", HttpSettings)


def build_app(engine: DataSync, settings: HttpSettings) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[ENGINE] = engine
    app[SETTINGS] = settings
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    return app


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ENGINE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    engine, settings = request.app[ENGINE], request.app[SETTINGS]
    if not engine.running:
        return web.json_response({"status": "down", "reason": "engine task is not running"}, status=503)
    stuck = time.monotonic() - engine.last_step
    if stuck > settings.wedged_after_s:
        return web.json_response({"status": "wedged", "reason": f"no engine progress for {stuck:.0f}s"}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    waiting: dict[str, Any] = {
        name: {"state": st.state.value, "last_error": st.last_error}
        for name, st in engine.status().items()
        if st.state is not PluginState.READY
    }
    rebuilding = {
        name: t["resync_remaining"] for name, t in (await engine.topics_status()).items() if t["resync_remaining"]
    }
    ready = engine.running and engine.broker_connected and not waiting and not rebuilding
    body = {
        "ready": ready,
        "broker": "connected" if engine.broker_connected else "unreachable",
        "plugins_not_ready": waiting,
        "topics_resyncing": rebuilding,
    }
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response(
        {
            "broker": "connected" if engine.broker_connected else "unreachable",
            "plugins": {name: st.as_dict() for name, st in engine.status().items()},
            "topics": await engine.topics_status(),
        }
    )


class HttpServer:
    """Owns the aiohttp runner; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, engine: DataSync, settings: HttpSettings) -> None:
        self._runner = web.AppRunner(build_app(engine, settings), access_log=None)
        self._settings = settings
        self.port = settings.port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()
