"""HTML pages served from static/."""

from __future__ import annotations

from aiohttp import web

from server.keys import SETTINGS

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


async def chat_page(request: web.Request) -> web.FileResponse:
    response = web.FileResponse(request.app[SETTINGS].static_dir / "chat.html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-cache"
    return response
