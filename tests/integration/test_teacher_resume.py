"""Teachers resuming the AI at once start one answer for the waiting question, not one each."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from server.keys import DATABASE
from tests.conftest import Serve, seed_course, token

pytestmark = pytest.mark.integration


async def test_teachers_resuming_at_once_start_one_answer(serve: Serve, db: asyncpg.Connection) -> None:
    first = await serve(replica_id="replica-a")
    second = await serve(replica_id="replica-b")
    await seed_course(first.settings, "school-a", "alg-1", "Algebra I")
    student = await first.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = student.frames[0]["conversation_id"]
    teachers = [
        await server.connect({"token": token(f"teach-{i}", role="teacher", courses=["alg-1"])})
        for i, server in enumerate((first, second, first, second))
    ]
    for attempt in range(3):
        await teachers[0].send(type="ai", conversation_id=conversation, paused=True)
        await student.expect("ai_state")
        await student.send(type="message", id=f"w{attempt}", text="Is anyone there?")
        ack = await student.expect("ack")
        assert ack["reply_id"] is None
        await asyncio.gather(*(t.send(type="ai", conversation_id=conversation, paused=False) for t in teachers))
        for t in teachers:
            await t.send(type="ping")
            await t.until("pong")  # every resume has been handled
        reply_id = (await student.until("done"))[-1]["reply_id"]
        await student.send(type="ping")
        frames = await student.until("pong")
        assert not [f for f in frames if f.get("reply_id") not in (None, reply_id)], frames
        replies = await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1", ack["message_id"])
        assert replies == 1, (attempt, replies)


async def test_answers_started_again_at_once_are_made_once(serve: Serve, db: asyncpg.Connection) -> None:
    """The storage guards themselves, many callers at once: one placeholder each time."""
    server = await serve(offline_tokens_per_s=0)
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    await sock.send(type="message", id="s1", text="Hello")
    ack = await sock.expect("ack")
    await sock.until("done")
    await db.execute("UPDATE messages SET status = 'failed' WHERE id = $1", ack["reply_id"])
    store = server.client.app[DATABASE]
    made = await asyncio.gather(
        *(store.regenerate_reply("school-a", conversation, ack["message_id"], ack["reply_id"]) for _ in range(8))
    )
    assert sum(m is not None for m in made) == 1
    await db.execute("DELETE FROM messages WHERE reply_to = $1", ack["message_id"])
    made = await asyncio.gather(
        *(store.answer_waiting_question("school-a", conversation, ack["message_id"]) for _ in range(8))
    )
    assert sum(m is not None for m in made) == 1
