"""A turn reads the same few history rows at a conversation's 100th question as at its 10th: PostgreSQL reads
the newest messages through the index and stops, with many schools in the same tables (PostgreSQL, no
sockets)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from server.settings import Settings
from storage.models import Conversation
from storage.postgres import _RECENT_BEFORE, _RECENT_NEWEST, _SAVE_ONE, Database, connect_pool

pytestmark = pytest.mark.integration

LONG = 150  # messages in the conversation under test
HISTORY = 20
# Other conversations' messages, of many schools. A tenant filter on the messages made PostgreSQL divide its
# estimate of a conversation's rows by the number of schools; expecting fewer rows than the history, it read
# the whole conversation and sorted it instead of reading the index in order.
SCHOOLS = 20
FILLER = 40_000
SHORT = 5  # conversations per school


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    pool = await connect_pool(settings.database_url, min_size=1, max_size=2)
    yield Database(pool)
    await pool.close()


async def _long_conversation(database: Database, db: asyncpg.Connection) -> tuple[str, Conversation]:
    """A conversation of LONG messages in school-a, beside short ones of school-a and school-b."""
    user = await database.upsert_user("school-a", f"student-{uuid.uuid4().hex[:6]}", "student", "Sam")
    for tenant in ["school-a", "school-b"] + [f"school-{n}" for n in range(SCHOOLS - 2)]:
        other = await database.upsert_user(tenant, f"other-{uuid.uuid4().hex[:6]}", "student", "Kim")
        shorts = [(await database.create_conversation(tenant, other.id, None)).id for _ in range(SHORT)]
        await db.execute(
            "INSERT INTO messages (tenant_id, conversation_id, role, text, status)"
            " SELECT $1, c, 'user', 'a short one', 'complete' FROM unnest($2::uuid[]) c, generate_series(1, $3)",
            tenant, shorts, FILLER // SHORT // SCHOOLS,
        )
    conversation = await database.create_conversation("school-a", user.id, None)
    await db.execute(
        "INSERT INTO messages (tenant_id, conversation_id, role, text, status)"
        " SELECT 'school-a', $1::uuid, 'user', 'question ' || n, 'complete' FROM generate_series(1, $2) n",
        conversation.id, LONG,
    )
    return user.id, conversation


def _messages_read(node: dict[str, Any]) -> int:
    """Rows that the plan's scans of `messages` produced (an insert into it is not a scan)."""
    own = 0
    if node.get("Relation Name") == "messages" and "Scan" in node["Node Type"]:
        own = int(node["Actual Rows"]) * int(node["Actual Loops"])
    return own + sum(_messages_read(child) for child in node.get("Plans", []))


async def _explain(db: asyncpg.Connection, sql: str, *args: object) -> int:
    transaction = db.transaction()
    await transaction.start()
    try:  # EXPLAIN ANALYZE runs the statement: whatever it writes is rolled back
        [plan] = orjson.loads(await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
    finally:
        await transaction.rollback()
    return _messages_read(plan["Plan"])


async def test_history_is_read_through_the_index(database: Database, db: asyncpg.Connection) -> None:
    user_id, conversation = await _long_conversation(database, db)
    await db.execute("ANALYZE messages, conversations")  # what autovacuum keeps up to date

    # Committing a question reads its history in the same statement.
    read = await _explain(db, _SAVE_ONE, "school-a", conversation.id, "Why?", uuid.uuid4().hex, user_id, HISTORY)
    assert read <= HISTORY + 1, f"read {read} message rows for a history of {HISTORY}"
    # The welcome's history and the pages before it.
    assert await _explain(db, _RECENT_NEWEST, conversation.id, "school-a", HISTORY + 1) <= HISTORY + 1
    assert await _explain(db, _RECENT_BEFORE, conversation.id, "school-a", HISTORY + 1, 2**62) <= 2 * LONG

    newest = await database.recent_messages("school-a", conversation.id, HISTORY)
    assert [m.text for m in newest] == [f"question {n}" for n in range(LONG - HISTORY + 1, LONG + 1)]
    older = await database.recent_messages("school-a", conversation.id, 5, before=newest[0].id)
    assert [m.text for m in older] == [f"question {n}" for n in range(LONG - HISTORY - 4, LONG - HISTORY + 1)]
    # The tenant is checked on the conversation: another school's guess of its id reads nothing.
    assert await database.recent_messages("school-b", conversation.id, HISTORY) == []
    assert await database.recent_messages("school-b", conversation.id, HISTORY, before=2**62) == []
