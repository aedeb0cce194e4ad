"""A token's `courses` claim holds on every path that names a conversation, not only at `hello`."""

from __future__ import annotations

import asyncpg
import pytest

from server.errors import CloseCode
from tests.conftest import Serve, seed_course, token

pytestmark = pytest.mark.integration


async def test_a_conversation_of_a_course_outside_the_token_is_forbidden(
    serve: Serve, db: asyncpg.Connection
) -> None:
    server = await serve(offline_tokens_per_s=40)
    for course in ("alg-1", "geo-1"):
        await seed_course(server.settings, "school-a", course, course)
    both = await server.connect({"token": token(courses=["alg-1", "geo-1"]), "course_id": "geo-1"})
    geometry = both.frames[0]["conversation_id"]
    await both.send(type="message", id="g1", text="What is a rhombus?")
    ack = await both.expect("ack")
    await both.expect("token")
    await both.send(type="cancel", reply_id=ack["reply_id"])
    assert (await both.until("done"))[-1]["status"] == "stopped"
    messages = await db.fetchval("SELECT count(*) FROM messages")

    # The same student with a token for algebra only (another LTI launch, say).
    algebra = token(courses=["alg-1"])
    sock = await server.connect({"token": algebra, "course_id": "alg-1"})
    await sock.send(type="message", id="sneak", text="hi", conversation_id=geometry)
    error = await sock.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == "sneak", error
    await sock.send(type="history", conversation_id=geometry)
    assert (await sock.expect("error"))["code"] == "forbidden"
    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    error = await sock.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == str(ack["reply_id"]), error
    await sock.send(type="ping")  # refused frames after hello leave the socket open
    assert (await sock.expect("pong"))["type"] == "pong"
    assert await db.fetchval("SELECT count(*) FROM messages") == messages

    response = await server.client.get(
        f"/api/conversations/{geometry}/messages", headers={"Authorization": f"Bearer {algebra}"}
    )
    assert response.status == 403 and (await response.json())["error"]["code"] == "forbidden"
    response = await server.client.get(
        f"/api/conversations/{geometry}/messages",
        headers={"Authorization": f"Bearer {token(courses=['alg-1', 'geo-1'])}"},
    )
    assert response.status == 200 and len((await response.json())["messages"]) == 2

    # As at hello, where it has always been refused (and closes the socket).
    refused = await server.connect({"token": algebra, "conversation_id": geometry}, welcome=False)
    assert (await refused.expect("error"))["code"] == "forbidden"
    assert await refused.close_code() == CloseCode.FORBIDDEN


async def test_a_student_limited_to_courses_cannot_chat_outside_them(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=0)
    for course in ("alg-1", "geo-1"):
        await seed_course(server.settings, "school-a", course, course)
    # A course-less conversation from a token without the claim (the school's own sign-in, say).
    free = await server.connect({"token": token()})
    loose = free.frames[0]["conversation_id"]
    assert free.frames[0]["course_id"] is None

    # One course in the token: a hello that names none opens that course, where its teachers see it.
    one = await server.connect({"token": token(courses=["alg-1"])})
    assert one.frames[0]["course_id"] == "alg-1" and one.frames[0]["conversation_id"] != loose
    # Several: the hello must say which (and the token's course-less conversation is not reachable).
    refused = await server.connect({"token": token(courses=["alg-1", "geo-1"])}, welcome=False)
    assert (await refused.expect("error"))["code"] == "forbidden"
    assert await refused.close_code() == CloseCode.FORBIDDEN
    await one.send(type="message", id="x1", text="hi", conversation_id=loose)
    assert (await one.expect("error"))["code"] == "forbidden"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_id = 'x1'") == 0

    # Teachers keep their course-less hello (the dashboard's socket names no course).
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1", "geo-1"])})
    assert teacher.frames[0]["type"] == "welcome"
