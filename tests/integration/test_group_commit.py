"""Group commit: questions and answers committed at the same time share one statement and one commit,
and still come back one by one, each with its own outcome (PostgreSQL, no sockets)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.settings import Settings
from storage.errors import NotFoundError
from storage.models import Conversation, PastMessage, UsageRecord, User
from storage.postgres import Database, connect_pool
from tests.conftest import commit_then_lose_the_reply

pytestmark = pytest.mark.integration

USAGE = UsageRecord("offline", "offline-tutor", 12, 4, 1.5, 20.0, (3, 5))


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    pool = await connect_pool(settings.database_url, min_size=1, max_size=4)
    database = Database(pool)
    await pool.execute("INSERT INTO tenants (id, name) VALUES ('school-a', 'A'), ('school-b', 'B')")
    yield database
    await pool.close()


async def _student(database: Database, conversations: int = 1) -> tuple[User, list[Conversation]]:
    user = await database.upsert_user("school-a", f"student-{uuid.uuid4().hex[:6]}", "student", "Sam")
    return user, [await database.create_conversation("school-a", user.id, None) for _ in range(conversations)]


async def _transactions(db: asyncpg.Connection, ids: list[int]) -> set[int]:
    """The transactions (xmin) that last wrote these message rows."""
    rows = await db.fetch("SELECT xmin::text::bigint AS x FROM messages WHERE id = any($1::bigint[])", ids)
    assert len(rows) == len(ids)
    return {row["x"] for row in rows}


async def test_questions_submitted_together_share_one_commit(database: Database, db: asyncpg.Connection) -> None:
    user, conversations = await _student(database, conversations=5)
    saved = await asyncio.gather(*(
        database.save_question("school-a", c.id, f"m-{n}", f"question {n}", user.id, history=10)
        for n, c in enumerate(conversations)
    ))
    assert [s.message.text for s in saved] == [f"question {n}" for n in range(5)]
    assert all(s.created and s.reply is not None and s.reply.status == "streaming" for s in saved)
    assert all(s.reply is not None and s.reply.reply_to == s.message.id for s in saved)
    assert all(s.message.conversation_id == c.id for s, c in zip(saved, conversations, strict=True))
    assert all(s.history == [] for s in saved)  # nothing came before, and the batch's own rows are not history
    ids = [s.message.id for s in saved] + [s.reply.id for s in saved if s.reply]
    assert len(await _transactions(db, ids)) == 1
    titles = await db.fetch("SELECT title FROM conversations WHERE user_id = $1 ORDER BY title", uuid.UUID(user.id))
    assert [r["title"] for r in titles] == [f"question {n}" for n in range(5)]


async def test_a_conversations_second_question_in_a_batch_sees_the_first(database: Database) -> None:
    user, [conversation] = await _student(database)
    first, second = await asyncio.gather(
        database.save_question("school-a", conversation.id, "m-1", "first", user.id, history=10),
        database.save_question("school-a", conversation.id, "m-2", "second", user.id, history=10),
    )
    assert first.reply is not None and second.reply is not None
    assert first.message.id < first.reply.id < second.message.id < second.reply.id
    assert second.history is not None
    assert [m.id for m in second.history] == [first.message.id, first.reply.id]


async def test_the_history_comes_back_with_what_a_prompt_needs_alone_and_in_a_batch(database: Database) -> None:
    user, conversations = await _student(database, conversations=2)
    expected: dict[str, list[PastMessage]] = {}
    for n, conversation in enumerate(conversations):
        first = await database.save_question("school-a", conversation.id, "m-1", f"what is {n}?", user.id)
        assert first.reply is not None
        # The first conversation's answer was stopped by a safety filter: its history says so.
        await database.finish_reply("school-a", user.id, conversation.id, first.reply.id, f"{n} is a number",
                                    "complete", 3, None, blocked=n == 0)
        expected[conversation.id] = [
            PastMessage(first.message.id, "user", f"what is {n}?", "complete", None, False),
            PastMessage(first.reply.id, "assistant", f"{n} is a number", "complete", first.message.id, n == 0),
        ]
    alone = await database.save_question("school-a", conversations[0].id, "m-2", "and?", user.id, history=10)
    together = await asyncio.gather(*(  # one statement for both: the batch form
        database.save_question("school-a", c.id, "m-3", "so?", user.id, history=10) for c in conversations
    ))
    assert alone.history == expected[conversations[0].id]
    assert alone.reply is not None
    latest = [*expected[conversations[0].id], PastMessage(alone.message.id, "user", "and?", "complete", None, False),
              PastMessage(alone.reply.id, "assistant", "", "streaming", alone.message.id, False)]
    assert [s.history for s in together] == [latest, expected[conversations[1].id]]


async def test_a_resend_in_the_same_batch_gets_the_first_rows(database: Database) -> None:
    user, [conversation] = await _student(database)
    first, again = await asyncio.gather(
        database.save_question("school-a", conversation.id, "m-1", "hello", user.id, history=10),
        database.save_question("school-a", conversation.id, "m-1", "hello", user.id, history=10),
    )
    assert first.created and not again.created
    assert again.message.id == first.message.id
    assert first.reply is not None and again.reply is not None and again.reply.id == first.reply.id


async def test_one_bad_question_fails_alone(database: Database, db: asyncpg.Connection) -> None:
    user, conversations = await _student(database, conversations=4)
    gone = str(uuid.uuid4())  # no such conversation: not found, and nothing written
    outcomes = await asyncio.gather(
        database.save_question("school-a", conversations[0].id, "m-1", "one", user.id),
        database.save_question("school-a", gone, "m-2", "lost", user.id),
        database.save_question("school-a", conversations[1].id, "m-3", "three", user.id),
        # PostgreSQL refuses a NUL in text: the batch's statement fails, and each question is tried alone.
        database.save_question("school-a", conversations[2].id, "m-4", "nul \x00", user.id),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], NotFoundError)
    assert isinstance(outcomes[3], asyncpg.PostgresError)
    assert [o.message.text for o in (outcomes[0], outcomes[2]) if not isinstance(o, BaseException)] == ["one", "three"]
    texts = await db.fetch("SELECT text FROM messages WHERE role = 'user' ORDER BY id")
    assert [r["text"] for r in texts] == ["one", "three"]


async def test_a_paused_conversation_gets_no_placeholder_in_a_batch(database: Database) -> None:
    # Two students: a pause covers all of one student's conversations in a course.
    (held, [paused]), (other, [live]) = await _student(database), await _student(database)
    await database.set_ai_paused("school-a", held.id, paused.course_id, True)
    waiting, answered = await asyncio.gather(
        database.save_question("school-a", paused.id, "m-1", "hold on", held.id, history=10),
        database.save_question("school-a", live.id, "m-2", "go", other.id, history=10),
    )
    assert waiting.created and waiting.reply is None and waiting.history is None
    assert answered.reply is not None


async def test_answers_finished_together_share_one_commit(database: Database, db: asyncpg.Connection) -> None:
    user, conversations = await _student(database, conversations=3)
    saved = await asyncio.gather(*(
        database.save_question("school-a", c.id, "m-1", "why?", user.id) for c in conversations
    ))
    replies = [s.reply.id for s in saved if s.reply]
    results = await asyncio.gather(
        database.finish_reply("school-a", user.id, conversations[0].id, replies[0], "because", "complete", 5, USAGE,
                              question=(saved[0].message.id, 4), truncated=True),
        database.finish_reply("school-a", user.id, conversations[1].id, replies[1], "stop", "failed", 7, None,
                              error=("ai_declined", False)),
        # A guessed id with another tenant: nothing changes.
        database.finish_reply("school-b", user.id, conversations[2].id, replies[2], "leak", "complete", 9, None),
    )
    assert results == [True, True, False]
    assert len(await _transactions(db, replies[:2])) == 1
    columns = "id, text, status, seq, truncated, error_code, retryable"
    rows = {r["id"]: r for r in await db.fetch(f"SELECT {columns} FROM messages")}
    assert (rows[replies[0]]["text"], rows[replies[0]]["status"], rows[replies[0]]["seq"]) == ("because", "complete", 5)
    assert rows[saved[0].message.id]["seq"] == 4
    assert (rows[replies[1]]["text"], rows[replies[1]]["status"]) == ("stop", "failed")
    # How each ended, in the same statement: a cut answer, and a failure asking again cannot fix.
    outcome = ("truncated", "error_code", "retryable")
    assert [tuple(rows[r][k] for k in outcome) for r in replies] == [
        (True, None, None), (False, "ai_declined", False), (False, None, None)
    ]
    assert (rows[replies[2]]["text"], rows[replies[2]]["status"]) == ("", "streaming")
    usage = await db.fetch("SELECT message_id, passage_ids, prompt_tokens FROM ai_usage")
    assert [(r["message_id"], r["passage_ids"], r["prompt_tokens"]) for r in usage] == [(replies[0], [3, 5], 12)]
    seqs = await db.fetch("SELECT id::text AS id, last_seq FROM conversations WHERE user_id = $1", uuid.UUID(user.id))
    last_seqs = {r["id"]: r["last_seq"] for r in seqs}
    assert last_seqs == {conversations[0].id: 5, conversations[1].id: 7, conversations[2].id: 0}


async def test_an_answer_already_ended_or_invalid_fails_alone(database: Database) -> None:
    user, conversations = await _student(database, conversations=2)
    saved = await asyncio.gather(*(
        database.save_question("school-a", c.id, "m-1", "why?", user.id) for c in conversations
    ))
    replies = [s.reply.id for s in saved if s.reply]
    assert await database.finish_reply("school-a", user.id, conversations[0].id, replies[0], "a", "complete", 1, None)
    outcomes = await asyncio.gather(
        database.finish_reply("school-a", user.id, conversations[0].id, replies[0], "again", "complete", 2, None),
        database.finish_reply("school-a", user.id, conversations[1].id, replies[1], "x", "bogus", 2, None),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert outcomes[0] is False
    assert isinstance(outcomes[1], asyncpg.CheckViolationError)
    # The failed one is still streaming and can be finished properly.
    assert await database.finish_reply("school-a", user.id, conversations[1].id, replies[1], "ok", "complete", 3, None)


async def test_a_guessed_conversation_of_another_tenant_or_student_is_never_written(
    database: Database, db: asyncpg.Connection
) -> None:
    """Callers check the conversation first; the storage layer refuses on its own all the same (every
    write is scoped by tenant), alone and in a batch, for questions, teachers' messages, replies and flags."""
    user, [mine, other] = await _student(database, conversations=2)
    classmate, _ = await _student(database)
    stranger = await database.upsert_user("school-b", "stranger", "teacher", "Eve")
    question = await database.save_question("school-a", mine.id, "m-1", "mine", user.id)
    before = await db.fetchval("SELECT count(*) FROM messages")

    with pytest.raises(NotFoundError):
        await database.save_question("school-b", mine.id, "m-2", "leak", stranger.id)
    with pytest.raises(NotFoundError):  # same tenant, another student's conversation
        await database.save_question("school-a", mine.id, "m-3", "leak", classmate.id)
    together = await asyncio.gather(
        database.save_question("school-a", other.id, "m-4", "fine", user.id),
        database.save_question("school-b", mine.id, "m-5", "leak", stranger.id),
        return_exceptions=True,
    )
    assert not isinstance(together[0], BaseException) and together[0].created
    assert isinstance(together[1], NotFoundError)
    with pytest.raises(NotFoundError):
        await database.save_teacher_message("school-b", mine.id, "t-1", "leak", stranger.id)
    with pytest.raises(NotFoundError):
        await database.create_reply("school-b", mine.id, question.message.id)
    with pytest.raises(NotFoundError):
        await database.add_flag("school-b", mine.id, question.message.id, "safety_block")

    rows = await db.fetch("SELECT tenant_id, text FROM messages WHERE text <> '' ORDER BY id")
    assert [(r["tenant_id"], r["text"]) for r in rows] == [("school-a", "mine"), ("school-a", "fine")]
    assert await db.fetchval("SELECT count(*) FROM messages") == before + 2  # "fine" and its placeholder
    assert await db.fetchval("SELECT count(*) FROM message_flags") == 0


async def test_a_conversation_id_in_capitals_is_the_same_conversation_in_a_batch(
    database: Database, db: asyncpg.Connection
) -> None:
    """A batch puts a conversation's second question in the next statement; ids that differ only in case
    (PostgreSQL compares them as uuids) are one conversation, so they do not share a statement."""
    user, [conversation] = await _student(database)
    first, second = await asyncio.gather(
        database.save_question("school-a", conversation.id, "m-1", "first", user.id, history=10),
        database.save_question("school-a", conversation.id.upper(), "m-2", "second", user.id, history=10),
    )
    assert (first.message.text, second.message.text) == ("first", "second")
    assert first.reply is not None and second.reply is not None
    assert (first.reply.reply_to, second.reply.reply_to) == (first.message.id, second.message.id)
    assert second.history is not None and [m.id for m in second.history] == [first.message.id, first.reply.id]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 2
    with pytest.raises(NotFoundError):
        await database.save_question("school-a", "not-a-uuid", "m-3", "lost", user.id)


async def test_answers_whose_batch_committed_but_whose_reply_was_lost_count_as_committed(
    database: Database, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each answer is then tried alone and finds itself no longer streaming: it is in exactly the state
    being committed, so it was this batch's own commit (True: its `done` is sent), not another replica's."""
    user, conversations = await _student(database, conversations=3)
    saved = await asyncio.gather(*(
        database.save_question("school-a", c.id, "m-1", "?", user.id) for c in conversations
    ))
    replies = [s.reply.id for s in saved if s.reply]
    assert await database.finish_reply("school-a", user.id, conversations[2].id, replies[2], "x", "stopped", 4, None)
    monkeypatch.setattr(database, "_update_replies", commit_then_lose_the_reply(database._update_replies))
    results = await asyncio.gather(*(
        database.finish_reply("school-a", user.id, c.id, r, f"answer {n}", "complete", 3, USAGE)
        for n, (c, r) in enumerate(zip(conversations, replies, strict=True))
    ))
    assert results == [True, True, False]  # the third had already ended, as another replica's takeover
    rows = await db.fetch("SELECT text, status FROM messages WHERE id = any($1::bigint[]) ORDER BY id", replies)
    assert [(r["text"], r["status"]) for r in rows] == [("answer 0", "complete"), ("answer 1", "complete"),
                                                        ("x", "stopped")]
    assert await db.fetchval("SELECT count(*) FROM ai_usage") == 2
