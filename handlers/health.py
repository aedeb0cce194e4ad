"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.keys import DATABASE, REDIS, SETTINGS, STATE


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "replica": request.app[SETTINGS].replica_id})


async def ready(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    checks: dict[str, str] = {}
    for name, ping in (("postgres", request.app[DATABASE].ping), ("redis", request.app[REDIS].ping)):
        try:
            async with asyncio.timeout(2.0):
                await ping()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ok else "unavailable", **checks}, status=200 if ok else 503)
