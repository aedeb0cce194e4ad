"""The turn over the socket: commit, ack, streamed tokens, commit, done — against real PostgreSQL/Redis."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson
import pytest

from server.logs import JsonFormatter
from tests.conftest import Serve, Server, answer_text, seed_course, token

pytestmark = pytest.mark.integration


async def test_full_turn_commits_before_ack_and_done(server: Server, db: asyncpg.Connection) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I", "Linear equations and graphs.")
    sock = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    welcome = sock.frames[0]
    assert welcome["history"] == [] and welcome["seq"] == 0
    assert welcome["user"]["tenant"] == "school-a" and welcome["user"]["role"] == "student"
    assert welcome["course_id"] == "alg-1"

    await sock.send(type="message", id="q1", text="How do I solve 2x + 3 = 7?")
    ack = await sock.expect("ack")
    # The ack is only sent after the commit: the row is already there.
    row = await db.fetchrow("SELECT role, text, status, client_id FROM messages WHERE id = $1", ack["message_id"])
    assert row is not None and dict(row) == {
        "role": "user", "text": "How do I solve 2x + 3 = 7?", "status": "complete", "client_id": "q1"
    }
    frames = await sock.until("done")
    done = frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens, frames
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > ack["seq"]
    text = answer_text(frames, ack["reply_id"])
    assert "Algebra I" in text and "2x + 3 = 7" in text
    assert done["status"] == "complete" and done["length"] == len(text) and done["reply_id"] == ack["reply_id"]
    assert done["usage"]["output_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0

    reply = await db.fetchrow("SELECT text, status, reply_to FROM messages WHERE id = $1", ack["reply_id"])
    assert reply is not None
    assert (reply["text"], reply["status"], reply["reply_to"]) == (text, "complete", ack["message_id"])
    assert await db.fetchval("SELECT seq FROM messages WHERE id = $1", ack["message_id"]) == ack["seq"]
    usage = await db.fetchrow("SELECT * FROM ai_usage WHERE message_id = $1", ack["reply_id"])
    assert usage is not None and usage["provider"] == "offline" and usage["tenant_id"] == "school-a"
    assert usage["output_tokens"] == done["usage"]["output_tokens"] and usage["status"] == "complete"
    assert usage["duration_ms"] >= 0 and usage["ttft_ms"] is not None


async def test_first_hello_of_a_new_school_creates_it_and_later_hellos_refresh_the_user(
    server: Server, db: asyncpg.Connection
) -> None:
    # The tenant and the user are written by one statement: the user's foreign key must see the new tenant.
    first = await server.connect({"token": token("t-1", tenant="school-new", role="teacher", name="Ms Ada")})
    user = first.frames[0]["user"]
    assert (user["tenant"], user["role"], user["name"]) == ("school-new", "teacher", "Ms Ada")
    assert await db.fetchval("SELECT count(*) FROM tenants WHERE id = 'school-new'") == 1

    again = await server.connect({"token": token("t-1", tenant="school-new", role="admin", name="Dr Ada")})
    refreshed = again.frames[0]["user"]
    assert refreshed["id"] == user["id"] and (refreshed["role"], refreshed["name"]) == ("admin", "Dr Ada")
    rows = await db.fetch("SELECT role, display_name FROM users WHERE tenant_id = 'school-new'")
    assert [tuple(r) for r in rows] == [("admin", "Dr Ada")]


async def test_welcome_after_reconnect_has_last_ten_turns_oldest_first(server: Server, db: asyncpg.Connection) -> None:
    sock = await server.connect({"token": token()})
    for i in range(12):
        await sock.send(type="message", id=f"m{i}", text=f"question {i}")
        await sock.until("done")
    await sock.close()

    again = await server.connect({"token": token()})
    welcome = again.frames[0]
    assert welcome["conversation_id"] == sock.frames[0]["conversation_id"]
    history = welcome["history"]
    assert len(history) == 20
    assert [m["role"] for m in history] == ["user", "assistant"] * 10
    assert [m["text"] for m in history[::2]] == [f"question {i}" for i in range(2, 12)]
    assert all(m["status"] == "complete" for m in history)
    ids = [m["id"] for m in history]
    assert ids == sorted(ids)
    assert welcome["seq"] >= max(f.get("seq", 0) for f in sock.frames)


async def test_resend_with_same_id_is_idempotent(server: Server, db: asyncpg.Connection) -> None:
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="same", text="Explain fractions")
    first = await sock.expect("ack")
    await sock.until("done")
    await sock.send(type="message", id="same", text="Explain fractions")
    second = await sock.expect("ack")
    assert first == second
    await sock.send(type="ping")
    assert (await sock.recv())["type"] == "pong"  # no second answer was started
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'user'") == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 1


async def test_an_id_that_names_someone_elses_message_is_refused_not_acked(
    server: Server, db: asyncpg.Connection
) -> None:
    """Students see teachers' ids in teacher_message frames; a message with one is not a resend of it (nor
    a teacher's message with a student's id): refused with bad_request, and nothing else is stored."""
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    student = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = student.frames[0]["conversation_id"]
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    await teacher.send(type="intervene", conversation_id=conversation, text="Units, please.", id="t1")
    note = await student.expect("teacher_message")

    await student.send(type="message", id=note["id"], text="Why units?")
    error = await student.expect("error")
    assert (error["code"], error["ref"]) == ("bad_request", "t1")
    await student.send(type="message", id="s1", text="What are units?")
    await student.until("done")
    await teacher.send(type="intervene", conversation_id=conversation, text="Metres, say.", id="s1")
    error = await teacher.expect("error")
    assert (error["code"], error["ref"]) == ("bad_request", "s1")

    # Resends by the same author are still resends.
    await teacher.send(type="intervene", conversation_id=conversation, text="Units, please.", id="t1")
    again = await teacher.expect("teacher_message")
    assert (again["message_id"], again["text"]) == (note["message_id"], "Units, please.")
    await student.send(type="message", id="s1", text="What are units?")
    assert (await student.expect("ack"))["text"] == "What are units?"
    rows = await db.fetch("SELECT role, text, client_id FROM messages ORDER BY id")
    assert [(r["role"], r["client_id"]) for r in rows] == [("teacher", "t1"), ("user", "s1"), ("assistant", None)]
    assert [r["text"] for r in rows[:2]] == ["Units, please.", "What are units?"]


async def test_cancel_mid_answer_keeps_partial_text_as_stopped(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=40)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="c1", text="Tell me about triangles")
    ack = await sock.expect("ack")
    await sock.expect("token")
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    frames = await sock.until("done")
    done = frames[-1]
    assert done["status"] == "stopped"
    text = answer_text(sock.frames, ack["reply_id"])
    assert done["length"] == len(text) > 0
    row = await db.fetchrow("SELECT text, status FROM messages WHERE id = $1", ack["reply_id"])
    assert row is not None and row["status"] == "stopped" and row["text"] == text
    # Cancelling again, after the end, changes nothing and is not an error.
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    await sock.send(type="ping")
    assert (await sock.recv())["type"] == "pong"


async def test_cancel_before_first_token_and_of_unknown_reply(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_ttft_ms=2000)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="c1", text="Slow one")
    ack = await sock.expect("ack")
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    done = await sock.expect("done")
    assert done["status"] == "stopped" and done["length"] == 0
    await sock.send(type="cancel", reply_id=999999)
    error = await sock.expect("error")
    assert error["code"] == "not_found" and error["ref"] == "999999"


async def test_two_tabs_of_one_user_both_receive_the_answer(server: Server) -> None:
    tab1 = await server.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await server.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id="t1", text="What is a vector?")
    frames1 = await tab1.until("done")
    frames2 = await tab2.until("done")
    ack1 = frames1[0]
    assert ack1["type"] == "ack" and frames2[0] == ack1  # the other tab learns the question too
    assert [f for f in frames1 if f["type"] != "ack"] == [f for f in frames2 if f["type"] != "ack"]
    assert answer_text(frames2, ack1["reply_id"]) == answer_text(frames1, ack1["reply_id"])


async def test_queued_message_is_answered_after_the_current_one(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=200)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="a", text="first")
    await sock.send(type="message", id="b", text="second")
    frames = await sock.until("done")
    frames += await sock.until("done")
    acks = [f for f in frames if f["type"] == "ack"]
    dones = [f for f in frames if f["type"] == "done"]
    assert [a["id"] for a in acks] == ["a", "b"]
    assert [d["reply_id"] for d in dones] == [acks[0]["reply_id"], acks[1]["reply_id"]]
    # The second answer never interleaves with the first.
    first_done_index = frames.index(dones[0])
    assert all(f["reply_id"] == acks[1]["reply_id"] for f in frames[first_done_index + 1 :] if f["type"] == "token")
    statuses = await db.fetch("SELECT status FROM messages WHERE role = 'assistant'")
    assert {r["status"] for r in statuses} == {"complete"}


async def test_a_question_asked_while_a_queued_answer_streams_waits_for_it(
    serve: Serve, db: asyncpg.Connection
) -> None:
    # Three questions in one conversation: the second queued behind the first, the third asked once the first
    # is done, while the second streams. Before: the first answer's end dropped the conversation's lock while
    # the second still waited on it, and the third took a new lock and streamed alongside the second.
    server = await serve(offline_tokens_per_s=100)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="a", text="first")
    await sock.send(type="message", id="b", text="second")
    frames = await sock.until("done")
    await sock.send(type="message", id="c", text="third")
    frames += await sock.until("done")
    frames += await sock.until("done")
    acks = {f["id"]: f["reply_id"] for f in frames if f["type"] == "ack"}
    dones = [f["reply_id"] for f in frames if f["type"] == "done"]
    assert dones == [acks["a"], acks["b"], acks["c"]]
    second_done = next(i for i, f in enumerate(frames) if f["type"] == "done" and f["reply_id"] == acks["b"])
    assert not [f for f in frames[:second_done] if f["type"] == "token" and f["reply_id"] == acks["c"]]
    statuses = await db.fetch("SELECT status FROM messages WHERE role = 'assistant'")
    assert [r["status"] for r in statuses] == ["complete"] * 3


async def test_history_paging(server: Server) -> None:
    sock = await server.connect({"token": token()})
    for i in range(8):
        await sock.send(type="message", id=f"h{i}", text=f"q{i}")
        await sock.until("done")
    await sock.send(type="history", limit=5)
    page1 = await sock.expect("history")
    assert len(page1["messages"]) == 5 and page1["has_more"] is True
    await sock.send(type="history", limit=5, before=page1["messages"][0]["id"])
    page2 = await sock.expect("history")
    await sock.send(type="history", limit=10, before=page2["messages"][0]["id"])
    page3 = await sock.expect("history")
    assert page3["has_more"] is False
    everything = page3["messages"] + page2["messages"] + page1["messages"]
    assert len(everything) == 16
    assert [m["id"] for m in everything] == sorted(m["id"] for m in everything)
    assert [m["text"] for m in everything if m["role"] == "user"] == [f"q{i}" for i in range(8)]


async def test_rate_limit_refuses_with_retry_after_and_commits_nothing(
    serve: Serve, db: asyncpg.Connection
) -> None:
    server = await serve(messages_per_minute=2)
    sock = await server.connect({"token": token()})
    for i in range(2):
        await sock.send(type="message", id=f"r{i}", text="hi")
        await sock.until("done")
    await sock.send(type="message", id="r2", text="hi again")
    error = await sock.expect("error")
    assert error["code"] == "rate_limited" and error["ref"] == "r2"
    assert 0 < error["retry_after"] <= 60
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_id = 'r2'") == 0
    # Another user is not affected.
    other = await server.connect({"token": token("stu-2")})
    await other.send(type="message", id="x", text="hello")
    assert (await other.expect("ack"))["id"] == "x"


async def test_disconnect_mid_answer_never_leaves_streaming(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=100)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="d1", text="Explain photosynthesis")
    ack = await sock.expect("ack")
    await sock.expect("token")
    await sock.close()
    async with asyncio.timeout(10):
        while (
            status := await db.fetchval("SELECT status FROM messages WHERE id = $1", ack["reply_id"])
        ) == "streaming":
            await asyncio.sleep(0.05)
    assert status in ("complete", "interrupted")


async def test_shutdown_mid_answer_commits_interrupted(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=20)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="s1", text="A long answer please")
    ack = await sock.expect("ack")
    await sock.expect("token")
    await sock.send(type="message", id="s2", text="and a queued one")
    ack2 = await sock.expect("ack")
    await server.client.close()
    rows = await db.fetch(
        "SELECT id, status, text FROM messages WHERE id = ANY($1::bigint[]) ORDER BY id",
        [ack["reply_id"], ack2["reply_id"]],
    )
    assert [r["status"] for r in rows] == ["interrupted", "interrupted"]
    assert rows[0]["text"] and rows[1]["text"] == ""
    assert await db.fetchval("SELECT count(*) FROM messages WHERE status = 'streaming'") == 0


@pytest.mark.parametrize("log_content", [True, False])
async def test_turn_text_is_logged_only_with_log_content(
    serve: Serve, caplog: pytest.LogCaptureFixture, log_content: bool
) -> None:
    server = await serve(log_content=log_content)
    sock = await server.connect({"token": token()})
    question = "Is zebra-4711 a prime number?"
    with caplog.at_level(logging.DEBUG):
        await sock.send(type="message", id="q1", text=question)
        ack = await sock.expect("ack")
        answer = answer_text(await sock.until("done"), ack["reply_id"])
    # As the replica writes them: one JSON object a line.
    lines = [JsonFormatter("test").format(record) for record in caplog.records]
    logged = [orjson.loads(line) for line in lines if "zebra-4711" in line]
    if not log_content:
        assert logged == [] and not any(answer in line for line in lines)
        return
    assert len(logged) == 1 and logged[0]["level"] == "info"
    entry = {key: logged[0][key] for key in ("event", "tenant", "question_id", "reply_id", "status")}
    assert entry == {
        "event": "turn content", "tenant": "school-a", "question_id": ack["message_id"], "reply_id": ack["reply_id"],
        "status": "complete",
    }
    assert (logged[0]["question"], logged[0]["answer"]) == (question, answer)
    assert logged[0]["conversation_id"] == sock.frames[0]["conversation_id"]
