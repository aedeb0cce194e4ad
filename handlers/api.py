"""The REST API: a user's own conversations and their messages."""

from __future__ import annotations

from aiohttp import web

from server.errors import bad_request
from server.keys import CHAT, DATABASE, SETTINGS
from server.protocol import HistoryRequest

from .common import no_nul, path_param, query_flag, query_int, require_claims


async def list_conversations(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    db = request.app[DATABASE]
    limit = query_int(request, "limit", 50, 1, 100) or 50
    course_id = request.query.get("course_id") or None
    no_course = query_flag(request, "no_course")
    if course_id is not None:
        if len(no_nul(course_id, "'course_id'")) > 200:
            raise bad_request("query parameter 'course_id' must be at most 200 characters")
        if no_course:
            raise bad_request("query parameters 'course_id' and 'no_course' exclude each other")
        claims.require_course(course_id)
    elif no_course:
        claims.require_no_course()
    user = await db.upsert_user(claims.tenant, claims.sub, claims.role, claims.name, claims.issued_at)
    conversations = await db.list_conversations(claims.tenant, user.id, limit, course_id, no_course=no_course)
    return web.json_response(
        {
            "conversations": [
                {
                    "id": c.id,
                    "course_id": c.course_id,
                    "title": c.title,
                    "created_at": c.created_at.isoformat(),
                    "updated_at": c.updated_at.isoformat(),
                }
                for c in conversations
            ]
        }
    )


async def list_messages(request: web.Request) -> web.Response:
    claims = await require_claims(request)
    db = request.app[DATABASE]
    limit_max = request.app[SETTINGS].history_page_max
    before = query_int(request, "before", None, 1, 2**62)
    limit = query_int(request, "limit", 20, 1, limit_max) or 20
    user = await db.upsert_user(claims.tenant, claims.sub, claims.role, claims.name, claims.issued_at)
    chat = request.app[CHAT]
    conversation = await chat.user_conversation(claims, user.id, request.match_info["conversation_id"])
    page = await chat.history_page(claims.tenant, conversation, HistoryRequest(None, before, limit))
    page.pop("type")
    return web.json_response(page)


async def live_course(request: web.Request) -> web.Response:
    """Students online in a course right now (teachers of the course, admins of the tenant)."""
    claims = await require_claims(request)
    snapshot = await request.app[CHAT].classroom.live_snapshot(claims, path_param(request, "course_id"))
    snapshot.pop("type")
    return web.json_response(snapshot)
