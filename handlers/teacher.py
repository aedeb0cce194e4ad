"""Read-only views for the teacher dashboard: the teacher's courses and a watched conversation's transcript."""

from __future__ import annotations

from aiohttp import web

from server.errors import forbidden
from server.keys import CHAT, DATABASE, SETTINGS
from server.protocol import HistoryRequest

from .common import query_int, require_claims


async def teacher_courses(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    if claims.role == "student":
        raise forbidden("only teachers and admins")
    courses = await request.app[DATABASE].list_courses(claims.tenant)
    if claims.role == "teacher":
        allowed = set(claims.courses or ())
        courses = [c for c in courses if c.id in allowed]
    return web.json_response({"courses": [{"id": c.id, "title": c.title} for c in courses]})


async def teacher_messages(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    chat = request.app[CHAT]
    conversation = await chat.classroom.teacher_conversation(claims, request.match_info["conversation_id"])
    before = query_int(request, "before", None, 1, 2**62)
    limit = query_int(request, "limit", 20, 1, request.app[SETTINGS].history_page_max) or 20
    page = await chat.history_page(claims.tenant, conversation, HistoryRequest(None, before, limit))
    page.pop("type")
    page["ai_paused"] = conversation.ai_paused
    return web.json_response(page)
