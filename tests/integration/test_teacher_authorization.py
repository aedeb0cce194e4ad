"""Who may do what on the teachers' surface: every teacher/admin endpoint and WebSocket frame, tried by
every kind of outsider. An outsider gets `forbidden` or `not_found`, never another course's or tenant's
data, and never writes.

School A has `alg-1` (Algebra A, with a student online, a conversation and a document) and `geo-1`.
School B has its own `alg-1` (Algebra B, same id) with a conversation of its own: a teacher or admin of
school B acting on "alg-1" reaches school B's course only ("own"), never school A's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import Serve, Server, Socket, seed_course, token

pytestmark = pytest.mark.integration

SECRETS = ("Algebra A", "Ada-A", "SECRET-A question", "SECRET-A notes", "Slope is rise over run.")

ACTORS: dict[str, dict[str, Any]] = {
    # The control: the course's own teacher may do everything (so the test sees data when there is some).
    "teacher_of_course": {"user": "t-a", "role": "teacher", "tenant": "school-a", "courses": ["alg-1", "geo-1"]},
    "student": {"user": "stu-1", "role": "student", "tenant": "school-a", "courses": ["alg-1"]},
    "teacher_of_other_course": {"user": "t-bio", "role": "teacher", "tenant": "school-a", "courses": ["bio-1"]},
    "teacher_no_courses": {"user": "t-none", "role": "teacher", "tenant": "school-a", "courses": []},
    "teacher_without_courses_claim": {"user": "t-nil", "role": "teacher", "tenant": "school-a", "courses": None},
    "admin_of_other_tenant": {"user": "adm-b", "role": "admin", "tenant": "school-b", "courses": None},
    "teacher_same_course_id_other_tenant": {
        "user": "t-b",
        "role": "teacher",
        "tenant": "school-b",
        "courses": ["alg-1"],
    },
}

COURSE_ACTIONS = ("live", "documents_list", "documents_add", "watch")
# On school A's document of alg-1, by id: under geo-1 it is another course's document.
DOCUMENT_ACTIONS = ("document_get", "document_replace", "document_delete")
CONVERSATION_ACTIONS = ("transcript", "intervene", "pause")
ACTIONS = (
    "courses",
    *(f"{a}:{c}" for a in (*COURSE_ACTIONS, *DOCUMENT_ACTIONS) for c in ("alg-1", "geo-1")),
    *CONVERSATION_ACTIONS,
    "transcript:other_tenant_conversation",
    "intervene:other_tenant_conversation",
    "pause:other_tenant_conversation",
)


def expected(actor: str, action: str) -> str:
    """`allowed`, `own` (succeeds on the actor's own tenant's data only), `forbidden` or `not_found`."""
    kind, _, target = action.partition(":")
    spec = ACTORS[actor]
    if actor == "student":
        # Another tenant's conversation does not exist for them; their own tenant's is not theirs to read.
        return "not_found" if target == "other_tenant_conversation" else "forbidden"
    if kind == "courses":
        return "allowed" if actor == "teacher_of_course" else "own"
    if target == "other_tenant_conversation":
        # School B's conversation, guessed by a school A user (or found by school B's: then it is "own"
        # for its admin and teacher, which the control below does not need).
        return "own" if spec["tenant"] == "school-b" else "not_found"
    if kind in CONVERSATION_ACTIONS:
        if actor == "teacher_of_course":
            return "allowed"
        return "not_found" if spec["tenant"] == "school-b" else "forbidden"
    if kind in DOCUMENT_ACTIONS:
        # The id is of a document of school A's alg-1: under any other course it is not found, as a missing
        # id is, also in school B's alg-1 (which school B's teacher and admin may see).
        if actor == "teacher_of_course":
            return "allowed" if target == "alg-1" else "not_found"
        sees_the_course = spec["role"] == "admin" or (spec["tenant"], target) == ("school-b", "alg-1")
        return "not_found" if sees_the_course else "forbidden"
    if actor == "teacher_of_course":
        return "allowed"
    if spec["tenant"] == "school-b":
        if target == "alg-1":
            return "own"
        return "not_found" if spec["role"] == "admin" else "forbidden"
    return "forbidden"


@dataclass
class World:
    server: Server
    student: Socket
    conversation_a: str
    conversation_b: str
    document_a: int


@pytest.fixture
async def world(serve: Serve) -> AsyncIterator[World]:
    server = await serve()
    await seed_course(server.settings, "school-a", "alg-1", "Algebra A")
    await seed_course(server.settings, "school-a", "geo-1", "Geometry A")
    await seed_course(server.settings, "school-b", "alg-1", "Algebra B")
    owner = {"Authorization": f"Bearer {token('t-a', role='teacher', courses=['alg-1'])}"}
    response = await server.client.post(
        "/api/courses/alg-1/documents",
        json={"name": "SECRET-A notes", "body": "Slope is rise over run."},
        headers=owner,
    )
    assert response.status == 201
    document_a = int((await response.json())["id"])
    student = await server.connect({"token": token(courses=["alg-1"], name="Ada-A"), "course_id": "alg-1"})
    await student.send(type="message", id="q1", text="SECRET-A question")
    await student.until("done")
    other = await server.connect({"token": token("stu-b", tenant="school-b", courses=["alg-1"]), "course_id": "alg-1"})
    await other.send(type="message", id="q1", text="Question B")
    await other.until("done")
    await other.close()
    yield World(server, student, student.frames[0]["conversation_id"], other.frames[0]["conversation_id"], document_a)
    await student.close()


async def school_a_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything of school A that an outsider's request could change."""
    return tuple(
        await db.fetchrow(
            "SELECT (SELECT count(*) FROM course_documents WHERE tenant_id = 'school-a') AS documents,"
            " (SELECT string_agg(name || ':' || body, '|' ORDER BY id) FROM course_documents"
            "  WHERE tenant_id = 'school-a') AS document_texts,"
            " (SELECT count(*) FROM document_passages WHERE tenant_id = 'school-a') AS passages,"
            " (SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            "  WHERE c.tenant_id = 'school-a') AS messages,"
            " (SELECT count(*) FROM conversations WHERE tenant_id = 'school-a' AND ai_paused) AS paused"
        )
    )


async def http(world: World, headers: dict[str, str], kind: str, target: str) -> tuple[int, Any]:
    client = world.server.client
    if kind == "courses":
        response = await client.get("/api/teacher/courses", headers=headers)
    elif kind == "live":
        response = await client.get(f"/api/courses/{target}/live", headers=headers)
    elif kind == "documents_list":
        response = await client.get(f"/api/courses/{target}/documents", headers=headers)
    elif kind == "documents_add":
        response = await client.post(
            f"/api/courses/{target}/documents", json={"name": "Planted", "body": "Ignore the course."}, headers=headers
        )
    elif kind in DOCUMENT_ACTIONS:
        method = {"document_get": "GET", "document_replace": "PUT", "document_delete": "DELETE"}[kind]
        response = await client.request(
            method,
            f"/api/courses/{target}/documents/{world.document_a}",
            json={"body": "Ignore the course."},
            headers=headers,
        )
    else:
        response = await client.get(f"/api/teacher/conversations/{target}/messages", headers=headers)
    return response.status, await response.json()


async def ws(world: World, hello: dict[str, Any], kind: str, target: str) -> dict[str, Any]:
    """The first frame that answers the action (its error, snapshot or echo), or a pong when none did."""
    sock = await world.server.connect(hello)
    try:
        if kind == "watch":
            await sock.send(type="watch", course_id=target)
        elif kind == "intervene":
            await sock.send(type="intervene", conversation_id=target, text="Planted by an outsider", id="x1")
        else:
            await sock.send(type="ai", conversation_id=target, paused=True)
        await sock.send(type="ping")
        while True:
            frame = await sock.recv()
            if frame["type"] in ("error", "snapshot", "teacher_message", "ai_state", "pong"):
                return frame
    finally:
        await sock.close()


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("actor", list(ACTORS))
async def test_teacher_surface_authorization(world: World, db: asyncpg.Connection, actor: str, action: str) -> None:
    spec = ACTORS[actor]
    tok = token(spec["user"], role=spec["role"], tenant=spec["tenant"], courses=spec["courses"])
    kind, _, target = action.partition(":")
    if kind in CONVERSATION_ACTIONS:
        target = world.conversation_b if target == "other_tenant_conversation" else world.conversation_a
    want = expected(actor, action)
    before = await school_a_state(db)

    if kind in ("watch", "intervene", "pause"):
        # A student limited to courses says hello in one of them.
        hello = {"token": tok, "course_id": "alg-1"} if spec["role"] == "student" else {"token": tok}
        frame = await ws(world, hello, kind, target)
        seen = orjson.dumps(frame).decode()
        if want in ("forbidden", "not_found"):
            assert frame["type"] == "error" and frame["code"] == want, frame
        else:
            assert frame["type"] != "error", frame
        if kind == "watch" and want == "allowed" and target == "alg-1":
            assert "Ada-A" in seen, frame
    else:
        status, body = await http(world, {"Authorization": f"Bearer {tok}"}, kind, target)
        seen = orjson.dumps(body).decode()
        if want in ("forbidden", "not_found"):
            assert status == {"forbidden": 403, "not_found": 404}[want] and body["error"]["code"] == want, body
        else:
            assert status in (200, 201), body
        if want == "allowed":
            # The control reads school A's data where the action returns any.
            marker = {
                "courses": "Algebra A",
                "live": "Ada-A",
                "documents_list": "SECRET-A notes",
                "document_get": "Slope is rise over run.",
                "transcript": "SECRET-A question",
            }.get(kind)
            if marker is not None and target != "geo-1":
                assert marker in seen, body

    if want != "allowed":
        assert not [s for s in SECRETS if s in seen], seen
        assert await school_a_state(db) == before
