"""PostgreSQL access: every query is scoped by tenant (and user where it applies)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import operator
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .errors import ClientIdTakenError, NotFoundError, UserErasedError
from .migrate import apply_migrations
from .models import (
    Conversation,
    Course,
    Message,
    MessageStatus,
    PastMessage,
    SavedQuestion,
    TenantSettings,
    UsageRecord,
    User,
)
from .roundtrips import RoundTrips

log = logging.getLogger(__name__)

# What a database restart or fail-over raises (connection lost or refused, server shutting down or starting
# up, no answer in time, a demoted primary refusing writes): the same statement can succeed once PostgreSQL
# is back. (A stale pooled connection's errors are handled by `_Statements`.)
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
)

T = TypeVar("T")
R = TypeVar("R")


def subject_hash(tenant_id: str, external_id: str) -> bytes:
    """What an erasure record keeps of the person: enough to recognise their tokens' claims, not their id."""
    return hashlib.sha256(f"{tenant_id}\x00{external_id}".encode()).digest()


@dataclass(frozen=True, slots=True)
class Erasure:
    """A user erased by `smartedu delete-user`: tokens issued until `deleted_at` are refused until `expires_at`."""

    tenant_id: str
    subject: bytes
    deleted_at: datetime
    expires_at: datetime

_MESSAGE_COLUMNS = (
    "id, conversation_id::text AS conversation_id, role, text, status, client_id, reply_to, seq, created_at,"
    " prompt_tokens, output_tokens, truncated, error_code, retryable, blocked"
)
_HISTORY_COLUMNS = (
    "h.id, NULL, h.role, h.text, h.status, NULL, h.reply_to, NULL, NULL, NULL, NULL, NULL, NULL, NULL, h.blocked"
)
_CONVERSATION_COLUMNS = (
    "id::text AS id, tenant_id, user_id::text AS user_id, course_id, title, last_seq, created_at, updated_at,"
    " ai_paused"
)


def _message(row: asyncpg.Record) -> Message:
    # Positional: _MESSAGE_COLUMNS lists Message's fields in order (tests/unit/test_storage_columns.py);
    # building a dict per row was a visible share of a turn with twenty messages of history.
    return Message(*row.values())


_by_id = operator.itemgetter(0)  # a PastMessage's id


@dataclass(frozen=True, slots=True)
class _Question:
    """A student's message waiting for its batch's commit."""

    tenant_id: str
    conversation_id: str
    client_id: str
    text: str
    author_id: str
    history: int

    def params(self) -> tuple[Any, ...]:
        """The statements' parameters, in order ($1..$6)."""
        return (self.tenant_id, self.conversation_id, self.text, self.client_id, self.author_id, self.history)


@dataclass(frozen=True, slots=True)
class _Reply:
    """An answer's final state waiting for its batch's commit."""

    tenant_id: str
    user_id: str
    conversation_id: str
    reply_id: int
    text: str
    status: MessageStatus
    seq: int
    usage: UsageRecord | None
    question: tuple[int, int]  # (id, seq of its ack); (0, 0): nothing to store
    truncated: bool = False
    error: tuple[str, bool] | None = None  # a failed answer's (error code, retryable)
    blocked: bool = False  # a complete answer a safety filter stopped

    def params(self) -> tuple[Any, ...]:
        """The statements' parameters, in order ($1..$20); the passages as an array literal (a batch
        cannot pass arrays of arrays of different lengths)."""
        u = self.usage
        return (
            self.reply_id, self.conversation_id, self.tenant_id, self.text, self.status, self.seq,
            u.prompt_tokens if u else None, u.output_tokens if u else None, self.user_id,
            u.provider if u else None, u.model if u else None, u.ttft_ms if u else None,
            u.duration_ms if u else None, "{" + ",".join(map(str, u.passage_ids)) + "}" if u else "{}",
            self.question[0], self.question[1], self.truncated,
            self.error[0] if self.error else None, self.error[1] if self.error else None, self.blocked,
        )


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Parameter tuples, one per item -> one array per parameter (for the batch statements' unnest)."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _each_alone_on_failure(
    run: Callable[[list[T]], Awaitable[Sequence[R]]],
    items: list[T],
    alone: Callable[[list[T]], Awaitable[Sequence[R]]] | None = None,
) -> list[R | Exception]:
    """`run` on the whole batch; if that fails, `alone` (else `run`, then only for two items or more) on
    each item by itself, so one bad item fails by itself and the others are still committed."""
    try:
        return list(await run(items))
    except Exception as exc:
        if len(items) == 1 and alone is None:
            return [exc]
    results: list[R | Exception] = []
    for item in items:
        try:
            [result] = await (alone or run)([item])
            results.append(result)
        except Exception as exc:
            results.append(exc)
    return results


# A committed question, None for a resend (its client id was already there), or why it failed.
_Saved = SavedQuestion | Exception | None

# Questions (or answers) in one statement at most; more wait for the next (a bigger statement would hold
# the first ones' acks back longer than the commits it saves).
COMMIT_BATCH = 64


def _conversation(row: asyncpg.Record) -> Conversation:
    return Conversation(**dict(row))


def _is_uuid(value: str) -> bool:
    """Whether an id is a UUID in its canonical form, in either case (what PostgreSQL is sure to accept).
    Ids come from clients; a malformed one is simply "not found", never a database error."""
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _canonical(conversation_id: str) -> str:
    """The id as PostgreSQL prints it (lower case, hyphens): batches group questions by conversation on
    the string, and the statements compare ids as uuids. `NotFoundError` for anything else."""
    try:
        return str(uuid.UUID(conversation_id))
    except ValueError:
        raise NotFoundError("conversation") from None


class _Statements:
    """One-statement calls on the pool. A statement given a pooled connection that PostgreSQL had already
    closed (a restart, a fail-over or pg_terminate_backend while it sat idle) before this process noticed is
    sent once more, on another connection: it was not applied (`_not_applied`), so it cannot be applied
    twice, and a stale connection does not become the student's error."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(query, *args))  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(query, *args))  # type: ignore[no-any-return]

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run(lambda conn: conn.fetchval(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return await self._run(lambda conn: conn.execute(query, *args))  # type: ignore[no-any-return]

    async def _run(self, call: Callable[[PoolConnectionProxy], Awaitable[Any]]) -> Any:
        # After a restart every idle connection is stale: as many attempts as the pool holds, and one more.
        attempts = self._pool.get_max_size() + 1
        for attempt in range(1, attempts + 1):
            async with self._pool.acquire() as conn:
                try:
                    return await call(conn)
                except (asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresError) as exc:
                    if attempt == attempts or not _not_applied(exc, conn):
                        raise
                    conn.terminate()  # the pool opens a new one in its place
                    log.warning("stale PostgreSQL connection replaced; statement sent again", extra={"error": str(exc)})
        raise AssertionError("unreachable")


def _not_applied(exc: Exception, conn: PoolConnectionProxy) -> bool:
    """Whether a statement failed on a connection PostgreSQL had closed without applying it: asyncpg found
    the connection closed, or still reading the FATAL sent before the close, and refused to send it; or the
    reply was that FATAL (a terminated backend rolls back what it was running). A connection lost while
    the statement was on its way is not one: it may have committed."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError))
    return isinstance(exc, asyncpg.InternalClientError) or conn.is_closed()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo: queries leave no session state (advisory locks are released where taken,
    nothing LISTENs), so the default reset, a round trip on every release, is skipped."""


# A connection whose server vanished without closing it (a fail-over, a host gone) is given up after about
# this many seconds of silence, instead of when the statement timeout (30 s) or the system's retransmissions
# (minutes) end a statement sent on it. 0: no keepalive.
DB_KEEPALIVE_S = 12
KEEPALIVE_PROBES = 3


def keepalive_options(dead_after_s: int) -> tuple[int, int, int]:
    """(TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) that give up a silent connection after `dead_after_s`."""
    interval = max(1, dead_after_s // (2 * KEEPALIVE_PROBES))
    return max(1, dead_after_s - KEEPALIVE_PROBES * interval), interval, KEEPALIVE_PROBES


def connection_socket(conn: asyncpg.Connection) -> socket.socket | None:
    """The socket of a connection (asyncpg has no public accessor; its transport is asyncio's)."""
    transport = getattr(conn, "_transport", None)
    sock: socket.socket | None = None if transport is None else transport.get_extra_info("socket")
    return sock


def keep_alive(sock: socket.socket | None, dead_after_s: int) -> None:
    """Switch on TCP keepalive (and TCP_USER_TIMEOUT, which also bounds data left unacknowledged, where
    keepalive does not probe) so that a peer gone silent is noticed after `dead_after_s`. A Unix socket
    (the embedded PostgreSQL) has no TCP and is left alone."""
    if sock is None or dead_after_s <= 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = keepalive_options(dead_after_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Linux names; other systems keep their defaults for what they do not name this way.
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count),
                        ("TCP_USER_TIMEOUT", dead_after_s * 1000)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def connect_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    attempts: int = 10,
    connect_timeout: float = 5.0,
    keepalive_s: int = DB_KEEPALIVE_S,
) -> asyncpg.Pool:
    """Create a pool, retrying with a log line per attempt while the server starts. Each new connection
    (the pool's later ones too, after a database restart) gives up after `connect_timeout` seconds, and
    one that falls silent after `keepalive_s`."""

    async def init(conn: asyncpg.Connection) -> None:
        keep_alive(connection_socket(conn), keepalive_s)

    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, command_timeout=30, reset=_keep_session,
                timeout=connect_timeout, init=init,
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


ProbeConnect = Callable[[], Awaitable[asyncpg.Connection]]


def probe_connector(dsn: str, *, connect_timeout: float = 5.0, keepalive_s: int = DB_KEEPALIVE_S) -> ProbeConnect:
    """How `Database.ping` opens its own connection, outside the pool."""

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        keep_alive(connection_socket(conn), keepalive_s)
        return conn

    return connect


# Committing questions: each question, its reply placeholder (none while a teacher has paused the AI) and up
# to `history` messages before it (the statement's snapshot does not see its own inserts), as rows of
# (n: the question's place in the batch, part: q / r / h, the message). The conversation row is only written
# for its first message (the title) or while the AI is paused; otherwise committing the answer bumps
# `updated_at` (each write of that row touches its four indexes).
#
# A question is only inserted into a conversation of its tenant and its author (`o`, read by primary key
# before the insert instead of after it): nothing is written into a conversation named by a guessed id, and
# the caller sees it as not found (`NotFoundError`, from `save_question`'s resend path).
#
# The history is read by conversation only: the conversation was found in the caller's tenant (`c`), and
# without `r` (which needs `c`) there is none. A tenant filter on the messages themselves made PostgreSQL
# multiply the two estimates: with no statistics yet, or several tenants in the table, it expected about
# one row and read and sorted every message of the conversation instead of the last few through the index
# (docs/benchmarks.md, third round). `_RECENT` reads the history pages the same way.
#
# A history row carries only what the answer's prompt needs, in the places of `_MESSAGE_COLUMNS`, the other
# columns NULL: decoding twenty full rows (uuids, timestamps) and building a model of each cost the replica
# 0.04-0.07 ms of CPU per turn, about 6 % of all it spends on a turn (docs/benchmarks.md, fifth round).
#
# One question alone: plain parameters. PostgreSQL plans the batch form for every call, which costs twice
# the single form's server time for one question and less from two on (docs/benchmarks.md).
_SAVE_ONE = (
    "WITH o AS (SELECT ai_paused, title = '' AS untitled FROM conversations"
    "  WHERE id = $2 AND tenant_id = $1 AND user_id = $5),"
    " q AS ("
    "  INSERT INTO messages (tenant_id, conversation_id, role, text, status, client_id, author_id)"
    "  SELECT $1, $2, 'user', $3, 'complete', $4, $5 FROM o"
    f"  ON CONFLICT (conversation_id, client_id) DO NOTHING RETURNING {_MESSAGE_COLUMNS}),"
    " c AS (SELECT * FROM o WHERE EXISTS (SELECT 1 FROM q)),"
    " u AS ("
    "  UPDATE conversations SET updated_at = now(),"
    "  title = CASE WHEN title = '' THEN left($3, 80) ELSE title END"
    "  WHERE id = $2 AND tenant_id = $1 AND EXISTS (SELECT 1 FROM c WHERE c.ai_paused OR c.untitled)),"
    " r AS ("
    "  INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
    "  SELECT $1, $2, 'assistant', 'streaming', q.id FROM q, c WHERE NOT c.ai_paused"
    f"  RETURNING {_MESSAGE_COLUMNS}),"
    " h AS (SELECT id, role, text, status, reply_to, blocked FROM messages WHERE conversation_id = $2"
    "  AND EXISTS (SELECT 1 FROM r) ORDER BY id DESC LIMIT $6)"
    " SELECT 1 AS n, 'q' AS part, * FROM q UNION ALL SELECT 1, 'r', * FROM r"
    f" UNION ALL SELECT 1, 'h', {_HISTORY_COLUMNS} FROM h"
)
# A batch of questions of distinct conversations. Conversations are looked up by primary key only, through
# LATERAL ... LIMIT 1 and a tenant check the planner cannot turn into an index scan on tenant_id: with
# fresh statistics it took the tenant's index and read every conversation of the tenant for each one.
_SAVE_MANY = (
    "WITH i AS ("
    "  SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::int[])"
    "  WITH ORDINALITY AS i(tenant_id, conversation_id, text, client_id, author_id, history, n)),"
    " o AS ("
    "  SELECT i.*, v.ai_paused, v.title = '' AS untitled FROM i CROSS JOIN LATERAL ("
    "  SELECT ai_paused, title FROM conversations"
    "  WHERE id = i.conversation_id AND tenant_id = i.tenant_id AND user_id = i.author_id LIMIT 1) v),"
    " q AS ("
    "  INSERT INTO messages (tenant_id, conversation_id, role, text, status, client_id, author_id)"
    "  SELECT tenant_id, conversation_id, 'user', text, 'complete', client_id, author_id FROM o ORDER BY n"
    f"  ON CONFLICT (conversation_id, client_id) DO NOTHING RETURNING {_MESSAGE_COLUMNS}),"
    " c AS ("
    "  SELECT o.n, o.tenant_id, o.conversation_id, o.text, o.history, q.id AS question_id, o.ai_paused,"
    "  o.untitled FROM o JOIN q ON q.conversation_id = o.conversation_id::text),"
    " u AS ("
    "  UPDATE conversations v SET updated_at = now(),"
    "  title = CASE WHEN v.title = '' THEN left(c.text, 80) ELSE v.title END"
    "  FROM c WHERE v.id = c.conversation_id AND v.tenant_id IS NOT DISTINCT FROM c.tenant_id"
    "  AND (c.ai_paused OR c.untitled)),"
    " r AS ("
    "  INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
    "  SELECT tenant_id, conversation_id, 'assistant', 'streaming', question_id FROM c WHERE NOT ai_paused"
    f"  ORDER BY n RETURNING {_MESSAGE_COLUMNS})"
    " SELECT i.n, 'q' AS part, q.* FROM q JOIN i ON q.conversation_id = i.conversation_id::text"
    " UNION ALL SELECT c.n, 'r', r.* FROM r JOIN c ON r.conversation_id = c.conversation_id::text"
    f" UNION ALL SELECT c.n, 'h', {_HISTORY_COLUMNS} FROM c CROSS JOIN LATERAL ("
    "  SELECT id, role, text, status, reply_to, blocked FROM messages m WHERE m.conversation_id = c.conversation_id"
    "  ORDER BY m.id DESC LIMIT c.history) h WHERE NOT c.ai_paused"
)


# Committing answers: the answer's final text and status (only if still streaming), its usage row, its
# question's ack seq, and its conversation's `updated_at` and `last_seq`; the ids of the answers updated.
_FINISH_ONE = (
    "WITH m AS ("
    "  UPDATE messages SET text = $4, status = $5, seq = $6, prompt_tokens = $7, output_tokens = $8,"
    "  truncated = $17, error_code = $18, retryable = $19, blocked = $20, updated_at = clock_timestamp()"
    "  WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3 AND status = 'streaming' RETURNING id),"
    " u AS ("
    "  INSERT INTO ai_usage (tenant_id, user_id, conversation_id, message_id, provider, model,"
    "  prompt_tokens, output_tokens, ttft_ms, duration_ms, status, passage_ids)"
    "  SELECT $3, $9, $2, m.id, $10, $11, $7, $8, $12, $13, $5, $14::text::bigint[] FROM m"
    "  WHERE $10::text IS NOT NULL),"
    " q AS ("
    "  UPDATE messages SET seq = $16 WHERE id = $15 AND tenant_id = $3 AND $16::bigint > 0"
    "  AND EXISTS (SELECT 1 FROM m)),"
    " c AS ("
    "  UPDATE conversations SET updated_at = now(), last_seq = GREATEST(last_seq, $6)"
    "  WHERE id = $2 AND tenant_id = $3 AND EXISTS (SELECT 1 FROM m))"
    " SELECT id FROM m"
)
_FINISH_MANY = (
    "WITH i AS ("
    "  SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],"
    "  $7::int[], $8::int[], $9::uuid[], $10::text[], $11::text[], $12::float8[], $13::float8[],"
    "  $14::text[], $15::bigint[], $16::bigint[], $17::bool[], $18::text[], $19::bool[], $20::bool[])"
    "  AS i(reply_id, conversation_id, tenant_id, text, status, seq, prompt_tokens, output_tokens,"
    "  user_id, provider, model, ttft_ms, duration_ms, passage_ids, question_id, question_seq,"
    "  truncated, error_code, retryable, blocked)),"
    " m AS ("
    "  UPDATE messages m SET text = i.text, status = i.status, seq = i.seq, prompt_tokens = i.prompt_tokens,"
    "  output_tokens = i.output_tokens, truncated = i.truncated, error_code = i.error_code,"
    "  retryable = i.retryable, blocked = i.blocked, updated_at = clock_timestamp() FROM i"
    "  WHERE m.id = i.reply_id AND m.conversation_id = i.conversation_id AND m.tenant_id = i.tenant_id"
    "  AND m.status = 'streaming' RETURNING m.id),"
    " f AS (SELECT i.* FROM i JOIN m ON m.id = i.reply_id),"
    " u AS ("
    "  INSERT INTO ai_usage (tenant_id, user_id, conversation_id, message_id, provider, model,"
    "  prompt_tokens, output_tokens, ttft_ms, duration_ms, status, passage_ids)"
    "  SELECT tenant_id, user_id, conversation_id, reply_id, provider, model, prompt_tokens, output_tokens,"
    "  ttft_ms, duration_ms, status, passage_ids::bigint[] FROM f WHERE provider IS NOT NULL),"
    " q AS ("
    "  UPDATE messages m SET seq = f.question_seq FROM f"
    "  WHERE m.id = f.question_id AND m.tenant_id IS NOT DISTINCT FROM f.tenant_id AND f.question_seq > 0),"
    " c AS ("
    "  UPDATE conversations v SET updated_at = now(), last_seq = GREATEST(v.last_seq, s.seq)"
    "  FROM (SELECT tenant_id, conversation_id, max(seq) AS seq FROM f GROUP BY 1, 2) s"
    "  WHERE v.id = s.conversation_id AND v.tenant_id IS NOT DISTINCT FROM s.tenant_id)"
    " SELECT id FROM m"
)


# A page of a conversation's messages, newest first: the tenant is checked on the conversation (by primary
# key), and the messages are read through their index, at most `limit` of them (see the history above).
# The newest page has no `id <` bound: without statistics PostgreSQL guesses that a range keeps a third
# of the rows, and for a small guess it reads and sorts the whole conversation.
_RECENT = (
    "SELECT h.* FROM conversations v CROSS JOIN LATERAL ("
    f"  SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = $1 {{before}}"
    "  ORDER BY m.id DESC LIMIT $3) h"
    " WHERE v.id = $1 AND v.tenant_id = $2 ORDER BY h.id DESC"
)
_RECENT_NEWEST = _RECENT.format(before="")
_RECENT_BEFORE = _RECENT.format(before="AND m.id < $4")
# An answer placeholder made only while a condition holds ($1 tenant, $2 conversation, $3 question), run
# after `_LOCK_CONVERSATION` in one transaction (`Database._reply_if`).
_LOCK_CONVERSATION = "SELECT ai_paused FROM conversations WHERE id = $1 AND tenant_id = $2 FOR UPDATE"
_REPLY_IF = (
    "INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
    " SELECT $1, $2, 'assistant', 'streaming', $3 WHERE {condition}"
    f" RETURNING {_MESSAGE_COLUMNS}"
)
# Regenerate: $4 is the question's newest answer, and it ended without completing.
_REGENERATE = _REPLY_IF.format(
    condition="EXISTS (SELECT 1 FROM messages m WHERE m.id = $4 AND m.conversation_id = $2 AND m.tenant_id = $1"
    " AND m.reply_to = $3 AND m.status IN ('stopped', 'failed', 'interrupted'))"
    " AND NOT EXISTS (SELECT 1 FROM messages n WHERE n.reply_to = $3 AND n.id > $4)"
)
# A teacher's resume: $3 is still the conversation's newest message, a student's.
_ANSWER_WAITING = _REPLY_IF.format(
    condition="(SELECT id FROM messages WHERE conversation_id = $2 ORDER BY id DESC LIMIT 1) = $3"
    " AND EXISTS (SELECT 1 FROM messages WHERE id = $3 AND tenant_id = $1 AND role = 'user')"
)
# A token issued before its user was erased (iat $6 at or before deleted_at; without iat, $6 is NULL: any
# token while the erasure is recorded) inserts and updates nothing, so an erased account is never recreated.
# `may_sign_in` (migration 0009) first waits for a delete-user of the person still in progress (it holds
# the same lock), then reads its record.
_UPSERT_USER = (
    "WITH tenant AS (INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING)"
    " INSERT INTO users (tenant_id, external_id, role, display_name) SELECT $1, $2, $3, $4"
    " WHERE may_sign_in($1, $5, $6)"
    " ON CONFLICT (tenant_id, external_id) DO UPDATE"
    " SET role = EXCLUDED.role, display_name = EXCLUDED.display_name, last_seen_at = now()"
    " RETURNING id::text AS id, tenant_id, external_id, role, display_name"
)


# Starting a conversation: the user's most recent conversation of the course that has no messages is reused
# (and moved to the top of their list), so clicking "New conversation" again and again piles up nothing; else
# a new one is inserted. Either is paused when the course's most recent conversation is paused: a teacher
# pauses the tutor for a student, and starting over must not lift that.
_START_CONVERSATION = (
    "WITH l AS (SELECT id, ai_paused FROM conversations"
    "  WHERE tenant_id = $1 AND user_id = $2 AND course_id IS NOT DISTINCT FROM $3"
    "  ORDER BY updated_at DESC LIMIT 1),"
    " e AS ("
    "  UPDATE conversations SET updated_at = now(), ai_paused = ai_paused OR coalesce((SELECT ai_paused FROM l), false)"
    "  WHERE tenant_id = $1 AND id = ("
    "  SELECT c.id FROM conversations c WHERE c.tenant_id = $1 AND c.user_id = $2"
    "  AND c.course_id IS NOT DISTINCT FROM $3"
    "  AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)"
    f"  ORDER BY c.updated_at DESC LIMIT 1) RETURNING {_CONVERSATION_COLUMNS}),"
    " n AS ("
    "  INSERT INTO conversations (tenant_id, user_id, course_id, ai_paused)"
    "  SELECT $1, $2, $3, coalesce((SELECT ai_paused FROM l), false) WHERE NOT EXISTS (SELECT 1 FROM e)"
    f"  RETURNING {_CONVERSATION_COLUMNS})"
    " SELECT * FROM e UNION ALL SELECT * FROM n"
)


async def _lock_student_course(conn: PoolConnectionProxy, tenant_id: str, user_id: str, course_id: str | None) -> None:
    """One student's conversations of one course, one transaction at a time (until it ends): starting one,
    pausing or resuming them."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"conversation-start\x1f{tenant_id}\x1f{user_id}\x1f{course_id or ''}",
    )


class Database:
    """The product's queries over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, probe: ProbeConnect | None = None):
        self.pool = pool
        self._sql = _Statements(pool)
        self._probe_connect = probe
        self._probe: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()
        self._questions: RoundTrips[_Question, SavedQuestion | None] = RoundTrips(
            self._save_questions, "question-commits", limit=COMMIT_BATCH
        )
        self._replies: RoundTrips[_Reply, bool] = RoundTrips(self._finish_replies, "answer-commits", limit=COMMIT_BATCH)

    async def migrate(self) -> list[int]:
        """Apply pending migrations."""
        async with self.pool.acquire() as conn:
            return await apply_migrations(conn)

    async def ping(self) -> None:
        """Raise if the database cannot answer. With a `probe`, on a connection of its own: the hellos of a
        class that starts at once can hold every pooled connection for seconds while PostgreSQL answers, and
        readiness must not fail on every replica at once for that."""
        if self._probe_connect is None:
            await self._sql.fetchval("SELECT 1")  # a stale pooled connection is replaced first
            return
        async with self._probe_lock:
            reused = self._probe is not None and not self._probe.is_closed()
            try:
                await self._ping_probe()
            except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresError):
                if not reused:
                    raise
                await self._ping_probe()  # a connection a database restart closed: once more, on a new one

    async def _ping_probe(self) -> None:
        assert self._probe_connect is not None
        if self._probe is None or self._probe.is_closed():
            self._probe = await self._probe_connect()
        try:
            await self._probe.fetchval("SELECT 1")
        except BaseException:
            self._probe.terminate()
            self._probe = None
            raise

    async def close_probe(self) -> None:
        """Close the connection `ping` keeps (the pool is closed by its owner)."""
        async with self._probe_lock:
            if self._probe is not None:
                probe, self._probe = self._probe, None
                await probe.close(timeout=2.0)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    # -- identities ---------------------------------------------------------------------------

    async def upsert_user(
        self, tenant_id: str, external_id: str, role: str, display_name: str, issued_at: float | None = None
    ) -> User:
        """Create or refresh the tenant and user named by verified token claims; `UserErasedError` when the
        user was erased after the token was issued (`issued_at`, seconds since the epoch; None when the token does
        not say).

        One statement, so one round trip and one commit on every `hello`: the user's foreign key is checked
        at the end of the statement, which sees the tenant its first part inserted."""
        issued = None if issued_at is None else datetime.fromtimestamp(issued_at, UTC)
        row = await self._sql.fetchrow(
            _UPSERT_USER, tenant_id, external_id, role, display_name, subject_hash(tenant_id, external_id), issued
        )
        if row is None:
            raise UserErasedError("account deleted")
        return User(**dict(row))

    async def erasures(self) -> list[Erasure]:
        """The erasures still recorded (every tenant's: each replica keeps them all in memory)."""
        rows = await self._sql.fetch(
            "SELECT tenant_id, subject, deleted_at, expires_at FROM erased_users WHERE expires_at > now()"
        )
        return [Erasure(r["tenant_id"], bytes(r["subject"]), r["deleted_at"], r["expires_at"]) for r in rows]

    # -- logged-out cookie sessions -------------------------------------------------------------

    async def revoke_session(self, tenant_id: str, session_id: str, expires_at: datetime) -> None:
        """Record a logged-out cookie session until it would have expired."""
        await self._sql.execute(
            "INSERT INTO revoked_sessions (tenant_id, session_id, expires_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (tenant_id, session_id) DO NOTHING",
            tenant_id,
            session_id,
            expires_at,
        )

    async def revoked_sessions(self, tenant_id: str, session_ids: Sequence[str]) -> set[str]:
        """Which of the tenant's cookie sessions were logged out and would still be valid."""
        rows = await self._sql.fetch(
            "SELECT session_id FROM revoked_sessions WHERE tenant_id = $1 AND session_id = ANY($2::text[])"
            " AND expires_at > now()",
            tenant_id,
            list(session_ids),
        )
        return {r["session_id"] for r in rows}

    async def unexpired_revocations(self) -> list[tuple[str, float]]:
        """Every tenant's logged-out sessions that would still be valid: (session id, seconds left), to restore
        Redis's copy after it lost its data."""
        rows = await self._sql.fetch(
            "SELECT session_id, extract(epoch FROM expires_at - now())::float8 AS left_s FROM revoked_sessions"
            " WHERE expires_at > now()"
        )
        return [(r["session_id"], float(r["left_s"])) for r in rows]

    async def get_tenant(self, tenant_id: str) -> TenantSettings:
        """The tenant's own settings (defaults when it has none)."""
        row = await self._sql.fetchrow(
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
        found = await self._sql.fetchval("SELECT 1 FROM tenants WHERE $1 = ANY(allowed_origins) LIMIT 1", origin)
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
        await self._sql.execute(
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
        row = await self._sql.fetchrow(
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
        rows = await self._sql.fetch(
            "SELECT tenant_id, id, title, description, system_prompt FROM courses WHERE tenant_id = $1 ORDER BY title",
            tenant_id,
        )
        return [Course(**dict(r)) for r in rows]

    # -- conversations ------------------------------------------------------------------------

    async def get_conversation(self, tenant_id: str, user_id: str, conversation_id: str) -> Conversation | None:
        """The user's own conversation, or None (also for other users' and other tenants' ids)."""
        if not _is_uuid(conversation_id):
            return None
        row = await self._sql.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND tenant_id = $2 AND user_id = $3",
            conversation_id,
            tenant_id,
            user_id,
        )
        return _conversation(row) if row else None

    async def latest_conversation(self, tenant_id: str, user_id: str, course_id: str | None) -> Conversation | None:
        """The user's most recently active conversation in the course (or without course)."""
        row = await self._sql.fetchrow(
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
        row = await self._sql.fetchrow(
            f"INSERT INTO conversations (tenant_id, user_id, course_id) VALUES ($1, $2, $3)"
            f" RETURNING {_CONVERSATION_COLUMNS}",
            tenant_id,
            user_id,
            course_id,
        )
        assert row is not None
        return _conversation(row)

    async def start_conversation(self, tenant_id: str, user_id: str, course_id: str | None) -> Conversation:
        """A new conversation for the user in the course, or their latest one that has no messages yet."""
        async with self._transaction() as conn:
            # Two hellos at once (a double click, two tabs) must not both insert: one user and course at a time.
            await _lock_student_course(conn, tenant_id, user_id, course_id)
            row = await conn.fetchrow(_START_CONVERSATION, tenant_id, user_id, course_id)
        assert row is not None
        return _conversation(row)

    async def list_conversations(
        self, tenant_id: str, user_id: str, limit: int = 50, course_id: str | None = None, *, no_course: bool = False
    ) -> list[Conversation]:
        """The user's conversations (only those of `course_id` when given, only those without a course when
        `no_course`), most recent first."""
        if no_course and course_id is not None:
            raise ValueError("course_id and no_course exclude each other")
        in_course = " AND course_id IS NULL" if no_course else "" if course_id is None else " AND course_id = $4"
        rows = await self._sql.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE tenant_id = $1 AND user_id = $2{in_course}"
            " ORDER BY updated_at DESC LIMIT $3",
            tenant_id,
            user_id,
            limit,
            *(() if course_id is None else (course_id,)),
        )
        return [_conversation(r) for r in rows]

    # -- messages -----------------------------------------------------------------------------

    async def recent_messages(
        self, tenant_id: str, conversation_id: str, limit: int, before: int | None = None
    ) -> list[Message]:
        """Up to `limit` messages older than `before` (or the newest), oldest first; one index scan."""
        if before is None:
            rows = await self._sql.fetch(_RECENT_NEWEST, conversation_id, tenant_id, limit)
        else:
            rows = await self._sql.fetch(_RECENT_BEFORE, conversation_id, tenant_id, limit, before)
        return [_message(r) for r in reversed(rows)]

    async def get_message(self, tenant_id: str, conversation_id: str, message_id: int) -> Message | None:
        """One message of the conversation, or None."""
        row = await self._sql.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3",
            message_id,
            conversation_id,
            tenant_id,
        )
        return _message(row) if row else None

    async def find_user_message(self, tenant_id: str, user_id: str, message_id: int) -> Message | None:
        """A message in any of the user's conversations, or None."""
        row = await self._sql.fetchrow(
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
        """Commit a student's message and its reply placeholder; a repeated client id returns the first rows
        (`ClientIdTakenError` if the id names a message that is not this student's question, `NotFoundError`
        if the conversation is not this student's in this tenant).

        While a teacher has paused the AI for the conversation, no placeholder is made: the question waits.
        Questions submitted while another batch is being committed are committed together, in one statement
        and one commit (`_save_questions`); each returns as soon as its own batch is durable.
        """
        conversation_id = _canonical(conversation_id)
        saved = await self._questions.submit(_Question(tenant_id, conversation_id, client_id, text, author_id, history))
        if saved is not None:
            return saved
        # Not inserted: a resend (the first rows, and no second answer), or not the student's conversation.
        async with self.pool.acquire() as conn:
            row = await self._resent(conn, tenant_id, conversation_id, "user", client_id, author_id, owner=author_id)
            existing = await conn.fetchrow(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE reply_to = $1 AND tenant_id = $2"
                " ORDER BY id DESC LIMIT 1",
                row["id"],
                tenant_id,
            )
        return SavedQuestion(_message(row), _message(existing) if existing else None, created=False)

    async def _save_questions(self, batch: list[_Question]) -> list[_Saved]:
        """Group commit: a batch of questions in as few statements as possible.

        A conversation's second question in a batch goes in the next statement, which sees the first (its
        history and the title). When a statement fails, its questions are tried one at a time, so one bad
        question fails alone and the others are still committed.
        """
        results: list[_Saved] = [None] * len(batch)
        left = list(range(len(batch)))
        while left:
            seen: set[str] = set()
            now: list[int] = []
            later: list[int] = []
            for i in left:
                (later if batch[i].conversation_id in seen else now).append(i)
                seen.add(batch[i].conversation_id)
            outcomes = await _each_alone_on_failure(self._insert_questions, [batch[i] for i in now])
            for i, outcome in zip(now, outcomes, strict=True):
                results[i] = outcome
            left = later
        return results

    async def _insert_questions(self, questions: list[_Question]) -> list[SavedQuestion | None]:
        """One statement (one round trip, one commit) for questions of distinct conversations: each
        question, its placeholder and its history (`_SAVE_ONE`, `_SAVE_MANY`). None for a question whose
        client id was already in its conversation."""
        if len(questions) == 1:
            rows = await self._sql.fetch(_SAVE_ONE, *questions[0].params())
        else:
            rows = await self._sql.fetch(_SAVE_MANY, *_columns([q.params() for q in questions]))
        parts: list[dict[str, list[Message]]] = [{"q": [], "r": []} for _ in questions]
        histories: list[list[PastMessage]] = [[] for _ in questions]
        for row in rows:
            n, part = row[0] - 1, row[1]
            if part == "h":
                histories[n].append(PastMessage(row[2], row[4], row[5], row[6], row[8], row[16]))
            else:
                parts[n][part].append(Message(*tuple(row.values())[2:]))
        saved: list[SavedQuestion | None] = []
        for question, part, history in zip(questions, parts, histories, strict=True):
            if not part["q"]:
                saved.append(None)
                continue
            reply = part["r"][0] if part["r"] else None
            history.sort(key=_by_id)
            prefetched = history if reply is not None and question.history > 0 else None
            saved.append(SavedQuestion(part["q"][0], reply, created=True, history=prefetched))
        return saved

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
        """Insert a written message into a conversation of the tenant unless its client id is already there;
        (row, created)."""
        row = await conn.fetchrow(
            "INSERT INTO messages (tenant_id, conversation_id, role, text, status, client_id, author_id)"
            " SELECT $1, $2, $3, $4, 'complete', $5, $6"
            " WHERE EXISTS (SELECT 1 FROM conversations WHERE id = $2 AND tenant_id = $1)"
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
        return await Database._resent(conn, tenant_id, conversation_id, role, client_id, author_id), False

    @staticmethod
    async def _resent(
        conn: PoolConnectionProxy,
        tenant_id: str,
        conversation_id: str,
        role: str,
        client_id: str | None,
        author_id: str,
        owner: str | None = None,
    ) -> asyncpg.Record:
        """The message a resend repeats: the conversation's message with this client id, role and author.

        Another author's message with the id is not one: students see teachers' ids, and any id is allowed
        (`ClientIdTakenError`). `NotFoundError` if the conversation is not the tenant's (or `owner`'s)."""
        row = await conn.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND client_id = $2 AND tenant_id = $3"
            " AND role = $4 AND author_id = $5",
            conversation_id,
            client_id,
            tenant_id,
            role,
            author_id,
        )
        if row is not None:
            return row
        found = await conn.fetchval(
            "SELECT 1 FROM conversations WHERE id = $1 AND tenant_id = $2 AND ($3::uuid IS NULL OR user_id = $3)",
            conversation_id,
            tenant_id,
            owner,
        )
        if found is None:
            raise NotFoundError("conversation")
        raise ClientIdTakenError(f"the id {client_id!r} already names another message in the conversation")

    @staticmethod
    async def _insert_reply(
        conn: PoolConnectionProxy, tenant_id: str, conversation_id: str, question_id: int
    ) -> Message:
        reply = await conn.fetchrow(
            "INSERT INTO messages (tenant_id, conversation_id, role, status, reply_to)"
            " SELECT $1, $2, 'assistant', 'streaming', $3 WHERE EXISTS ("
            "  SELECT 1 FROM messages q JOIN conversations c ON c.id = q.conversation_id"
            "  WHERE q.id = $3 AND q.conversation_id = $2 AND q.tenant_id = $1 AND c.tenant_id = $1)"
            f" RETURNING {_MESSAGE_COLUMNS}",
            tenant_id,
            conversation_id,
            question_id,
        )
        if reply is None:
            raise NotFoundError("question")
        return _message(reply)

    async def create_reply(self, tenant_id: str, conversation_id: str, question_id: int) -> Message:
        """A new answer placeholder for an existing question (regenerate, or after the AI is resumed);
        `NotFoundError` unless the question is in this conversation of the tenant."""
        async with self._transaction() as conn:
            return await self._insert_reply(conn, tenant_id, conversation_id, question_id)

    async def set_message_seq(self, tenant_id: str, message_id: int, seq: int) -> None:
        """Remember the seq of a message's ack, so a resend gets the same ack."""
        await self._sql.execute(
            "UPDATE messages SET seq = $3 WHERE id = $1 AND tenant_id = $2", message_id, tenant_id, seq
        )

    async def unanswered_question(self, tenant_id: str, conversation_id: str) -> Message | None:
        """The newest student message if nothing (answer or teacher message) came after it."""
        row = await self._sql.fetchrow(
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
        """Commit a teacher's message to a student's conversation of the tenant (idempotent on the client id;
        `ClientIdTakenError` if the id names a message that is not this teacher's, `NotFoundError` if the
        conversation is not the tenant's)."""
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

    async def set_ai_paused(
        self, tenant_id: str, user_id: str, course_id: str | None, paused: bool
    ) -> list[Conversation]:
        """Pause or resume the tutor for a student in a course: for every conversation of theirs in it, so
        that reopening an earlier one does not bring an answering tutor back. Returns the conversations
        whose state changed. Under the lock `start_conversation` takes, so that a conversation started
        meanwhile is either changed here or copies the new state."""
        async with self._transaction() as conn:
            await _lock_student_course(conn, tenant_id, user_id, course_id)
            rows = await conn.fetch(
                "UPDATE conversations SET ai_paused = $4 WHERE tenant_id = $1 AND user_id = $2"
                f" AND course_id IS NOT DISTINCT FROM $3 AND ai_paused <> $4 RETURNING {_CONVERSATION_COLUMNS}",
                tenant_id,
                user_id,
                course_id,
                paused,
            )
        return [_conversation(r) for r in rows]

    async def paused_conversations(self, tenant_id: str, conversation_ids: Sequence[str]) -> set[str]:
        """Which of these conversations of the tenant have the AI paused now (ids of other tenants: none)."""
        ids = [c for c in dict.fromkeys(conversation_ids) if _is_uuid(c)]
        if not ids:
            return set()
        rows = await self._sql.fetch(
            "SELECT id::text FROM conversations WHERE tenant_id = $1 AND id = any($2::uuid[]) AND ai_paused",
            tenant_id,
            ids,
        )
        return {row[0] for row in rows}

    async def tenant_conversation(self, tenant_id: str, conversation_id: str) -> Conversation | None:
        """Any conversation of the tenant (for teachers; the caller checks the course)."""
        if not _is_uuid(conversation_id):
            return None
        row = await self._sql.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
        )
        return _conversation(row) if row else None

    async def add_flag(
        self, tenant_id: str, conversation_id: str, message_id: int | None, kind: str, detail: str = ""
    ) -> int:
        """Record something a teacher should see (a safety block, repeated failures); `NotFoundError` unless
        the conversation (and the message, if given) is the tenant's."""
        flag_id = await self._sql.fetchval(
            "INSERT INTO message_flags (tenant_id, conversation_id, message_id, kind, detail)"
            " SELECT $1, $2, $3, $4, $5"
            " WHERE EXISTS (SELECT 1 FROM conversations WHERE id = $2 AND tenant_id = $1) AND ($3::bigint IS NULL"
            " OR EXISTS (SELECT 1 FROM messages WHERE id = $3 AND conversation_id = $2 AND tenant_id = $1))"
            " RETURNING id",
            tenant_id,
            conversation_id,
            message_id,
            kind,
            detail,
        )
        if flag_id is None:
            raise NotFoundError("conversation")
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
        *,
        truncated: bool = False,
        error: tuple[str, bool] | None = None,
        blocked: bool = False,
        again: bool = False,
    ) -> bool:
        """Commit the answer's final text and status (only if still streaming), whether the output limit cut
        it (`truncated`), a safety filter stopped it (`blocked`) or why it failed (`error` = (code,
        retryable)), its usage row and the question's ack
        seq (`question` = (id, seq)); False if it had already ended. Answers finishing while another batch
        is being committed are committed together (`_update_replies`). `again`: the same commit after a
        failed one, alone, which may have committed before its reply was lost (`_update_reply_again`)."""
        reply = _Reply(
            tenant_id, user_id, conversation_id, reply_id, text, status, seq, usage, question or (0, 0),
            truncated, error, blocked,
        )
        if again:
            [committed] = await self._update_reply_again([reply])
            return committed
        return await self._replies.submit(reply)

    async def stale_placeholders(
        self, older_than_s: float, limit: int = 500
    ) -> list[tuple[str, str, str, int, str | None]]:
        """Answers still streaming, of every tenant, whose placeholder is older than `older_than_s`, as
        (tenant, user, conversation, reply id, course): for the sweep of answers that never started (the
        leases they are checked against are not per tenant either). Read through the index of streaming
        messages."""
        rows = await self._sql.fetch(
            "SELECT m.tenant_id, c.user_id::text, m.conversation_id::text, m.id, c.course_id FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id AND c.tenant_id = m.tenant_id"
            " WHERE m.status = 'streaming' AND m.created_at < now() - make_interval(secs => $1) LIMIT $2",
            older_than_s,
            limit,
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def _finish_replies(self, replies: list[_Reply]) -> list[bool | Exception]:
        """`_update_replies` on the batch; if it fails, on each answer alone (`_update_reply_again`)."""
        return await _each_alone_on_failure(self._update_replies, replies, self._update_reply_again)

    async def _update_reply_again(self, replies: list[_Reply]) -> list[bool]:
        """`_update_replies` on one answer after its batch failed. The failure may have come after the
        batch's COMMIT (the connection dropped before the reply): then the answer is no longer streaming,
        but in exactly the state being committed, and is reported committed (its `done` is sent)."""
        [committed] = await self._update_replies(replies)
        if committed:
            return [True]
        reply = replies[0]
        same = await self._sql.fetchval(
            "SELECT 1 FROM messages WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3 AND text = $4"
            " AND status = $5 AND seq = $6",
            *reply.params()[:6],
        )
        return [same is not None]

    async def _update_replies(self, replies: list[_Reply]) -> list[bool]:
        """One statement (one round trip, one commit) for a batch of answers: each answer's row, its
        usage row, its question's ack seq and its conversation's `updated_at` and `last_seq`."""
        if len(replies) == 1:
            return [await self._sql.fetchval(_FINISH_ONE, *replies[0].params()) is not None]
        rows = await self._sql.fetch(_FINISH_MANY, *_columns([r.params() for r in replies]))
        done = {row[0] for row in rows}
        return [r.reply_id in done for r in replies]

    async def record_seq(self, tenant_id: str, conversation_id: str, seq: int, message_id: int | None = None) -> None:
        """Raise the conversation's last seq to `seq`, a frame no answer's commit records (a teacher's message,
        a pause, a question's ack while paused), and with `message_id` keep it as that message's seq (a
        resend gets it back); one statement."""
        await self._sql.execute(
            "WITH m AS (UPDATE messages SET seq = $3 WHERE id = $4 AND tenant_id = $1 AND conversation_id = $2)"
            " UPDATE conversations SET last_seq = GREATEST(last_seq, $3) WHERE id = $2 AND tenant_id = $1",
            tenant_id,
            conversation_id,
            seq,
            message_id,
        )

    # -- answers started again: regenerate, and a teacher resuming the AI -----------------------

    async def regenerate_reply(
        self, tenant_id: str, conversation_id: str, question_id: int, reply_id: int
    ) -> Message | None:
        """A new answer placeholder for the question in place of `reply_id`, if the AI is not paused and
        `reply_id` is still the question's newest answer and ended stopped, failed or interrupted; else None."""
        return await self._reply_if(_REGENERATE, tenant_id, conversation_id, question_id, reply_id)

    async def answer_waiting_question(self, tenant_id: str, conversation_id: str, question_id: int) -> Message | None:
        """An answer placeholder for the question if the AI is not paused and the question is still the
        conversation's newest message (two teachers resuming at once: one answer); else None."""
        return await self._reply_if(_ANSWER_WAITING, tenant_id, conversation_id, question_id)

    async def _reply_if(self, statement: str, tenant_id: str, conversation_id: str, *args: Any) -> Message | None:
        """`statement` (an answer placeholder made only while its condition holds) with the conversation's
        row locked first: two requests at once cannot both see the condition hold, since the second one's
        statement reads after the first committed (READ COMMITTED takes a snapshot per statement; within one
        statement, waiting for a lock would leave it reading the old one)."""
        async with self._transaction() as conn:
            paused = await conn.fetchval(_LOCK_CONVERSATION, conversation_id, tenant_id)
            if paused is None or paused:
                return None
            row = await conn.fetchrow(statement, tenant_id, conversation_id, *args)
        return _message(row) if row else None
