"""HTML pages served from static/, each with a strict Content-Security-Policy (no inline script)."""

from __future__ import annotations

import html

from aiohttp import web

from server.assets import read_page, static_cache_control
from server.keys import DATABASE, SETTINGS
from server.origins import framing_origins, socket_origin
from server.settings import Settings


def page_csp(settings: Settings, ancestors: str = "'none'") -> str:
    """The pages' CSP. They open a socket to their own origin only (`/ws`), which `'self'` covers in CSP 3
    browsers; the public URL's `wss:` origin is named as well for browsers where `'self'` never matched a
    WebSocket (Safari before 16), instead of letting a script connect to any host (`ws: wss:`)."""
    public = socket_origin(settings.public_url)
    connect = f"'self' {public}" if public else "'self'"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; base-uri 'none'; form-action 'self'; object-src 'none'; "
        f"frame-ancestors {ancestors}"
    )


def _page(request: web.Request, name: str) -> web.Response:
    settings = request.app[SETTINGS]
    return web.Response(
        text=read_page(settings.static_dir, name),
        content_type="text/html",
        headers={
            "Content-Security-Policy": page_csp(settings),
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )


async def chat_page(request: web.Request) -> web.Response:
    return _page(request, "chat.html")


async def teacher_page(request: web.Request) -> web.Response:
    return _page(request, "teacher.html")


async def embed_page(request: web.Request) -> web.Response:
    """The iframe page: only the tenant's allowed origins (and the configured ones) may frame it."""
    settings = request.app[SETTINGS]
    tenant_origins: tuple[str, ...] = ()
    tenant_id = request.query.get("tenant", "")
    if tenant_id and len(tenant_id) <= 100 and "\x00" not in tenant_id:
        tenant_origins = (await request.app[DATABASE].get_tenant(tenant_id)).allowed_origins
    origins = framing_origins(settings.allowed_origins, tenant_origins)
    ancestors = " ".join(origins) if origins else "'none'"
    body = read_page(settings.static_dir, "embed.html")
    if len(origins) == 1:
        # One possible parent: the page accepts postMessage tokens from that origin only.
        body = body.replace(
            '<meta name="smartedu-parent-origin" content="">',
            f'<meta name="smartedu-parent-origin" content="{html.escape(origins[0])}">',
        )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            "Content-Security-Policy": page_csp(settings, ancestors),
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )


async def static_file(request: web.Request) -> web.FileResponse:
    """A file under static/. A missing one is a `not_found` JSON error like any other path: aiohttp's
    static route answered it with an empty 404 of type application/octet-stream."""
    root = request.app[SETTINGS].static_dir.resolve()
    path = (root / request.match_info["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound(reason="no such file")
    return web.FileResponse(path, headers={"Cache-Control": static_cache_control(path, request.query.get("v"))})


async def protect_html(request: web.Request, response: web.StreamResponse) -> None:
    """Every other HTML response (static files included) refuses framing and inline script."""
    if response.content_type == "text/html" and "Content-Security-Policy" not in response.headers:
        response.headers["Content-Security-Policy"] = page_csp(request.app[SETTINGS])
