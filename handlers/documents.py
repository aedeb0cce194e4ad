"""Course documents for grounding: teachers of the course and admins of the tenant add, list, read, replace
and delete them."""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from server.errors import ChatError, ErrorCode, bad_request, not_found
from server.keys import CHAT
from storage.documents import Document

from .common import json_body, no_nul, path_param, query_flag, require_claims

MAX_DOCUMENT_CHARS = 200_000
_DOCUMENT_ID = re.compile(r"[1-9][0-9]{0,18}")
_MAX_ID = 2**63 - 1  # bigint


async def _document_from(request: web.Request) -> tuple[str, str]:
    """A whole document (POST): both a name and a body."""
    name, body = await _fields_from(request)
    if name is None:
        raise bad_request("'name' must be a non-empty string of at most 200 characters")
    if body is None:
        raise bad_request("'body' must be non-empty text")
    return name, body


async def _fields_from(request: web.Request) -> tuple[str | None, str | None]:
    """The name and body a request gives, each checked; None for one it leaves out."""
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
    if name is not None:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise bad_request("'name' must be a non-empty string of at most 200 characters")
        # A name goes into the tutor's instructions: a line break there could start what reads as a new one.
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in no_nul(name, "'name'")):
            raise bad_request("'name' must be one line of text, without line breaks or other control characters")
        name = name.strip()
    if body is not None:
        if not isinstance(body, str) or not body.strip():
            raise bad_request("'body' must be non-empty text")
        if len(body) > MAX_DOCUMENT_CHARS:
            raise ChatError(ErrorCode.TOO_LARGE, f"documents are limited to {MAX_DOCUMENT_CHARS} characters")
        body = no_nul(body, "'body'")
    return name, body


def _query_name(request: web.Request) -> str | None:
    """`?name=` decoded strictly: invalid UTF-8 is refused rather than stored as U+FFFD."""
    try:
        pairs = parse_qsl(request.rel_url.raw_query_string, errors="strict")
    except UnicodeDecodeError:
        raise bad_request("query parameter 'name' is not valid UTF-8") from None
    return next((value for key, value in pairs if key == "name"), None)


async def _course(request: web.Request) -> tuple[str, str]:
    """The caller's tenant and the course's id, if the caller may manage its documents (teachers of the
    course, admins of the tenant)."""
    claims = await require_claims(request)
    course = await request.app[CHAT].classroom.visible_course(claims, path_param(request, "course_id"))
    return claims.tenant, course.id


def _document_id(request: web.Request) -> int:
    raw = request.match_info["document_id"]
    if not _DOCUMENT_ID.fullmatch(raw) or int(raw) > _MAX_ID:
        raise bad_request("a document id is a positive integer")
    return int(raw)


def _summary(document: Document) -> dict[str, Any]:
    return {"id": document.id, "course_id": document.course_id, "name": document.name, "chars": document.chars,
            "passages": document.passages}


async def add_document(request: web.Request) -> web.Response:
    tenant, course_id = await _course(request)
    replace = query_flag(request, "replace")
    name, body = await _document_from(request)
    document, created = await request.app[CHAT].answers.documents.add(tenant, course_id, name, body, replace)
    return web.json_response(_summary(document), status=201 if created else 200)


async def list_documents(request: web.Request) -> web.Response:
    tenant, course_id = await _course(request)
    documents = await request.app[CHAT].answers.documents.list_documents(tenant, course_id)
    return web.json_response(
        {"documents": [{"id": d.id, "name": d.name, "chars": d.chars, "passages": d.passages} for d in documents]}
    )


async def get_document(request: web.Request) -> web.Response:
    tenant, course_id = await _course(request)
    found = await request.app[CHAT].answers.documents.get(tenant, course_id, _document_id(request))
    if found is None:
        raise not_found("document")
    return web.json_response({**_summary(found.document), "body": found.body})


async def replace_document(request: web.Request) -> web.Response:
    tenant, course_id = await _course(request)
    document_id = _document_id(request)
    name, body = await _fields_from(request)
    if name is None and body is None:
        raise bad_request("give a new 'name', a new 'body', or both")
    document = await request.app[CHAT].answers.documents.replace(tenant, course_id, document_id, name, body)
    return web.json_response(_summary(document))


async def delete_document(request: web.Request) -> web.Response:
    tenant, course_id = await _course(request)
    if not await request.app[CHAT].answers.documents.delete(tenant, course_id, _document_id(request)):
        raise not_found("document")
    return web.json_response({"status": "deleted"})
