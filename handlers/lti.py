"""LTI 1.3 endpoints: `/lti/login` (OIDC third-party initiated login) and `/lti/launch` (the id_token post)."""

from __future__ import annotations

import html

from aiohttp import web

from server.errors import bad_request
from server.keys import DATABASE, LTI_KEYS, SETTINGS
from server.lti import Launch, LtiService

from .common import no_nul

_PLACEHOLDER = 'data-lti-target="" data-lti-window="same"'
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none';"
    " form-action 'none'"
)


def _service(request: web.Request) -> LtiService:
    return LtiService(request.app[SETTINGS], request.app[DATABASE], request.app[LTI_KEYS])


def _base_url(request: web.Request) -> str:
    # The platform must know redirect_uri exactly; behind a proxy, SMARTEDU_PUBLIC_URL says what it is.
    return request.app[SETTINGS].public_url or f"{request.scheme}://{request.host}"


async def _params(request: web.Request) -> dict[str, str]:
    try:
        source = await request.post() if request.method == "POST" else request.query
    except ValueError:  # not UTF-8, or a broken multipart body
        raise bad_request("the form could not be read") from None
    return {name: no_nul(value, f"'{name}'") for name, value in source.items() if isinstance(value, str)}


async def login(request: web.Request) -> web.Response:
    """GET or POST from the platform: redirect the browser to the platform's authorization endpoint."""
    location = await _service(request).login(await _params(request), _base_url(request))
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


async def launch(request: web.Request) -> web.Response:
    """The platform's form post: once verified, a page that sends the browser on with our token."""
    result = await _service(request).launch(await _params(request))
    ancestors = " ".join(result.frame_ancestors) or "'none'"
    return web.Response(
        text=_launch_page(request, result),
        content_type="text/html",
        headers={
            "Content-Security-Policy": f"{_CSP}; frame-ancestors {ancestors}",
            "Cache-Control": "no-store",  # the page carries a token
            "Referrer-Policy": "no-referrer",
        },
    )


def _launch_page(request: web.Request, result: Launch) -> str:
    body = (request.app[SETTINGS].static_dir / "lti-launch.html").read_text(encoding="utf-8")
    if _PLACEHOLDER not in body:
        raise RuntimeError("static/lti-launch.html has lost its data-lti-target placeholder")
    window = "new" if result.new_window else "same"
    return body.replace(_PLACEHOLDER, f'data-lti-target="{html.escape(result.target)}" data-lti-window="{window}"')
