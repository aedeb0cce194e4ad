"""POST/GET/DELETE /api/session: a JWT exchanged for a cookie session, and logging out."""

from __future__ import annotations

import aiohttp_session
from aiohttp import web

from server.errors import unauthorized
from server.keys import CHAT, SETTINGS, VERIFIER
from server.websession import end_session, session_claims, start_session

from .common import bearer_token, json_body


async def create_session(request: web.Request) -> web.Response:
    token = bearer_token(request)
    if token is None and request.can_read_body and request.content_type == "application/json":
        body = await json_body(request)
        token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str):
        raise unauthorized("send the JWT as Authorization: Bearer or JSON {\"token\": ...}")
    claims = request.app[VERIFIER].verify(token)
    await request.app[CHAT].erasures.refuse(claims)
    return await start_session(request, claims, request.app[SETTINGS].session_ttl_s)


async def current_session(request: web.Request) -> web.Response:
    claims = await session_claims(request)
    if claims is None:
        raise unauthorized("no session")
    await request.app[CHAT].erasures.refuse(claims)
    session = await aiohttp_session.get_session(request)
    return web.json_response(
        {"user": {"id": claims.sub, "tenant": claims.tenant, "role": claims.role, "name": claims.name},
         "expires": claims.exp, "csrf_token": session.get("csrf")}
    )


async def delete_session(request: web.Request) -> web.Response:
    return await end_session(request)
