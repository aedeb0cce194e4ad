"""Course documents for grounding: teachers of the course and admins of the tenant add and list them."""

from __future__ import annotations

import unicodedata
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from server.errors import ChatError, ErrorCode, bad_request
from server.keys import CHAT

from .common import json_body, no_nul, path_param, require_claims

MAX_DOCUMENT_CHARS = 200_000


async def _document_from(request: web.Request) -> tuple[str, str]:
    if request.content_type == "application/json":
        data: Any = await json_body(request)
        if not isinstance(data, dict):
            raise bad_request("body must be a JSON object with 'name' and 'body'")
        name, body = data.get("name"), data.get("body")
    elif request.content_type in ("text/plain", "text/markdown"):
        name = _query_name(request)
        try:
            body = await request.text()
        except (UnicodeDecodeError, LookupError):
            raise bad_request("body is not text in its declared charset (UTF-8 when none is given)") from None
    else:
        raise bad_request("send application/json {name, body}, or text/plain or text/markdown with ?name=")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise bad_request("'name' must be a non-empty string of at most 200 characters")
    # A name goes into the tutor's instructions: a line break there could start what reads as a new one.
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in no_nul(name, "'name'")):
        raise bad_request("'name' must be one line of text, without line breaks or other control characters")
    if not isinstance(body, str) or not body.strip():
        raise bad_request("'body' must be non-empty text")
    if len(body) > MAX_DOCUMENT_CHARS:
        raise ChatError(ErrorCode.TOO_LARGE, f"documents are limited to {MAX_DOCUMENT_CHARS} characters")
    return no_nul(name, "'name'").strip(), no_nul(body, "'body'")


def _query_name(request: web.Request) -> str | None:
    """`?name=` decoded strictly: invalid UTF-8 is refused rather than stored as U+FFFD."""
    try:
        pairs = parse_qsl(request.rel_url.raw_query_string, errors="strict")
    except UnicodeDecodeError:
        raise bad_request("query parameter 'name' is not valid UTF-8") from None
    return next((value for key, value in pairs if key == "name"), None)


async def add_document(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    chat = request.app[CHAT]
    course = await chat.classroom.visible_course(claims, path_param(request, "course_id"))
    name, body = await _document_from(request)
    document = await chat.answers.documents.add(claims.tenant, course.id, name, body)
    return web.json_response(
        {"id": document.id, "course_id": course.id, "name": document.name, "chars": document.chars,
         "passages": document.passages},
        status=201,
    )


async def list_documents(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    chat = request.app[CHAT]
    course = await chat.classroom.visible_course(claims, path_param(request, "course_id"))
    documents = await chat.answers.documents.list_documents(claims.tenant, course.id)
    return web.json_response(
        {"documents": [{"id": d.id, "name": d.name, "chars": d.chars, "passages": d.passages} for d in documents]}
    )
