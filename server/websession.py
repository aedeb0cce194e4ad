"""First-party cookie sessions: a verified JWT exchanged for an encrypted HttpOnly cookie.

State-changing requests authenticated by the cookie need the double-submit CSRF token (the readable
`smartedu_csrf` cookie echoed in `X-CSRF-Token`). The WebSocket accepts the cookie only from an
allowed Origin.

Each session has an id. Logging out revokes it in PostgreSQL and Redis until the session would have expired,
so a copy of the cookie stops working too (one Redis round trip per request or socket upgrade that carries
the cookie; server/revocations.py), also after Redis lost its data, and closes that session's open sockets
on every replica (4401).
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import secrets
import time
import warnings
from typing import Any

import aiohttp_session
from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from .auth import Claims
from .errors import ChatError, ErrorCode, forbidden, unauthorized
from .keys import CHAT

SESSION_COOKIE = "smartedu_session"
CSRF_COOKIE = "smartedu_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_COOKIE_CHARS = 4096  # what browsers store of one cookie's name and value


def session_key(raw: str) -> bytes:
    """Validate a Fernet key (32 bytes, URL-safe base64), as SMARTEDU_SESSION_KEY must be."""
    try:
        decoded = base64.urlsafe_b64decode(raw.encode())
    except (ValueError, TypeError):
        decoded = b""
    if len(decoded) != 32:
        raise ValueError("SMARTEDU_SESSION_KEY must be 32 bytes in URL-safe base64 (a Fernet key)")
    return decoded


def new_session_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def setup_sessions(app: web.Application, key: str, ttl_s: int) -> None:
    # aiohttp-session keys requests with a plain string; aiohttp warns about it on every request.
    warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module="aiohttp_session")
    storage = EncryptedCookieStorage(
        session_key(key), cookie_name=SESSION_COOKIE, max_age=ttl_s, secure=True, httponly=True,
        samesite="Strict",
    )
    aiohttp_session.setup(app, storage)


def _claims_to_dict(claims: Claims, expires: int) -> dict[str, Any]:
    return {
        "sub": claims.sub, "tid": claims.tenant, "role": claims.role, "name": claims.name,
        "courses": list(claims.courses) if claims.courses is not None else None, "exp": expires,
        "sid": secrets.token_urlsafe(16),
        # The token's: a session made from a token issued before its user was erased is refused like the token.
        "iat": claims.issued_at,
    }


async def start_session(request: web.Request, claims: Claims, ttl_s: int) -> web.Response:
    """Store the claims in a new session cookie and issue a fresh CSRF token."""
    session = await aiohttp_session.new_session(request)
    expires = int(time.time()) + ttl_s
    csrf = secrets.token_urlsafe(24)
    data = {"claims": _claims_to_dict(claims, expires), "csrf": csrf}
    if _cookie_chars({"created": session.created, "session": data}) > MAX_COOKIE_CHARS:
        # Browsers drop a larger cookie without a word: the login would succeed and the session not exist.
        raise ChatError(
            ErrorCode.TOO_LARGE,
            "the token's claims (its courses) are too large for a session cookie; send the token as "
            "Authorization: Bearer instead",
        )
    session.update(data)
    response = web.json_response(
        {"user": {"id": claims.sub, "tenant": claims.tenant, "role": claims.role, "name": claims.name},
         "expires": expires, "csrf_token": csrf}
    )
    response.set_cookie(CSRF_COOKIE, csrf, max_age=ttl_s, secure=True, httponly=False, samesite="Strict", path="/")
    return response


async def end_session(request: web.Request) -> web.Response:
    session = await aiohttp_session.get_session(request)
    if "claims" not in session:
        raise unauthorized("no session")
    check_csrf(request, session.get("csrf"))
    data = session["claims"]
    if isinstance(data, dict) and isinstance(data.get("sid"), str):
        remaining = int(data.get("exp", 0)) - int(time.time())
        await request.app[CHAT].log_out(str(data.get("tid")), data["sid"], remaining)
    session.invalidate()
    response = web.json_response({"status": "logged out"})
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


def _cookie_chars(stored: dict[str, Any]) -> int:
    """Length of `name=value` of the session cookie EncryptedCookieStorage makes of `stored`."""
    plain = len(json.dumps(stored).encode())
    fernet = 57 + 16 * (plain // 16 + 1)  # version, time stamp, IV and HMAC around the padded ciphertext
    return len(SESSION_COOKIE) + 1 + 4 * math.ceil(fernet / 3)


def check_csrf(request: web.Request, expected: object) -> None:
    """Double submit: the header must equal both the readable cookie and the session's token."""
    header = _raw(request.headers.get(CSRF_HEADER, ""))
    cookie = _raw(request.cookies.get(CSRF_COOKIE, ""))
    if not isinstance(expected, str) or not header or not (
        hmac.compare_digest(header, _raw(expected)) and hmac.compare_digest(cookie, _raw(expected))
    ):
        raise forbidden("a valid X-CSRF-Token header is required")


def _raw(text: str) -> bytes:
    # compare_digest refuses str with non-ASCII characters (TypeError, a 500); bytes compare anything.
    return text.encode("utf-8", "surrogateescape")


async def session_claims(request: web.Request) -> Claims | None:
    """Claims from the session cookie, or None (no cookie, expired, or sessions not configured)."""
    if SESSION_COOKIE not in request.cookies:
        return None
    session = await aiohttp_session.get_session(request)
    data = session.get("claims")
    if not isinstance(data, dict) or int(data.get("exp", 0)) < time.time():
        return None
    # A session without an id was made by an earlier version, before sessions had one (or by a replica of it
    # during a rolling upgrade): it is taken until it expires, at most SMARTEDU_SESSION_TTL_S after it was
    # made, but logging out cannot revoke a copy of it.
    session_id = data.get("sid")
    if not isinstance(session_id, str):
        session_id = None
    elif await request.app[CHAT].revocations.revoked(str(data.get("tid")), session_id):
        return None
    if request.method not in SAFE_METHODS:
        check_csrf(request, session.get("csrf"))
    courses = data.get("courses")
    issued = data.get("iat")  # when its token was issued (None: the token did not say, or an earlier version)
    return Claims(
        sub=str(data["sub"]), tenant=str(data["tid"]), role=str(data["role"]), exp=int(data["exp"]),
        name=str(data.get("name") or ""), courses=tuple(courses) if isinstance(courses, list) else None,
        session_id=session_id, issued_at=float(issued) if isinstance(issued, int | float) else None,
    )


