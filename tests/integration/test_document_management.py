"""Course documents read, replaced and deleted over HTTP: what grounds the tutor's answers follows at once
(a replace is all or nothing, also for an answer asked meanwhile), on every replica (also one that cached the
course's document names), an answer in flight is unaffected, a duplicate upload makes no copy, and ids are
checked (malformed: bad_request; another course's or tenant's: exactly what a missing id gets)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy
from redis.exceptions import ConnectionError as RedisConnectionError

from ai.base import AIRequest, StreamItem, Usage
from server import answers as answers_module
from server.app import create_app
from server.keys import CHAT
from server.settings import Settings
from storage.documents import Documents
from tests.conftest import Server, hold_pubsub_reconnects, kill_pubsub_of, seed_course, token

pytestmark = pytest.mark.integration

TEACHER = {"Authorization": f"Bearer {token('t-1', role='teacher', courses=['alg-1', 'geo-1'])}"}
URL = "/api/courses/alg-1/documents"
SLOPE = "Slope is rise over run: how far a line climbs for each step to the right."
GRADIENT = "Gradient: the change in height divided by the change in distance."


class Tutor:
    """A provider that keeps what each question was grounded on, and can hold its answer until let go."""

    name = "recording"
    model = "recording-tutor"

    def __init__(self) -> None:
        self.requests: list[AIRequest] = []
        self.answering = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        self.requests.append(request)
        self.answering.set()
        if self.hold is not None:
            await self.hold.wait()
        yield "Rise over run."
        yield Usage(prompt_tokens=10, output_tokens=3)

    async def close(self) -> None:
        pass


Start = Callable[..., Awaitable[tuple[Server, Tutor]]]


@pytest.fixture
def start(aiohttp_client: Any, settings: Settings) -> Start:
    async def _start(**overrides: Any) -> tuple[Server, Tutor]:
        tutor = Tutor()
        current = replace(settings, **overrides)
        server = Server(await aiohttp_client(create_app(current, env={}, provider=tutor)), current)
        await seed_course(current, "school-a", "alg-1", "Algebra I")
        await seed_course(current, "school-a", "geo-1", "Geometry I")
        await seed_course(current, "school-b", "alg-1", "Algebra B")
        return server, tutor

    return _start


_ids = itertools.count()


async def ask(server: Server, tutor: Tutor, question: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Ask in alg-1 as a student: the document names and the (name, passage) pairs the tutor was given."""
    sock = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    try:
        await sock.send(type="message", id=f"q{next(_ids)}", text=question)
        assert (await sock.until("done"))[-1]["status"] == "complete"
    finally:
        await sock.close()
    course = tutor.requests[-1].course
    assert course is not None
    return list(course.document_names), [(name, text) for _, name, text in course.passages]


async def call(server: Server, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    headers = {**TEACHER, **kwargs.pop("headers", {})}
    response = await server.client.request(method, path, headers=headers, **kwargs)
    assert response.content_type == "application/json", await response.text()
    return response.status, await response.json()


async def add(server: Server, name: str, body: str, course: str = "alg-1", **kwargs: Any) -> int:
    status, document = await call(
        server, "POST", f"/api/courses/{course}/documents", json={"name": name, "body": body}, **kwargs
    )
    assert status == 201, document
    return int(document["id"])


async def test_a_document_is_read_whole(start: Start) -> None:
    server, _ = await start()
    body = "# Slopes\n\n" + SLOPE + "\n\n" + "More about lines. " * 80 + "\n"
    document_id = await add(server, "Notes — é", body)
    status, document = await call(server, "GET", f"{URL}/{document_id}")
    assert status == 200
    assert document == {
        "id": document_id,
        "course_id": "alg-1",
        "name": "Notes — é",
        "chars": len(body),
        "passages": 3,
        "body": body,
    }


async def test_a_replaced_document_grounds_answers_with_its_new_body_only(start: Start) -> None:
    server, tutor = await start()
    document_id = await add(server, "Notes", SLOPE)
    assert (await ask(server, tutor, "What is slope?"))[1] == [("Notes", SLOPE)]

    status, document = await call(server, "PUT", f"{URL}/{document_id}", json={"body": GRADIENT})
    assert status == 200
    assert document == {"id": document_id, "course_id": "alg-1", "name": "Notes", "chars": len(GRADIENT), "passages": 1}
    assert await ask(server, tutor, "What is slope?") == (["Notes"], [])
    assert (await ask(server, tutor, "What is a gradient?"))[1] == [("Notes", GRADIENT)]

    # Markdown with ?name=: a new name and body at once.
    status, document = await call(
        server,
        "PUT",
        f"{URL}/{document_id}",
        data=SLOPE.encode(),
        params={"name": "Lines"},
        headers={"Content-Type": "text/markdown"},
    )
    assert status == 200 and document["name"] == "Lines" and document["chars"] == len(SLOPE)
    assert await ask(server, tutor, "What is slope?") == (["Lines"], [("Lines", SLOPE)])

    # A new name alone keeps the body and its passages.
    status, document = await call(server, "PUT", f"{URL}/{document_id}", json={"name": "Chapter 1"})
    assert status == 200 and document["passages"] == 1 and document["chars"] == len(SLOPE)
    status, read = await call(server, "GET", f"{URL}/{document_id}")
    assert (read["name"], read["body"]) == ("Chapter 1", SLOPE)
    assert await ask(server, tutor, "What is slope?") == (["Chapter 1"], [("Chapter 1", SLOPE)])

    for bad in ({}, {"name": None, "body": None}, {"body": " "}, {"name": "a\nb"}):
        status, error = await call(server, "PUT", f"{URL}/{document_id}", json=bad)
        assert (status, error["error"]["code"]) == (400, "bad_request"), (bad, error)
    status, error = await call(server, "PUT", f"{URL}/{document_id}", json={"body": "x " * 100_001})
    assert (status, error["error"]["code"]) == (413, "too_large")
    status, read = await call(server, "GET", f"{URL}/{document_id}")
    assert (read["name"], read["body"]) == ("Chapter 1", SLOPE)


async def test_answers_asked_during_a_replace_are_grounded_on_the_old_body(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replace holds its transaction open after deleting the old passages: a question asked then still
    gets them (never none, never half of each body), and the new ones once it commits."""
    server, tutor = await start()
    document_id = await add(server, "Notes", SLOPE)
    deleted, let_go = asyncio.Event(), asyncio.Event()
    insert = Documents._insert_passages

    async def held(conn: PoolConnectionProxy, *args: Any) -> None:
        deleted.set()
        await let_go.wait()
        await insert(conn, *args)

    monkeypatch.setattr(Documents, "_insert_passages", staticmethod(held))
    body = SLOPE + " Slope is the gradient.\n\n" + GRADIENT
    replacing = asyncio.create_task(call(server, "PUT", f"{URL}/{document_id}", json={"body": body}))
    await asyncio.wait_for(deleted.wait(), 5)
    assert (await ask(server, tutor, "What is the slope or gradient?"))[1] == [("Notes", SLOPE)]
    let_go.set()
    status, document = await replacing
    assert status == 200 and document["passages"] == 1
    assert (await ask(server, tutor, "What is the slope or gradient?"))[1] == [("Notes", body)]


async def test_a_deleted_document_no_longer_grounds_answers(start: Start, db: asyncpg.Connection) -> None:
    server, tutor = await start()
    slope = await add(server, "Slope notes", SLOPE)
    gradient = await add(server, "Gradient notes", GRADIENT + " Slope too.")
    status, body = await call(server, "DELETE", f"{URL}/{slope}")
    assert (status, body) == (200, {"status": "deleted"})
    assert await db.fetchval("SELECT count(*) FROM document_passages WHERE document_id = $1", slope) == 0
    names, passages = await ask(server, tutor, "What is slope?")
    assert names == ["Gradient notes"] and passages == [("Gradient notes", GRADIENT + " Slope too.")]
    status, listed = await call(server, "GET", URL)
    assert [d["id"] for d in listed["documents"]] == [gradient]
    for method in ("GET", "PUT", "DELETE"):
        status, error = await call(server, method, f"{URL}/{slope}", json={"body": SLOPE})
        assert (status, error["error"]) == (404, {"code": "not_found", "message": "document not found"})


async def test_an_answer_in_flight_ends_normally_when_its_document_changes(
    start: Start, db: asyncpg.Connection
) -> None:
    server, tutor = await start()
    document_id = await add(server, "Notes", SLOPE)
    tutor.hold = asyncio.Event()
    sock = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    await sock.send(type="message", id="q1", text="What is slope?")
    ack = await sock.expect("ack")
    await asyncio.wait_for(tutor.answering.wait(), 5)
    assert (await call(server, "PUT", f"{URL}/{document_id}", json={"body": GRADIENT}))[0] == 200
    assert (await call(server, "DELETE", f"{URL}/{document_id}"))[0] == 200
    tutor.hold.set()
    done = (await sock.until("done"))[-1]
    await sock.close()
    assert done["status"] == "complete" and done["length"] == len("Rise over run.")
    used = await db.fetchval("SELECT passage_ids FROM ai_usage WHERE message_id = $1", ack["reply_id"])
    assert len(used) == 1  # the passage it was given, though gone since


async def test_a_duplicate_upload_makes_no_copy(start: Start) -> None:
    server, tutor = await start()
    first = await add(server, "Notes", SLOPE)
    # The same name and body again (a retry, a second click): the document there, 200 instead of 201.
    status, again = await call(server, "POST", URL, json={"name": " Notes ", "body": SLOPE})
    assert (status, again) == (
        200,
        {"id": first, "course_id": "alg-1", "name": "Notes", "chars": len(SLOPE), "passages": 1},
    )
    # The same name with another body: refused, naming the document there.
    status, error = await call(server, "POST", URL, json={"name": "Notes", "body": GRADIENT})
    assert status == 409 and error["error"]["code"] == "conflict" and error["error"]["document_id"] == first
    assert (await call(server, "GET", f"{URL}/{first}"))[1]["body"] == SLOPE
    # ... unless asked to replace it (Markdown with ?name= as well).
    status, replaced = await call(
        server,
        "POST",
        URL,
        data=GRADIENT.encode(),
        params={"name": "Notes", "replace": "true"},
        headers={"Content-Type": "text/markdown"},
    )
    assert status == 200 and replaced["id"] == first and replaced["chars"] == len(GRADIENT)
    assert (await ask(server, tutor, "What is the gradient, or slope?"))[1] == [("Notes", GRADIENT)]
    status, created = await call(server, "POST", URL, json={"name": "Lines", "body": SLOPE}, params={"replace": "true"})
    assert status == 201 and created["id"] != first
    # Renaming onto another document's name is the same conflict; a name of another course is free.
    status, error = await call(server, "PUT", f"{URL}/{created['id']}", json={"name": "Notes"})
    assert status == 409 and error["error"]["document_id"] == first
    await add(server, "Notes", SLOPE, course="geo-1")
    status, listed = await call(server, "GET", URL)
    assert [(d["id"], d["name"]) for d in listed["documents"]] == [(first, "Notes"), (created["id"], "Lines")]
    status, error = await call(server, "POST", URL, json={"name": "X", "body": "Y"}, params={"replace": "yes"})
    assert (status, error["error"]["code"]) == (400, "bad_request")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_ids_are_checked_and_another_course_or_tenant_is_not_found(
    start: Start, db: asyncpg.Connection, method: str
) -> None:
    server, _ = await start()
    ours = await add(server, "Notes", SLOPE)
    geometry = await add(server, "Geometry notes", "Angles add up.", course="geo-1")
    school_b = {"Authorization": f"Bearer {token('t-b', role='teacher', tenant='school-b', courses=['alg-1'])}"}
    other_tenant = await add(server, "B notes", "School B.", headers=school_b)
    state = await db.fetch("SELECT id, name, body FROM course_documents ORDER BY id")
    passages = await db.fetchval("SELECT count(*) FROM document_passages")

    for malformed in ("abc", "0", "-1", "1.5", "01", "%201", "9" * 20, "9223372036854775808", "1e3", "٣"):
        status, error = await call(server, method, f"{URL}/{malformed}", json={"body": "Changed."})
        assert (status, error["error"]["code"]) == (400, "bad_request"), (malformed, error)
    status, missing = await call(server, method, f"{URL}/{other_tenant + 1000}", json={"body": "Changed."})
    assert status == 404
    for foreign in (geometry, other_tenant):
        assert await call(server, method, f"{URL}/{foreign}", json={"body": "Changed."}) == (404, missing)
    # Students may not touch the course's documents at all (as for adding them).
    student = {"Authorization": f"Bearer {token(courses=['alg-1'])}"}
    status, error = await call(server, method, f"{URL}/{ours}", json={"body": "Changed."}, headers=student)
    assert (status, error["error"]["code"]) == (403, "forbidden")
    assert await db.fetch("SELECT id, name, body FROM course_documents ORDER BY id") == state
    assert await db.fetchval("SELECT count(*) FROM document_passages") == passages


async def test_common_words_do_not_choose_the_passages(start: Start) -> None:
    """Words found in nearly every passage ('the', 'what', 'this') say nothing about relevance: a passage
    full of them does not push out the one about the question."""
    server, tutor = await start(grounding_passages=1)
    await add(server, "Filler", "What is this? The one that is the best of the lot, and this is what they were. " * 5)
    await add(server, "Slope notes", SLOPE)
    assert (await ask(server, tutor, "What is the slope of this?"))[1] == [("Slope notes", SLOPE)]
    assert (await ask(server, tutor, "What is this?"))[1] == []


def _forgotten(server: Server, method: str) -> asyncio.Event:
    """Set when the replica's `Documents.<method>` next drops cached document names (of alg-1 or all)."""
    documents = server.client.app[CHAT].answers.documents
    forget, called = getattr(documents, method), asyncio.Event()

    def spy(*args: str) -> None:
        forget(*args)
        if args in ((), ("school-a", "alg-1")):
            called.set()

    setattr(documents, method, spy)
    return called


async def test_a_change_on_one_replica_reaches_the_names_another_replica_cached(start: Start) -> None:
    """Each replica keeps a course's document names (NAMES_TTL_S); a change made through another replica is
    announced to it, so its next answer has the new names, not those it cached before the change."""
    a, _ = await start(replica_id="replica-a")
    b, tutor_b = await start(replica_id="replica-b")
    document_id = await add(a, "Slope notes", SLOPE)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Slope notes"]

    renamed = _forgotten(b, "forget")
    status, _ = await call(a, "PUT", f"{URL}/{document_id}", json={"name": "Gradient notes"})
    assert status == 200
    await asyncio.wait_for(renamed.wait(), 5)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Gradient notes"]

    added = _forgotten(b, "forget")
    await add(a, "Lines", GRADIENT)
    await asyncio.wait_for(added.wait(), 5)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Gradient notes", "Lines"]

    deleted = _forgotten(b, "forget")
    assert (await call(a, "DELETE", f"{URL}/{document_id}"))[0] == 200
    await asyncio.wait_for(deleted.wait(), 5)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Lines"]


async def test_a_replica_that_missed_the_announcement_reads_the_names_again(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change announced while a replica's pub/sub connection was down is not heard there: once it is back,
    it reads every course's names again."""
    a, _ = await start(replica_id="replica-a")
    b, tutor_b = await start(replica_id="replica-b")
    document_id = await add(a, "Slope notes", SLOPE)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Slope notes"]

    reconnecting, let_go = hold_pubsub_reconnects(b, monkeypatch)
    await kill_pubsub_of(b)
    await asyncio.wait_for(reconnecting.wait(), 5)
    assert (await call(a, "PUT", f"{URL}/{document_id}", json={"name": "Gradient notes"}))[0] == 200
    recovered = _forgotten(b, "forget_all")
    let_go.set()
    await asyncio.wait_for(recovered.wait(), 5)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Gradient notes"]


@pytest.mark.parametrize("redis", ["refuses", "hangs"])
async def test_a_change_is_made_when_it_cannot_be_announced(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, redis: str
) -> None:
    """Redis unavailable: the change is made and the teacher told so (at once, or after ANNOUNCE_TIMEOUT_S);
    this replica's answers have it, the others' once their cached names expire."""
    a, tutor_a = await start(replica_id="replica-a")
    b, tutor_b = await start(replica_id="replica-b")
    document_id = await add(a, "Slope notes", SLOPE)
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Slope notes"]

    async def unavailable(message: dict[str, object]) -> None:
        if redis == "hangs":
            await asyncio.Event().wait()
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(answers_module, "ANNOUNCE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(a.client.app[CHAT].hub.store, "publish_control", unavailable)
    assert (await call(a, "PUT", f"{URL}/{document_id}", json={"name": "Gradient notes"}))[0] == 200
    assert "could not announce a change of course documents" in caplog.messages
    assert (await ask(a, tutor_a, "What is slope?"))[0] == ["Gradient notes"]
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Slope notes"]  # until NAMES_TTL_S
    b.client.app[CHAT].answers.documents._names.clear()  # as if it had expired
    assert (await ask(b, tutor_b, "What is slope?"))[0] == ["Gradient notes"]
