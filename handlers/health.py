"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.keys import DATABASE, REDIS, SETTINGS, STATE

# How long /ready waits for PostgreSQL and Redis, asked at the same time: the whole probe answers within
# this, below the readiness probe's timeoutSeconds (deploy/k8s/deployment.yaml).
READY_TIMEOUT_S = 2.0


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "replica": request.app[SETTINGS].replica_id})


async def ready(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    postgres, redis = await asyncio.gather(_check(request.app[DATABASE].ping), _check(request.app[REDIS].ping))
    ok = postgres == redis == "ok"
    body = {"status": "ready" if ok else "unavailable", "postgres": postgres, "redis": redis}
    return web.json_response(body, status=200 if ok else 503)


async def _check(ping: Callable[[], Awaitable[None]]) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await ping()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"
