"""PostgreSQL access: every query is scoped by tenant (and user where it applies)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .migrate import apply_migrations
from .models import (
    Conversation,
    Course,
    Message,
    MessageStatus,
    SavedQuestion,
    TenantSettings,
    UsageRecord,
    User,
)

log = logging.getLogger(__name__)

_MESSAGE_COLUMNS = (
    "id, conversation_id::text AS conversation_id, role, text, status, client_id, reply_to, seq, created_at,"
    " prompt_tokens, output_tokens"
)
_CONVERSATION_COLUMNS = (
    "id::text AS id, tenant_id, user_id::text AS user_id, course_id, title, last_seq, created_at, updated_at,"
    " ai_paused"
)


def _message(row: asyncpg.Record) -> Message:
    # Positional: _MESSAGE_COLUMNS lists Message's fields in order (tests/unit/test_storage_columns.py);
    # building a dict per row was a visible share of a turn with twenty messages of history.
    return Message(*row.values())


def _message_of(row: asyncpg.Record) -> Message:
    """A message row prefixed with save_question's `part` column."""
    return Message(*tuple(row.values())[1:])


def _conversation(row: asyncpg.Record) -> Conversation:
    return Conversation(**dict(row))


def _is_uuid(value: str) -> bool:
    # Ids come from clients; a malformed one is simply "not found", never a database error.
    if len(value) != 36:
        return False
    try:
        int(value.replace("-", ""), 16)
    except ValueError:
        return False
    return value.count("-") == 4


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo: queries leave no session state (advisory locks are released where taken,
    nothing LISTENs), so the default reset, a round trip on every release, is skipped."""


async def connect_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, attempts: int = 10) -> asyncpg.Pool:
    """Create a pool, retrying with a log line per attempt while the server starts."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, command_timeout=30, reset=_keep_session
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError) as exc:
            if attempt == attempts:
                raise
            log.warning("postgres not reachable, retrying", extra={"attempt": attempt, "error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise RuntimeError("unreachable")


class Database:
    """The product's queries over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def migrate(self) -> list[int]:
        """Apply pending migrations."""
        async with self.pool.acquire() as conn:
            return await apply_migrations(conn)

    async def ping(self) -> None:
        """Raise if the database cannot answer."""
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    # -- identities ---------------------------------------------------------------------------

    async def upsert_user(self, tenant_id: str, external_id: str, role: str, display_name: str) -> User:
        """Create or refresh the tenant and user named by verified token claims."""
        async with self._transaction() as conn:
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant_id)
            row = await conn.fetchrow(
                "INSERT INTO users (tenant_id, external_id, role, display_name) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (tenant_id, external_id) DO UPDATE"
                " SET role = EXCLUDED.role, display_name = EXCLUDED.display_name, last_seen_at = now()"
                " RETURNING id::text AS id, tenant_id, external_id, role, display_name",
                tenant_id,
                external_id,
                role,
                display_name,
            )
        assert row is not None
        return User(**dict(row))

    async def get_tenant(self, tenant_id: str) -> TenantSettings:
        """The tenant's own settings (defaults when it has none)."""
        row = await self.pool.fetchrow(
            "SELECT system_prompt, daily_token_budget, user_daily_token_budget, allowed_origins"
            " FROM tenants WHERE id = $1",
            tenant_id,
        )
        if row is None:
            return TenantSettings(tenant_id)
        return TenantSettings(
            tenant_id,
            row["system_prompt"],
            row["daily_token_budget"],
            row["user_daily_token_budget"],
            tuple(row["allowed_origins"]),
        )

    async def origin_is_allowed(self, origin: str) -> bool:
        """Whether any tenant lists this browser origin as one of its embedding origins."""
        found = await self.pool.fetchval("SELECT 1 FROM tenants WHERE $1 = ANY(allowed_origins) LIMIT 1", origin)
        return found is not None

    async def update_tenant(
        self,
        tenant_id: str,
        *,
        system_prompt: str | None = None,
        daily_token_budget: int | None = None,
        user_daily_token_budget: int | None = None,
        allowed_origins: list[str] | None = None,
    ) -> None:
        """Create the tenant if needed and set the given settings (None leaves a setting as it is)."""
        await self.pool.execute(
            "INSERT INTO tenants (id, system_prompt, daily_token_budget, user_daily_token_budget, allowed_origins)"
            " VALUES ($1, $2, $3, $4, COALESCE($5, '{}'::text[]))"
            " ON CONFLICT (id) DO UPDATE SET"
            " system_prompt = COALESCE($2, tenants.system_prompt),"
            " daily_token_budget = COALESCE($3, tenants.daily_token_budget),"
            " user_daily_token_budget = COALESCE($4, tenants.user_daily_token_budget),"
            " allowed_origins = COALESCE($5, tenants.allowed_origins)",
            tenant_id,
            system_prompt,
            daily_token_budget,
            user_daily_token_budget,
            allowed_origins,
        )

    # -- courses ------------------------------------------------------------------------------

    async def get_course(self, tenant_id: str, course_id: str) -> Course | None:
        """The tenant's course, or None."""
        row = await self.pool.fetchrow(
            "SELECT tenant_id, id, title, description, system_prompt FROM courses WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            course_id,
        )
        return Course(**dict(row)) if row else None

    async def upsert_course(
        self, tenant_id: str, course_id: str, title: str, description: str, system_prompt: str | None = None
    ) -> Course:
        """Create or update a course (the tenant must exist or is created)."""
        async with self._transaction() as conn:
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant_id)
            row = await conn.fetchrow(
                "INSERT INTO courses (tenant_id, id, title, description, system_prompt) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (tenant_id, id) DO UPDATE SET title = EXCLUDED.title,"
                " description = EXCLUDED.description, system_prompt = EXCLUDED.system_prompt"
                " RETURNING tenant_id, id, title, description, system_prompt",
                tenant_id,
                course_id,
                title,
                description,
                system_prompt,
            )
        assert row is not None
        return Course(**dict(row))

    async def list_courses(self, tenant_id: str) -> list[Course]:
        """Every course of the tenant, by title."""
        rows = await self.pool.fetch(
            "SELECT tenant_id, id, title, description, system_prompt FROM courses WHERE tenant_id = $1 ORDER BY title",
            tenant_id,
        )
        return [Course(**dict(r)) for r in rows]

    # -- conversations ------------------------------------------------------------------------

    async def get_conversation(self, tenant_id: str, user_id: str, conversation_id: str) -> Conversation | None:
        """The user's own conversation, or None (also for other users' and other tenants' ids)."""
        if not _is_uuid(conversation_id):
            return None
        row = await self.pool.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND tenant_id = $2 AND user_id = $3",
            conversation_id,
            tenant_id,
            user_id,
        )
        return _conversation(row) if row else None

    async def latest_conversation(self, tenant_id: str, user_id: str, course_id: str | None) -> Conversation | None:
        """The user's most recently active conversation in the course (or without course)."""
        row = await self.pool.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
            " WHERE tenant_id = $1 AND user_id = $2 AND course_id IS NOT DISTINCT FROM $3"
            " ORDER BY updated_at DESC LIMIT 1",
            tenant_id,
            user_id,
            course_id,
        )
        return _conversation(row) if row else None

    async def create_conversation(self, tenant_id: str, user_id: str, course_id: str | None) -> Conversation:
        """Start a new conversation for the user."""
        row = await self.pool.fetchrow(
            f"INSERT INTO conversations (tenant_id, user_id, course_id) VALUES ($1, $2, $3)"
            f" RETURNING {_CONVERSATION_COLUMNS}",
            tenant_id,
            user_id,
            course_id,
        )
        assert row is not None
        return _conversation(row)

    async def list_conversations(self, tenant_id: str, user_id: str, limit: int = 50) -> list[Conversation]:
        """The user's conversations, most recent first."""
        rows = await self.pool.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE tenant_id = $1 AND user_id = $2"
            " ORDER BY updated_at DESC LIMIT $3",
            tenant_id,
            user_id,
            limit,
        )
        return [_conversation(r) for r in rows]

    # -- messages -----------------------------------------------------------------------------

    async def recent_messages(
        self, tenant_id: str, conversation_id: str, limit: int, before: int | None = None
    ) -> list[Message]:
        """Up to `limit` messages older than `before` (or the newest), oldest first; one index scan."""
        rows = await self.pool.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE conversation_id = $1 AND tenant_id = $2 AND id < $3"
            " ORDER BY id DESC LIMIT $4",
            conversation_id,
            tenant_id,
            before if before is not None else 2**62,
            limit,
        )
        return [_message(r) for r in reversed(rows)]

    async def get_message(self, tenant_id: str, conversation_id: str, message_id: int) -> Message | None:
        """One message of the conversation, or None."""
        row = await self.pool.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3",
            message_id,
            conversation_id,
            tenant_id,
        )
        return _message(row) if row else None

    async def find_user_message(self, tenant_id: str, user_id: str, message_id: int) -> Message | None:
        """A message in any of the user's conversations, or None."""
        row = await self.pool.fetchrow(
            f"SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))} FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.id = $1 AND m.tenant_id = $2 AND c.tenant_id = $2 AND c.user_id = $3",
            message_id,
            tenant_id,
            user_id,
        )
        return _message(row) if row else None

    async def save_question(
        self, tenant_id: str, conversation_id: str, client_id: str, text: str, author_id: str, history: int = 0
    ) -> SavedQuestion:
        """Commit a student's message and its reply placeholder; a repeated client id returns the first rows.

        While a teacher has paused the AI for the conversation, no placeholder is made: the question waits.
        One statement (one round trip): the question, the placeholder and up to `history` messages before
        the question (the statement's snapshot does not see its own inserts). The conversation row is only
        written here for its first message (the title) or while the AI is paused; otherwise committing the
        answer bumps `updated_at` (each write of that row touches its four indexes).
        """
        rows = await self.pool.fetch(
            "WITH q AS ("
            "  INSERT INTO messages (tenant_id, conversation_id, role, text, status, client_id, author_id)"
            "  VALUES ($1, $2, 'user', $3, 'complete', $4, $5)"
            f"  ON CONFLICT (conversation_id, client_id) DO NOTHING RETURNING {_MESSAGE_COLUMNS}),"
            " c AS (SELECT ai_paused, title = '' AS untitled FROM conversations"
            "  WHERE id = $2 AND tenant_id = $1 AND EXISTS (SELECT 1 FROM q)),"
            " u AS ("
            "  UPDATE conversations SET updated_at = now(),"
            "  title = CASE WHEN title = '' THEN left($3, 80) ELSE title END"
            "  WHERE id = $2 AND tenant_id = $1 AND EXISTS (SELECT 1 FROM c WHERE c.ai_paused OR c.untitled)),"
            " r AS ("
            "  INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
            "  SELECT $1, $2, 'assistant', 'streaming', q.id FROM q, c WHERE NOT c.ai_paused"
            f"  RETURNING {_MESSAGE_COLUMNS}),"
            f" h AS (SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $2 AND tenant_id = $1"
            "  AND EXISTS (SELECT 1 FROM r) ORDER BY id DESC LIMIT $6)"
            " SELECT 'q' AS part, * FROM q UNION ALL SELECT 'r', * FROM r UNION ALL SELECT 'h', * FROM h",
            tenant_id,
            conversation_id,
            text,
            client_id,
            author_id,
            history,
        )
        if rows:
            question = next(_message_of(r) for r in rows if r["part"] == "q")
            reply = next((_message_of(r) for r in rows if r["part"] == "r"), None)
            before = sorted((_message_of(r) for r in rows if r["part"] == "h"), key=lambda m: m.id)
            prefetched = before if reply is not None and history > 0 else None
            return SavedQuestion(question, reply, created=True, history=prefetched)
        # A resend: the first rows, and no second answer.
        async with self.pool.acquire() as conn:
            row, _ = await self._insert_once(conn, tenant_id, conversation_id, "user", text, client_id, author_id)
            existing = await conn.fetchrow(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE reply_to = $1 AND tenant_id = $2"
                " ORDER BY id DESC LIMIT 1",
                row["id"],
                tenant_id,
            )
        return SavedQuestion(_message(row), _message(existing) if existing else None, created=False)

    @staticmethod
    async def _insert_once(
        conn: PoolConnectionProxy,
        tenant_id: str,
        conversation_id: str,
        role: str,
        text: str,
        client_id: str | None,
        author_id: str,
    ) -> tuple[asyncpg.Record, bool]:
        """Insert a written message unless its client id is already in the conversation; (row, created)."""
        row = await conn.fetchrow(
            "INSERT INTO messages (tenant_id, conversation_id, role, text, status, client_id, author_id)"
            " VALUES ($1, $2, $3, $4, 'complete', $5, $6)"
            " ON CONFLICT (conversation_id, client_id) DO NOTHING"
            f" RETURNING {_MESSAGE_COLUMNS}",
            tenant_id,
            conversation_id,
            role,
            text,
            client_id,
            author_id,
        )
        if row is not None:
            return row, True
        existing = await conn.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND client_id = $2 AND tenant_id = $3",
            conversation_id,
            client_id,
            tenant_id,
        )
        assert existing is not None
        return existing, False

    @staticmethod
    async def _insert_reply(
        conn: PoolConnectionProxy, tenant_id: str, conversation_id: str, question_id: int
    ) -> Message:
        reply = await conn.fetchrow(
            "INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
            " VALUES ($1, $2, 'assistant', 'streaming', $3)"
            f" RETURNING {_MESSAGE_COLUMNS}",
            tenant_id,
            conversation_id,
            question_id,
        )
        assert reply is not None
        return _message(reply)

    async def create_reply(self, tenant_id: str, conversation_id: str, question_id: int) -> Message:
        """A new answer placeholder for an existing question (regenerate, or after the AI is resumed)."""
        async with self._transaction() as conn:
            return await self._insert_reply(conn, tenant_id, conversation_id, question_id)

    async def set_message_seq(self, tenant_id: str, message_id: int, seq: int) -> None:
        """Remember the seq of a message's ack, so a resend gets the same ack."""
        await self.pool.execute(
            "UPDATE messages SET seq = $3 WHERE id = $1 AND tenant_id = $2", message_id, tenant_id, seq
        )

    async def unanswered_question(self, tenant_id: str, conversation_id: str) -> Message | None:
        """The newest student message if nothing (answer or teacher message) came after it."""
        row = await self.pool.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND tenant_id = $2"
            " ORDER BY id DESC LIMIT 1",
            conversation_id,
            tenant_id,
        )
        if row is None or row["role"] != "user":
            return None
        return _message(row)

    async def save_teacher_message(
        self, tenant_id: str, conversation_id: str, client_id: str | None, text: str, author_id: str
    ) -> tuple[Message, bool]:
        """Commit a teacher's message to a student's conversation (idempotent on the client id)."""
        async with self._transaction() as conn:
            row, created = await self._insert_once(
                conn, tenant_id, conversation_id, "teacher", text, client_id, author_id
            )
            if not created:
                return _message(row), False
            await conn.execute(
                "UPDATE conversations SET updated_at = now() WHERE id = $1 AND tenant_id = $2",
                conversation_id,
                tenant_id,
            )
        return _message(row), True

    async def set_ai_paused(self, tenant_id: str, conversation_id: str, paused: bool) -> None:
        await self.pool.execute(
            "UPDATE conversations SET ai_paused = $3 WHERE id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
            paused,
        )

    async def tenant_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        """Any conversation of the tenant (for teachers; the caller checks the course)."""
        if not _is_uuid(conversation_id):
            return None
        row = await self.pool.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
        )
        return _conversation(row) if row else None

    async def add_flag(
        self, tenant_id: str, conversation_id: str, message_id: int | None, kind: str, detail: str = ""
    ) -> int:
        """Record something a teacher should see (a safety block, repeated failures)."""
        flag_id = await self.pool.fetchval(
            "INSERT INTO message_flags (tenant_id, conversation_id, message_id, kind, detail)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            tenant_id,
            conversation_id,
            message_id,
            kind,
            detail,
        )
        return int(flag_id)

    async def finish_reply(
        self,
        tenant_id: str,
        user_id: str,
        conversation_id: str,
        reply_id: int,
        text: str,
        status: MessageStatus,
        seq: int,
        usage: UsageRecord | None,
        question: tuple[int, int] | None = None,
    ) -> bool:
        """Commit the answer's final text and status (only if still streaming), its usage row and the
        question's ack seq (`question` = (id, seq)), in one statement; False if it had already ended."""
        updated = await self.pool.fetchval(
            "WITH m AS ("
            "  UPDATE messages SET text = $4, status = $5, seq = $6, prompt_tokens = $7, output_tokens = $8,"
            "  updated_at = clock_timestamp()"
            "  WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3 AND status = 'streaming' RETURNING id),"
            " u AS ("
            "  INSERT INTO ai_usage (tenant_id, user_id, conversation_id, message_id, provider, model,"
            "  prompt_tokens, output_tokens, ttft_ms, duration_ms, status, passage_ids)"
            "  SELECT $3, $9, $2, m.id, $10, $11, $7, $8, $12, $13, $5, $14 FROM m WHERE $10::text IS NOT NULL),"
            " q AS ("
            "  UPDATE messages SET seq = $16 WHERE id = $15 AND tenant_id = $3 AND $16::bigint > 0"
            "  AND EXISTS (SELECT 1 FROM m)),"
            " c AS ("
            "  UPDATE conversations SET updated_at = now(), last_seq = GREATEST(last_seq, $6)"
            "  WHERE id = $2 AND tenant_id = $3 AND EXISTS (SELECT 1 FROM m))"
            " SELECT id FROM m",
            reply_id,
            conversation_id,
            tenant_id,
            text,
            status,
            seq,
            usage.prompt_tokens if usage else None,
            usage.output_tokens if usage else None,
            user_id,
            usage.provider if usage else None,
            usage.model if usage else None,
            usage.ttft_ms if usage else None,
            usage.duration_ms if usage else None,
            list(usage.passage_ids) if usage else [],
            question[0] if question else 0,
            question[1] if question else 0,
        )
        return updated is not None
