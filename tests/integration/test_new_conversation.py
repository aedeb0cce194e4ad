"""`hello` with `new_conversation`: a fresh thread in the course, an empty one reused, the old one reachable
again with its own history, and the conversation list filtered by course."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from server.errors import CloseCode
from tests.conftest import Serve, Server, Socket, answer_text, seed_course, token

pytestmark = pytest.mark.integration

ALGEBRA = token(courses=["alg-1"])
BOTH = token(courses=["alg-1", "geo-1"])


async def _server(serve: Serve) -> Server:
    server = await serve(offline_tokens_per_s=1000, frame_interval_ms=5)
    for course in ("alg-1", "geo-1"):
        await seed_course(server.settings, "school-a", course, course)
    return server


async def _ask(sock: Socket, client_id: str, text: str) -> str:
    await sock.send(type="message", id=client_id, text=text)
    ack = await sock.expect("ack")
    return answer_text(await sock.until("done"), ack["reply_id"])


async def test_a_new_conversation_is_its_own_thread_and_the_old_one_can_be_reopened(serve: Serve) -> None:
    server = await _server(serve)
    first = await server.connect({"token": ALGEBRA, "course_id": "alg-1"})
    old = first.frames[0]["conversation_id"]
    await _ask(first, "a1", "What is a prime number?")
    assert "What is a prime number?" in await _ask(first, "a2", "Is 9 prime?")  # the offline tutor recalls it
    await first.close()

    fresh = await server.connect({"token": ALGEBRA, "course_id": "alg-1", "new_conversation": True})
    welcome = fresh.frames[0]
    new = welcome["conversation_id"]
    assert new != old and welcome["course_id"] == "alg-1" and welcome["history"] == [] and welcome["seq"] == 0
    # The tutor's context is the new conversation's alone: no earlier question of the old one.
    answer = await _ask(fresh, "b1", "How do I factor x^2 - 1?")
    assert "Earlier you asked" not in answer and "prime" not in answer
    assert "x^2 - 1" in await _ask(fresh, "b2", "And x^2 - 4?")  # its own earlier question is there

    # A plain hello now opens the most recent conversation, the new one.
    plain = await server.connect({"token": ALGEBRA, "course_id": "alg-1"})
    assert plain.frames[0]["conversation_id"] == new
    # The old one reopened by id: its own history, nothing of the new one.
    back = await server.connect({"token": ALGEBRA, "conversation_id": old})
    texts = [m["text"] for m in back.frames[0]["history"] if m["role"] == "user"]
    assert texts == ["What is a prime number?", "Is 9 prime?"]
    assert "Is 9 prime?" in await _ask(back, "a3", "Is 11 prime?")  # and the tutor's context is the old thread

    # The list, filtered by course, carries both, titled by their first question.
    response = await server.client.get(
        "/api/conversations?course_id=alg-1", headers={"Authorization": f"Bearer {ALGEBRA}"}
    )
    assert response.status == 200
    listed = {c["id"]: c["title"] for c in (await response.json())["conversations"]}
    assert listed == {old: "What is a prime number?", new: "How do I factor x^2 - 1?"}


async def test_an_empty_conversation_is_reused_not_piled_up(serve: Serve, db: asyncpg.Connection) -> None:
    server = await _server(serve)
    hello: dict[str, Any] = {"token": ALGEBRA, "course_id": "alg-1", "new_conversation": True}
    first = (await server.connect(hello)).frames[0]["conversation_id"]
    # Clicking "New conversation" again before asking anything: the same empty conversation.
    assert (await server.connect(hello)).frames[0]["conversation_id"] == first
    sock = await server.connect(hello)
    assert sock.frames[0]["conversation_id"] == first
    await _ask(sock, "q1", "What is slope?")
    second = (await server.connect(hello)).frames[0]["conversation_id"]
    assert second != first
    # Another course is another thread, even while this course's new one is empty.
    geometry = await server.connect({"token": BOTH, "course_id": "geo-1", "new_conversation": True})
    assert geometry.frames[0]["conversation_id"] not in (first, second)
    # The student went back to the first conversation and chatted there, so it is the most recent; the
    # empty one is still found and reused.
    back = await server.connect({"token": ALGEBRA, "conversation_id": first})
    await _ask(back, "q2", "And intercept?")
    assert (await server.connect(hello)).frames[0]["conversation_id"] == second
    assert await db.fetchval("SELECT count(*) FROM conversations") == 3


async def test_new_conversation_refused_with_a_conversation_id_and_outside_the_token(serve: Serve) -> None:
    server = await _server(serve)
    existing = (await server.connect({"token": ALGEBRA, "course_id": "alg-1"})).frames[0]["conversation_id"]
    for extra in ({"conversation_id": existing}, {"resume_from": 3}):
        sock = await server.connect({"token": ALGEBRA, "new_conversation": True, **extra}, welcome=False)
        error = await sock.expect("error")
        assert error["code"] == "bad_request" and "new_conversation" in error["message"], error
    sock = await server.connect({"token": ALGEBRA, "new_conversation": "yes"}, welcome=False)
    assert (await sock.expect("error"))["code"] == "bad_request"

    # A course outside the token, or no course for a token naming several: forbidden, as for a plain hello.
    sock = await server.connect({"token": ALGEBRA, "course_id": "geo-1", "new_conversation": True}, welcome=False)
    assert (await sock.expect("error"))["code"] == "forbidden"
    assert await sock.close_code() == CloseCode.FORBIDDEN
    sock = await server.connect({"token": BOTH, "new_conversation": True}, welcome=False)
    assert (await sock.expect("error"))["code"] == "forbidden"
    # A course-limited student naming no course gets a new conversation in the token's one course.
    await _ask(await server.connect({"token": ALGEBRA, "conversation_id": existing}), "q", "hi")
    sock = await server.connect({"token": ALGEBRA, "new_conversation": True})
    assert sock.frames[0]["course_id"] == "alg-1" and sock.frames[0]["conversation_id"] != existing
    # A course that does not exist.
    sock = await server.connect({"token": token(), "course_id": "nope", "new_conversation": True}, welcome=False)
    assert (await sock.expect("error"))["code"] == "not_found"


async def test_another_users_or_tenants_conversation_cannot_be_reopened(serve: Serve) -> None:
    server = await _server(serve)
    mine = await server.connect({"token": ALGEBRA, "course_id": "alg-1", "new_conversation": True})
    conversation = mine.frames[0]["conversation_id"]
    await _ask(mine, "q", "secret question")
    for other in (token("stu-2", courses=["alg-1"]), token(tenant="school-b", courses=["alg-1"])):
        sock = await server.connect({"token": other, "conversation_id": conversation}, welcome=False)
        assert (await sock.expect("error"))["code"] == "not_found"
        response = await server.client.get(
            "/api/conversations?course_id=alg-1", headers={"Authorization": f"Bearer {other}"}
        )
        assert response.status == 200 and (await response.json())["conversations"] == []
        response = await server.client.get(
            f"/api/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {other}"}
        )
        assert response.status == 404


async def test_the_conversation_list_filter_and_limit(serve: Serve) -> None:
    server = await _server(serve)
    for course, question in (("alg-1", "algebra one"), ("geo-1", "geometry one"), ("alg-1", "algebra two")):
        sock = await server.connect({"token": BOTH, "course_id": course, "new_conversation": True})
        await _ask(sock, "q", question)
    auth = {"Authorization": f"Bearer {BOTH}"}

    async def titles(query: str) -> list[str]:
        response = await server.client.get(f"/api/conversations{query}", headers=auth)
        assert response.status == 200, await response.text()
        body = await response.json()
        return [c["title"] for c in body["conversations"]]

    assert await titles("?course_id=alg-1") == ["algebra two", "algebra one"]
    assert await titles("?course_id=geo-1") == ["geometry one"]
    assert await titles("?course_id=alg-1&limit=1") == ["algebra two"]
    assert await titles("") == ["algebra two", "geometry one", "algebra one"]
    for query, status in (("?limit=0", 400), ("?limit=101", 400), ("?course_id=" + "c" * 201, 400)):
        response = await server.client.get(f"/api/conversations{query}", headers=auth)
        assert response.status == status and (await response.json())["error"]["code"] == "bad_request"
    response = await server.client.get(
        "/api/conversations?course_id=geo-1", headers={"Authorization": f"Bearer {ALGEBRA}"}
    )
    assert response.status == 403 and (await response.json())["error"]["code"] == "forbidden"


async def test_the_conversation_list_of_conversations_without_a_course(serve: Serve) -> None:
    """`no_course=true` lists only the conversations without a course, however many newer ones other
    courses have; a student whose token names courses may not have any."""
    server = await _server(serve)
    free = token("stu-free")  # no `courses` claim: may chat without a course
    sock = await server.connect({"token": free})
    assert sock.frames[0]["course_id"] is None
    await _ask(sock, "q", "no course at all")
    for n in range(3):
        sock = await server.connect({"token": free, "course_id": "alg-1", "new_conversation": True})
        await _ask(sock, "q", f"algebra {n}")

    async def listed(query: str, jwt: str = free) -> tuple[int, Any]:
        response = await server.client.get(f"/api/conversations{query}", headers={"Authorization": f"Bearer {jwt}"})
        return response.status, await response.json()

    status, body = await listed("?no_course=true&limit=2")
    assert status == 200
    assert [(c["title"], c["course_id"]) for c in body["conversations"]] == [("no course at all", None)]
    status, body = await listed("?no_course=false&limit=2")
    assert status == 200 and [c["title"] for c in body["conversations"]] == ["algebra 2", "algebra 1"]
    for query in ("?no_course=true&course_id=alg-1", "?no_course=yes"):
        status, body = await listed(query)
        assert status == 400 and body["error"]["code"] == "bad_request", query
    status, body = await listed("?no_course=true", ALGEBRA)
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_a_teacher_watching_the_course_sees_the_new_conversation(serve: Serve) -> None:
    server = await _server(serve)
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    await teacher.send(type="watch", course_id="alg-1")
    assert (await teacher.expect("snapshot"))["students"] == []
    old = await server.connect({"token": ALGEBRA, "course_id": "alg-1"})
    await _ask(old, "a1", "old topic")
    await old.close()
    fresh = await server.connect({"token": ALGEBRA, "course_id": "alg-1", "new_conversation": True})
    new = fresh.frames[0]["conversation_id"]
    student_frames = await _frames_of(fresh, "b1", "new topic")

    events: list[dict[str, Any]] = []
    while not (events and events[-1]["kind"] == "frame" and events[-1]["frame"]["type"] == "done"
               and events[-1]["frame"]["conversation_id"] == new):
        events += await teacher.until("event")
    joined = [e["student"] for e in events if e["kind"] == "joined"]
    assert [s["conversation_id"] for s in joined][-1] == new
    seen = [e["frame"] for e in events if e["kind"] == "frame" and e["frame"]["conversation_id"] == new]
    assert seen == student_frames and seen[0]["text"] == "new topic"
    # A teacher's later look at the course lists the student in the new conversation.
    await teacher.send(type="watch", course_id="alg-1")
    snapshot = await teacher.until("snapshot")
    assert [s["conversation_id"] for s in snapshot[-1]["students"]] == [new]


async def _frames_of(sock: Socket, client_id: str, text: str) -> list[dict[str, Any]]:
    await sock.send(type="message", id=client_id, text=text)
    return await sock.until("done")


@pytest.mark.parametrize("empty_one", [False, True], ids=["inserted", "reused"])
async def test_a_new_conversation_keeps_the_teachers_pause(serve: Serve, empty_one: bool) -> None:
    server = await _server(serve)
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    student = await server.connect({"token": ALGEBRA, "course_id": "alg-1"})
    paused = student.frames[0]["conversation_id"]
    await _ask(student, "q", "first")
    empty = None
    if empty_one:  # an empty conversation, older than the paused one's last answer
        empty = (await server.connect({"token": ALGEBRA, "new_conversation": True})).frames[0]["conversation_id"]
        await _ask(await server.connect({"token": ALGEBRA, "conversation_id": paused}), "q2", "second")
    await teacher.send(type="ai", conversation_id=paused, paused=True)
    await student.until("ai_state")
    fresh = await server.connect({"token": ALGEBRA, "course_id": "alg-1", "new_conversation": True})
    assert fresh.frames[0]["ai_paused"] is True
    assert (fresh.frames[0]["conversation_id"] == empty) if empty_one else fresh.frames[0]["conversation_id"] != paused
    await fresh.send(type="message", id="p", text="answer me anyway")
    assert (await fresh.expect("ack"))["reply_id"] is None


async def test_the_pause_covers_the_students_earlier_conversations_in_the_course(serve: Serve) -> None:
    """A teacher pauses the tutor for a student (in a course), not for one thread: reopening an earlier
    conversation from the widget's list must not bring an answering tutor back. Resuming resumes them all.
    The student's conversations in other courses are not touched."""
    server = await _server(serve)
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    older = await server.connect({"token": BOTH, "course_id": "alg-1"})
    earlier = older.frames[0]["conversation_id"]
    await _ask(older, "e1", "first thread")
    geometry = await server.connect({"token": BOTH, "course_id": "geo-1"})
    await _ask(geometry, "g1", "a geometry thread")
    current = await server.connect({"token": BOTH, "course_id": "alg-1", "new_conversation": True})
    conversation = current.frames[0]["conversation_id"]
    await _ask(current, "c1", "second thread")

    await teacher.send(type="ai", conversation_id=conversation, paused=True)
    await current.until("ai_state")
    state = (await older.until("ai_state"))[-1]  # a tab still open on the earlier one is told at once
    assert (state["conversation_id"], state["paused"]) == (earlier, True)
    back = await server.connect({"token": BOTH, "conversation_id": earlier})
    assert back.frames[0]["ai_paused"] is True
    await back.send(type="message", id="e2", text="answer me here instead")
    assert (await back.expect("ack"))["reply_id"] is None  # kept, not answered
    other_course = await server.connect({"token": BOTH, "course_id": "geo-1"})
    assert other_course.frames[0]["ai_paused"] is False

    await teacher.send(type="ai", conversation_id=conversation, paused=False)
    await current.until("ai_state")
    # Resuming answers the question that waited in the earlier thread too.
    done = (await back.until("done"))[-1]
    assert done["status"] == "complete" and done["conversation_id"] == earlier
    again = await server.connect({"token": BOTH, "conversation_id": earlier})
    assert again.frames[0]["ai_paused"] is False
    assert "answer me here instead" in await _ask(again, "e3", "and now?")  # answering again, in its own thread
