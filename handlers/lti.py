"""LTI 1.3 endpoints: `/lti/login` (OIDC third-party initiated login) and `/lti/launch` (the id_token post)."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.assets import read_page
from server.errors import ChatError, bad_request, from_storage
from server.keys import DATABASE, LTI_KEYS, SETTINGS
from server.logs import request_id
from server.lti import Launch, LtiService
from storage.errors import StorageError

from .common import no_nul

_PLACEHOLDER = 'data-lti-target="" data-lti-window="same"'
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


_Handler = Callable[[web.Request], Awaitable[web.Response]]

# An error page is plain text in the LMS's frame: no script, no form, nothing to click on.
_ERROR_CSP = "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'"
_ERROR_ADVICE = {
    503: "The tutor cannot confirm sign-ins from your course right now. Please try again in a minute; if this "
    "keeps happening, tell your teacher.",
    500: "Something went wrong on our side. Please try again in a minute.",
}
_DEFAULT_ADVICE = (
    "Your sign-in from the course could not be confirmed. Open the tutor again from your course; if this keeps "
    "happening, tell your teacher."
)


def _html_errors(handler: _Handler) -> _Handler:
    """A browser (the LMS's form post, often in an iframe) gets a short page saying what went wrong instead
    of the JSON error body; any other client keeps the JSON."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except (ChatError, StorageError) as caught:
            if "text/html" not in request.headers.get("Accept", ""):
                raise
            error = caught if isinstance(caught, ChatError) else from_storage(caught)
            return _error_page(request, error)

    return wrapped


def _error_page(request: web.Request, error: ChatError) -> web.Response:
    status = error.http_status
    advice = _ERROR_ADVICE.get(status, _DEFAULT_ADVICE)
    reference = request_id.get() or ""
    body = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n<meta name="referrer" content="no-referrer">\n'
        '<title>The tutor could not be opened</title>\n<link rel="stylesheet" href="/static/app.css">\n</head>\n'
        '<body>\n<main class="se-app" role="alert">\n<h1 class="se-empty">The tutor could not be opened</h1>\n'
        f'<p class="se-empty">{html.escape(advice)}</p>\n'
        f'<p class="se-empty"><small>Details: {html.escape(error.message)} ({html.escape(error.code.value)}'
        f"{', reference ' + html.escape(reference) if reference else ''})</small></p>\n</main>\n</body>\n</html>\n"
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Content-Security-Policy": _ERROR_CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
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


@_html_errors
async def login(request: web.Request) -> web.Response:
    """GET or POST from the platform: redirect the browser to the platform's authorization endpoint."""
    location = await _service(request).login(await _params(request), _base_url(request))
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


@_html_errors
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
    body = read_page(request.app[SETTINGS].static_dir, "lti-launch.html")
    if _PLACEHOLDER not in body:
        raise RuntimeError("static/lti-launch.html has lost its data-lti-target placeholder")
    window = "new" if result.new_window else "same"
    return body.replace(_PLACEHOLDER, f'data-lti-target="{html.escape(result.target)}" data-lti-window="{window}"')
