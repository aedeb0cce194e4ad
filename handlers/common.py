"""Request helpers shared by the HTTP handlers."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from server.auth import Claims
from server.errors import bad_request, unauthorized
from server.keys import CHAT, VERIFIER
from server.websession import session_claims


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def require_claims(request: web.Request) -> Claims:
    """Verified claims from the `Authorization: Bearer` header or the session cookie (with CSRF), or 401; 403
    for those issued before their user was erased."""
    token = bearer_token(request)
    claims = request.app[VERIFIER].verify(token) if token is not None else await session_claims(request)
    if claims is None:
        raise unauthorized("an Authorization: Bearer token or a session is required")
    await request.app[CHAT].erasures.refuse(claims)
    return claims


def query_int(request: web.Request, name: str, default: int | None, minimum: int, maximum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"query parameter '{name}' must be an integer") from None
    if not minimum <= value <= maximum:
        raise bad_request(f"query parameter '{name}' must be between {minimum} and {maximum}")
    return value


def query_flag(request: web.Request, name: str) -> bool:
    """A `true`/`false` query parameter (absent or empty: false)."""
    raw = request.query.get(name, "")
    if raw not in ("", "true", "false"):
        raise bad_request(f"query parameter '{name}' must be true or false")
    return raw == "true"


def no_nul(value: str, what: str) -> str:
    """The value, unless it holds a NUL character (PostgreSQL cannot store one): a bad request."""
    if "\x00" in value:
        raise bad_request(f"{what} must not contain NUL (\\u0000)")
    return value


def path_param(request: web.Request, name: str) -> str:
    return no_nul(request.match_info[name], f"'{name}'")


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; anything else (invalid JSON or UTF-8) is a bad request."""
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise bad_request("body is not valid JSON") from None
