"""Tokens may not live longer than SMARTEDU_MAX_TOKEN_LIFETIME_S, whoever signed them."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from tests.conftest import TEST_SECRET, Serve, token

pytestmark = pytest.mark.integration


def _signed(**claims: Any) -> str:
    payload = {"sub": "stu-1", "tid": "school-a", "role": "student", **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, TEST_SECRET, algorithm="HS256")


async def _refused_everywhere(serve: Serve, bad: str, **overrides: Any) -> str:
    """The token is `unauthorized` over HTTP, for a cookie session and on the socket; returns the message."""
    server = await serve(**overrides)
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {bad}"})
    assert response.status == 401, await response.text()
    message = str((await response.json())["error"]["message"])
    response = await server.client.post("/api/session", json={"token": bad})
    assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
    sock = await server.connect({"token": bad}, welcome=False)
    error = await sock.expect("error")
    assert error["code"] == "unauthorized" and error["message"] == message
    assert await sock.close_code() == 4401
    return message


async def test_a_token_valid_for_a_year_is_refused_naming_the_limit(serve: Serve) -> None:
    now = int(time.time())
    message = await _refused_everywhere(serve, _signed(iat=now, exp=now + 365 * 86400))
    assert "SMARTEDU_MAX_TOKEN_LIFETIME_S (86400 s)" in message and "exp - iat" in message


async def test_without_iat_the_lifetime_counts_from_now(serve: Serve) -> None:
    message = await _refused_everywhere(
        serve, _signed(exp=int(time.time()) + 7200), max_token_lifetime_s=3600
    )
    assert "exp - now" in message and "SMARTEDU_MAX_TOKEN_LIFETIME_S (3600 s)" in message


async def test_an_old_iat_counts_even_when_exp_is_near(serve: Serve) -> None:
    # Issued two days ago with a two-day lifetime: what it was minted as is what counts.
    now = int(time.time())
    await _refused_everywhere(serve, _signed(iat=now - 2 * 86400, exp=now + 60))


async def test_a_token_without_exp_is_refused_naming_the_limit(serve: Serve) -> None:
    message = await _refused_everywhere(serve, _signed(iat=int(time.time())))
    assert "no expiry (exp)" in message and "SMARTEDU_MAX_TOKEN_LIFETIME_S" in message


async def test_tokens_within_the_cap_are_accepted(serve: Serve) -> None:
    server = await serve(max_token_lifetime_s=3600)
    for good in (token(ttl_s=3600), _signed(exp=int(time.time()) + 3000)):
        response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {good}"})
        assert response.status == 200, await response.text()
        sock = await server.connect({"token": good})
        assert sock.frames[0]["type"] == "welcome"
        await sock.close()
