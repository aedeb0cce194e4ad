"""`regenerate` obeys what a message obeys: the teacher's pause, the rate limit and the token budgets; and
only a question's newest answer, once it has ended, can be regenerated (once)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from server.keys import REDIS
from tests.conftest import Serve, Socket, seed_course, token

pytestmark = pytest.mark.integration

STUDENT = {"courses": ["alg-1"]}
TEACHER = {"role": "teacher", "courses": ["alg-1"]}


async def _tokens_used(serve_db: asyncpg.Connection, store: object, user: str) -> int:
    user_id = await serve_db.fetchval("SELECT id::text FROM users WHERE external_id = $1", user)
    day = time.strftime("%Y%m%d", time.gmtime())
    _, used = await store.tokens_used("school-a", user_id, day)  # type: ignore[attr-defined]
    return int(used)


async def _stopped_answer(sock: Socket, client_id: str, text: str) -> dict[str, Any]:
    """Ask, then stop the answer at its first token; the ack."""
    await sock.send(type="message", id=client_id, text=text)
    ack = await sock.expect("ack")
    await sock.expect("token")
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    assert (await sock.until("done"))[-1]["status"] == "stopped"
    return ack


async def test_regenerate_respects_the_pause_and_is_charged(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=40)
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    student = await server.connect({"token": token(**STUDENT), "course_id": "alg-1"})  # type: ignore[arg-type]
    conversation = student.frames[0]["conversation_id"]
    teacher = await server.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]

    first = await _stopped_answer(student, "q1", "Explain fractions")

    await teacher.send(type="ai", conversation_id=conversation, paused=True)
    await student.expect("ai_state")
    await student.send(type="message", id="q2", text="And decimals?")
    assert (await student.expect("ack"))["reply_id"] is None

    # While paused, regenerating is refused and starts nothing.
    await student.send(type="regenerate", reply_id=first["reply_id"])
    error = await student.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == str(first["reply_id"]), error
    await student.send(type="ping")
    await student.expect("pong")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 1

    # On resume the waiting question (q2) is the one answered.
    await teacher.send(type="ai", conversation_id=conversation, paused=False)
    await student.expect("ai_state")
    frames = await student.until("done")
    q2_reply = frames[-1]["reply_id"]
    assert frames[-1]["status"] == "complete"
    assert await db.fetchval("SELECT client_id FROM messages WHERE id = (SELECT reply_to FROM messages"
                             " WHERE id = $1)", q2_reply) == "q2"

    # Now q1's stopped answer can be regenerated, once: the old reply is no longer the question's newest.
    await student.send(type="regenerate", reply_id=first["reply_id"])
    again = await student.expect("ack")
    assert again["regenerated"] is True and again["id"] == "q1" and again["reply_id"] > q2_reply
    await student.send(type="regenerate", reply_id=first["reply_id"])  # while the new one streams
    frames = await student.until("error")
    assert frames[-1]["code"] == "bad_request" and all(f["type"] == "token" for f in frames[:-1])
    frames += await student.until("done")
    assert frames[-1]["reply_id"] == again["reply_id"] and frames[-1]["status"] == "complete"
    await student.send(type="regenerate", reply_id=first["reply_id"])  # after it ended
    error = await student.expect("error")
    assert error["code"] == "bad_request" and error["ref"] == str(first["reply_id"])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1", first["message_id"]) == 2

    # Every answer's tokens are in the daily budget counter, the regenerated one's too.
    dones = [f for f in student.frames if f["type"] == "done"]
    assert len(dones) == 3
    used = await _tokens_used(db, server.client.app[REDIS], "stu-1")
    assert used == sum(d["usage"]["output_tokens"] for d in dones) > 0


async def test_regenerate_is_rate_limited_like_a_message(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=40, messages_per_minute=2)
    sock = await server.connect({"token": token()})
    ack = await _stopped_answer(sock, "r1", "Tell me about triangles")
    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    again = await sock.expect("ack")
    await sock.send(type="cancel", reply_id=again["reply_id"])
    await sock.until("done")
    await sock.send(type="regenerate", reply_id=again["reply_id"])
    error = await sock.expect("error")
    assert error["code"] == "rate_limited" and error["retry_after"] > 0 and error["ref"] == str(again["reply_id"])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 2


async def test_regenerate_is_refused_by_the_daily_budget(serve: Serve, db: asyncpg.Connection) -> None:
    # The user's budget holds one reservation (max_output_tokens) but not two at once.
    server = await serve(offline_tokens_per_s=40, max_output_tokens=1000, user_daily_tokens=1500)
    sock = await server.connect({"token": token()})
    ack = await _stopped_answer(sock, "b1", "Tell me about squares")
    store = server.client.app[REDIS]
    user_id = await db.fetchval("SELECT id::text FROM users WHERE external_id = 'stu-1'")
    day = time.strftime("%Y%m%d", time.gmtime())
    await store.client.incrby(store.keys.user_tokens("school-a", user_id, day), 1000)
    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    error = await sock.expect("error")
    assert error["code"] == "quota_exceeded" and error["ref"] == str(ack["reply_id"])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 1



async def test_regenerates_at_once_from_two_tabs_start_one_answer(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=200)
    tab1 = await server.connect({"token": token()})
    tab2 = await server.connect({"token": token(), "conversation_id": tab1.frames[0]["conversation_id"]})
    ack = await _stopped_answer(tab1, "t1", "Tell me about circles")
    await tab2.until("done")
    await asyncio.gather(*(t.send(type="regenerate", reply_id=ack["reply_id"]) for t in (tab1, tab2)))
    seen = []
    for tab in (tab1, tab2):
        seen += await tab.until("done")  # the one new answer
        await tab.send(type="ping")
        seen += await tab.until("pong")
    assert sum(f["type"] == "error" and f["code"] == "bad_request" for f in seen) == 1
    assert {f["reply_id"] for f in seen if f["type"] == "ack"} == {ack["reply_id"] + 1}
    assert await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1", ack["message_id"]) == 2


async def test_resume_answers_a_student_who_used_up_the_minute_s_messages(
    serve: Serve, db: asyncpg.Connection
) -> None:
    # The waiting question was counted against the rate limit when it was sent: resuming does not count it
    # again, so a student who wrote their minute's messages while paused still gets the answer.
    server = await serve(offline_tokens_per_s=0, messages_per_minute=2)
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    student = await server.connect({"token": token(**STUDENT), "course_id": "alg-1"})  # type: ignore[arg-type]
    conversation = student.frames[0]["conversation_id"]
    teacher = await server.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    await teacher.send(type="ai", conversation_id=conversation, paused=True)
    await student.expect("ai_state")
    for client_id in ("p1", "p2"):
        await student.send(type="message", id=client_id, text="Are you there?")
        assert (await student.expect("ack"))["reply_id"] is None
    await student.send(type="message", id="p3", text="Hello?")
    assert (await student.expect("error"))["code"] == "rate_limited"

    await teacher.send(type="ai", conversation_id=conversation, paused=False)
    await student.expect("ai_state")
    done = (await student.until("done"))[-1]
    assert done["status"] == "complete"
    assert await db.fetchval("SELECT client_id FROM messages WHERE id = (SELECT reply_to FROM messages"
                             " WHERE id = $1)", done["reply_id"]) == "p2"
    await teacher.send(type="ping")
    assert (await teacher.until("pong"))[-1]["type"] == "pong"
    assert not [f for f in teacher.frames if f["type"] == "error"]
