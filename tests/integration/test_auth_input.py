"""Hostile tokens and session requests get explicit 4xx errors, never `internal`."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from tests.conftest import TEST_SECRET, Serve

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
