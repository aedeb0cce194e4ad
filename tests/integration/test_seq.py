"""`seq` only grows within a conversation, also when Redis loses the conversation's counter and log, and
a resume the log cannot serve says so (`resumed: false`)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from server.keys import REDIS
from tests.conftest import Server, Socket, seed_course, token

pytestmark = pytest.mark.integration

TEACHER = {"role": "teacher", "courses": ["alg-1"]}


async def _forget(server: Server, conversation: str) -> None:
    """What a Redis restart, an eviction or the counter's expiry does to a conversation."""
    store = server.client.app[REDIS]
    keys = store.keys
    await store.client.delete(
        keys.conversation_seq(conversation), keys.conversation_log(conversation),
        keys.conversation_log_start(conversation),
    )


def _seqs(sock: Socket, conversation: str) -> list[int]:
    return [f["seq"] for f in sock.frames if f.get("conversation_id") == conversation and f["type"] != "welcome"]


async def _last_seq(db: asyncpg.Connection, conversation: str) -> int:
    return int(await db.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conversation))


async def test_seq_keeps_growing_after_redis_forgets_the_conversation(
    server: Server, db: asyncpg.Connection
) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    student = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = student.frames[0]["conversation_id"]
    teacher = await server.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]

    await student.send(type="message", id="a1", text="What is a slope?")
    done = (await student.until("done"))[-1]
    assert await _last_seq(db, conversation) == done["seq"]  # the done's seq, not the last token's
    await _forget(server, conversation)

    # The same socket sends again: its frames continue above everything it has seen.
    await student.send(type="message", id="a2", text="And an intercept?")
    await student.until("done")
    await _forget(server, conversation)
    await teacher.send(type="intervene", conversation_id=conversation, text="Nice work!", id="t1")
    note = await student.expect("teacher_message")
    await teacher.send(type="ai", conversation_id=conversation, paused=True)
    paused = await student.expect("ai_state")
    await teacher.send(type="ping")  # a socket's frames are handled in order: the pause is all done
    await teacher.expect("pong")
    assert await _last_seq(db, conversation) == paused["seq"]  # a teacher's frames are recorded too
    await _forget(server, conversation)
    await student.send(type="message", id="a3", text="Are you there?")
    ack = await student.expect("ack")
    await student.send(type="ping")
    await student.expect("pong")
    assert ack["reply_id"] is None and await _last_seq(db, conversation) == ack["seq"]
    seqs = _seqs(student, conversation)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert ack["seq"] > paused["seq"] > note["seq"] > done["seq"]

    # A resend of the teacher's message gets its seq back.
    await teacher.send(type="intervene", conversation_id=conversation, text="Nice work!", id="t1")
    again = await teacher.until("teacher_message")
    assert again[-1]["seq"] == note["seq"]

    # A new socket's welcome starts above every seq too.
    await _forget(server, conversation)
    late = await server.connect({"token": token(courses=["alg-1"]), "conversation_id": conversation})
    assert late.frames[0]["seq"] >= ack["seq"]


async def test_resume_beyond_what_the_log_knows_is_not_resumed(server: Server) -> None:
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    await sock.send(type="message", id="r1", text="hi")
    done = (await sock.until("done"))[-1]

    async def resumed(after: int) -> Any:
        again = await server.connect({"token": token(), "conversation_id": conversation, "resume_from": after})
        welcome = again.frames[0]
        assert len(welcome["history"]) == 2
        return welcome["resumed"]

    assert await resumed(done["seq"]) is True
    assert await resumed(1_000_000_000) is False  # a seq never numbered: frames may be missing
    await _forget(server, conversation)
    assert await resumed(done["seq"]) is False  # the log is gone: the welcome's history is the truth
    assert await resumed(0) is False
