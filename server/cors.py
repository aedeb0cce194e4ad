"""CORS for the schools' own origins (tenants.allowed_origins), which can change at run time.

aiohttp-cors serves the origins configured in SMARTEDU_ALLOWED_ORIGINS; its configuration is fixed at
start. This middleware adds the origins schools list in the database (cached for a minute), for the
REST API only and without credentials (Bearer tokens, not the cookie session); so does `*` in
SMARTEDU_ALLOWED_ORIGINS, for any origin. CORS only decides which pages may read responses: the token
still decides what data a request may see.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .keys import DATABASE, SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CACHE_S = 60.0
_ALLOW_HEADERS = "Authorization, Content-Type, X-CSRF-Token, X-Request-ID"


class TenantOrigins:
    """A small time-bounded cache of origin -> allowed by some tenant."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[bool, float]] = {}

    async def allowed(self, request: web.Request, origin: str) -> bool:
        now = time.monotonic()
        cached = self._known.get(origin)
        if cached is not None and cached[1] > now:
            return cached[0]
        verdict = await request.app[DATABASE].origin_is_allowed(origin)
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[origin] = (verdict, now + _CACHE_S)
        return verdict


def tenant_cors_middleware(origins: TenantOrigins) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        configured = request.app[SETTINGS].allowed_origins
        if (
            origin is None
            or not request.path.startswith("/api/")
            or origin in configured
            or ("*" not in configured and not await origins.allowed(request, origin))
        ):
            return await handler(request)
        # No Access-Control-Allow-Credentials: any one school can list any origin, and a credentialed
        # grant would let that origin's pages call the API with the cookie session of every school's
        # users (when it is same-site with this server). Tenant pages send the token as Bearer. The same
        # goes for `*` in SMARTEDU_ALLOWED_ORIGINS: any origin, but never with the cookie.
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": "X-Request-ID",
            "Vary": "Origin",
        }
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers.update({
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
            })
            return web.Response(status=200, headers=headers)
        response = await handler(request)
        response.headers.update(headers)
        return response

    return middleware
