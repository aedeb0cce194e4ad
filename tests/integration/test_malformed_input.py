"""Malformed input is a client error (bad_request / not_found, HTTP 4xx with a JSON body), never a
"backing service unavailable" or an HTTP 500; and a real dependency failure keeps the frame's `ref`."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from server.keys import CHAT
from tests.conftest import Server, seed_course, token

pytestmark = pytest.mark.integration

# 36 characters with four dashes whose other characters int(..., 16) accepts, but not UUIDs.
NOT_UUIDS = (
    "+0000000-0000-0000-0000-000000000000",
    " 0000000-0000-0000-0000-000000000000",
    "0_000000-0000-0000-0000-000000000000",
    "0x000000-0000-0000-0000-000000000000",
    "00000000000000000000000000000000----",
)
TEACHER = {"role": "teacher", "courses": ["alg-1"]}


async def _messages(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages"))


async def test_nul_in_frames_is_a_bad_request(server: Server, db: asyncpg.Connection) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    first = await server.connect()
    await first.send(type="hello", token=token(), course_id="alg\u00001")
    error = await first.expect("error")
    assert error["code"] == "bad_request" and "NUL" in error["message"], error
    await first.send(type="hello", token=token())  # the socket is still waiting for a good hello
    await first.expect("welcome")

    sock = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = sock.frames[0]["conversation_id"]
    frames: list[dict[str, Any]] = [
        {"type": "message", "id": "n1", "text": "two\u0000words"},
        {"type": "message", "id": "n\u00002", "text": "hi"},
        {"type": "history", "conversation_id": "a\u0000b"},
    ]
    for frame in frames:
        await sock.send(**frame)
        error = await sock.expect("error")
        assert error["code"] == "bad_request" and "NUL" in error["message"], (frame, error)
    teacher = await server.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    await teacher.send(type="intervene", conversation_id=conversation, text="psst\u0000", id="t1")
    error = await teacher.expect("error")
    assert error["code"] == "bad_request" and error["ref"] == "t1", error
    assert await _messages(db) == 0
    # A backslash and "u0000" typed as text are just text.
    await sock.send(type="message", id="ok", text="the escape \\u0000 in JSON")
    assert (await sock.expect("ack"))["text"] == "the escape \\u0000 in JSON"


async def test_ids_that_are_not_uuids_are_not_found(server: Server) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    student = await server.connect({"token": token()})
    teacher = await server.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    auth = {"Authorization": f"Bearer {token()}"}
    teacher_auth = {"Authorization": f"Bearer {token('teach-1', **TEACHER)}"}  # type: ignore[arg-type]
    for bad in NOT_UUIDS:
        await student.send(type="message", id="m", text="hi", conversation_id=bad)
        assert (await student.expect("error"))["code"] == "not_found", bad
        await student.send(type="history", conversation_id=bad)
        assert (await student.expect("error"))["code"] == "not_found", bad
        await teacher.send(type="ai", conversation_id=bad, paused=True)
        assert (await teacher.expect("error"))["code"] == "not_found", bad
        hello = await server.connect({"token": token(), "conversation_id": bad}, welcome=False)
        assert (await hello.expect("error"))["code"] == "not_found", bad
        for path, headers in ((f"/api/conversations/{bad}/messages", auth),
                              (f"/api/teacher/conversations/{bad}/messages", teacher_auth)):
            response = await server.client.get(path.replace(" ", "%20").replace("+", "%2B"), headers=headers)
            assert response.status == 404, (path, response.status)
            assert (await response.json())["error"]["code"] == "not_found"


async def test_http_bodies_that_cannot_be_decoded_are_bad_requests(server: Server) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    response = await server.client.post(
        "/api/session", data=b'{"token": ', headers={"Content-Type": "application/json"}
    )
    assert response.status == 400 and (await response.json())["error"]["code"] == "bad_request"

    admin = {"Authorization": f"Bearer {token('adm', role='admin')}"}
    cases: list[tuple[str, bytes, str]] = [
        ("/api/courses/alg-1/documents?name=notes", b"caf\xe9 \xff", "text/plain; charset=utf-8"),
        ("/api/courses/alg-1/documents?name=notes", b"hello", "text/plain; charset=no-such-charset"),
        ("/api/courses/alg-1/documents?name=notes", b"nul \x00 inside", "text/plain"),
        ("/api/courses/alg-1/documents?name=no%00tes", b"fine", "text/plain"),
        ("/api/courses/alg-1/documents", orjson.dumps({"name": "n", "body": "a\u0000b"}), "application/json"),
        ("/api/courses/alg%001/documents?name=notes", b"fine", "text/plain"),
    ]
    for path, body, content_type in cases:
        response = await server.client.post(path, data=body, headers={**admin, "Content-Type": content_type})
        assert response.status == 400, (path, body, response.status, await response.text())
        assert (await response.json())["error"]["code"] == "bad_request"
    for path in ("/api/courses/alg%001/documents", "/api/courses/alg%001/live"):
        response = await server.client.get(path, headers=admin)
        assert response.status == 400 and (await response.json())["error"]["code"] == "bad_request", path
    response = await server.client.get("/embed?tenant=school%00a")
    assert response.status == 200
    response = await server.client.get("/api/courses/alg-1/documents", headers=admin)
    assert (await response.json())["documents"] == []


async def test_a_dependency_failure_keeps_the_frames_ref(server: Server) -> None:
    sock = await server.connect({"token": token()})
    chat = server.client.app[CHAT]

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise OSError("connection refused")

    original = chat.db.save_question, chat.db.find_user_message
    chat.db.save_question = unavailable  # type: ignore[method-assign]
    chat.db.find_user_message = unavailable  # type: ignore[method-assign]
    try:
        await sock.send(type="message", id="keep-me", text="hello?")
        error = await sock.expect("error")
        assert error["code"] == "internal" and error["ref"] == "keep-me" and error["retry_after"] == 1.0
        assert isinstance(error["log_ref"], str) and error["log_ref"] != "keep-me"
        await sock.send(type="cancel", reply_id=77)
        error = await sock.expect("error")
        assert error["code"] == "internal" and error["ref"] == "77" and "log_ref" in error
    finally:
        chat.db.save_question, chat.db.find_user_message = original  # type: ignore[method-assign]
    await sock.send(type="message", id="keep-me", text="hello?")
    assert (await sock.expect("ack"))["id"] == "keep-me"
