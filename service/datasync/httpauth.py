"""Bearer-token checks of the HTTP API; a 401 says how to authenticate (``WWW-Authenticate``)."""

from __future__ import annotations

import hmac

from aiohttp import web

from datasync.settings import HttpSettings

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="datasync"'}


def refusal(request: web.Request, settings: HttpSettings) -> web.Response | None:
    """403 without a configured token, 401 unless the request carries it; None if authorised."""
    if settings.token is None:
        return web.json_response({"error": "no DATASYNC_HTTP__TOKEN configured"}, status=403)
    expected = f"Bearer {settings.token.get_secret_value()}".encode()
    if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
        return web.json_response({"error": "missing or wrong bearer token"}, status=401, headers=CHALLENGE)
    return None


def read_refused(request: web.Request, settings: HttpSettings) -> web.Response | None:
    """The refusal of a read when reads need the token (``reads_need_token``); else None."""
    return refusal(request, settings) if settings.reads_need_token else None
