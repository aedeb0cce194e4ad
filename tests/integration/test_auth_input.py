"""Hostile tokens and session requests get explicit 4xx errors, never `internal`."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse

from server.websession import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from tests.conftest import TEST_SECRET, Serve, token

pytestmark = pytest.mark.integration


def _signed(**claims: Any) -> str:
    payload = {"sub": "stu-1", "tid": "school-a", "role": "student", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, TEST_SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [{"sub": "stu\x00"}, {"tid": "school\x00"}, {"name": "Ada\x00"}, {"sub": "\ud800"}, {"name": "\udfff"},
     {"courses": ["alg\x00"]}],
    ids=["nul-sub", "nul-tid", "nul-name", "surrogate-sub", "surrogate-name", "nul-course"],
)
async def test_claims_postgres_cannot_store_are_refused(serve: Serve, claims: dict[str, Any]) -> None:
    server = await serve()
    bad = _signed(**claims)
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {bad}"})
    assert response.status == 401, await response.text()
    assert (await response.json())["error"]["code"] == "unauthorized"
    response = await server.client.post("/api/session", json={"token": bad})
    assert response.status == 401
    sock = await server.connect({"token": bad}, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"
    assert await sock.close_code() == 4401


async def test_non_ascii_csrf_header_is_forbidden_not_internal(serve: Serve) -> None:
    server = await serve()
    response = await server.client.post("/api/session", json={"token": token()})
    csrf = (await response.json())["csrf_token"]
    jar = f"{SESSION_COOKIE}={response.cookies[SESSION_COOKIE].value}; {CSRF_COOKIE}={csrf}"
    server.client.session.cookie_jar.clear()
    for header in ("\u00e9t\u00e9", "\u2603" * 30):
        response = await server.client.delete("/api/session", headers={"Cookie": jar, CSRF_HEADER: header})
        assert response.status == 403, await response.text()
        assert (await response.json())["error"]["code"] == "forbidden"
    response = await server.client.delete("/api/session", headers={"Cookie": jar, CSRF_HEADER: csrf})
    assert response.status == 200


async def test_oversized_token_says_so(serve: Serve) -> None:
    server = await serve()
    huge = _signed(name="A" * 9000)
    sock = await server.connect({"token": huge}, welcome=False)
    error = await sock.expect("error")
    assert error["code"] == "unauthorized" and "longer than 8192" in error["message"], error
    assert await sock.close_code() == 4401


async def test_logout_without_a_session_is_unauthorized(serve: Serve) -> None:
    server = await serve()
    garbage = {"Cookie": f"{SESSION_COOKIE}=not-a-session"}
    for headers in ({}, garbage, {CSRF_HEADER: "x", "Cookie": f"{CSRF_COOKIE}=x"}):
        response = await server.client.delete("/api/session", headers=headers)
        assert response.status == 401, await response.text()
        assert (await response.json())["error"] == {"code": "unauthorized", "message": "no session"}


async def test_session_cookie_too_large_for_browsers_is_refused(serve: Serve) -> None:
    server = await serve()

    async def login(courses: int) -> ClientResponse:
        many = token("t1", role="teacher", courses=[f"course-{i:012d}" for i in range(courses)])
        return await server.client.post("/api/session", json={"token": many})

    fits = await login(110)
    assert fits.status == 200
    morsel = fits.cookies[SESSION_COOKIE]
    assert len(f"{morsel.key}={morsel.value}") <= 4096
    # Before, this one got 200 and a 5 KB cookie that browsers drop: the session silently did not exist.
    response = await login(150)
    assert response.status == 413, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "too_large" and "Authorization: Bearer" in error["message"]
    assert SESSION_COOKIE not in response.cookies
