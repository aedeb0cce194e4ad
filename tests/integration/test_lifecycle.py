"""Backups, retention purges and data-protection requests, against the real PostgreSQL of the test run."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from server import lifecycle_cli
from server.settings import Settings
from storage.lifecycle import (
    DataCounts,
    Lifecycle,
    PgTool,
    RetentionRule,
    TenantRetention,
    backup_database,
    closest_first,
    libpq_target,
    pick_dump_tool,
    retention_rules,
)
from storage.postgres import Database, connect_pool
from tests.conftest import Server, Services, token

pytestmark = pytest.mark.integration

CONVERSATIONS = "SELECT id::text, tenant_id, user_id::text, title, updated_at FROM conversations ORDER BY id"
MESSAGES = "SELECT id, conversation_id::text, role, text, status, reply_to FROM messages ORDER BY id"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smartedu")
    lifecycle_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def _cli(settings: Settings, *argv: str) -> int:
    # `run` owns its event loop (asyncio.run), as it does under `smartedu`.
    return await asyncio.to_thread(lifecycle_cli.run, _args(*argv), settings)


@dataclass
class Seeded:
    """Rows made for one user, by table."""

    user_id: str = ""
    conversations: list[str] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    usage: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)


async def seed_user(
    db: asyncpg.Connection, tenant: str, user: str, *, conversations: int = 2, age_days: int = 0,
    role: str = "student",
) -> Seeded:
    """A user with conversations last active `age_days` ago, each with a question, an answer, usage and a flag."""
    seeded = Seeded()
    await db.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant)
    seeded.user_id = await db.fetchval(
        "INSERT INTO users (tenant_id, external_id, role) VALUES ($1, $2, $3)"
        " ON CONFLICT (tenant_id, external_id) DO UPDATE SET role = EXCLUDED.role RETURNING id::text",
        tenant, user, role,
    )
    for i in range(conversations):
        conversation = await db.fetchval(
            "INSERT INTO conversations (tenant_id, user_id, title, created_at, updated_at)"
            " VALUES ($1, $2, $3, now() - make_interval(days => $4), now() - make_interval(days => $4))"
            " RETURNING id::text",
            tenant, seeded.user_id, f"{tenant}/{user} #{i}", age_days,
        )
        question = await db.fetchval(
            "INSERT INTO messages (tenant_id, conversation_id, role, text, status, author_id, created_at)"
            " VALUES ($1, $2, 'user', $3, 'complete', $4, now() - make_interval(days => $5)) RETURNING id",
            tenant, conversation, f"question from {tenant}/{user}", seeded.user_id, age_days,
        )
        answer = await db.fetchval(
            "INSERT INTO messages (tenant_id, conversation_id, role, text, status, reply_to, created_at)"
            " VALUES ($1, $2, 'assistant', 'an answer', 'complete', $3, now() - make_interval(days => $4))"
            " RETURNING id",
            tenant, conversation, question, age_days,
        )
        seeded.usage.append(await db.fetchval(
            "INSERT INTO ai_usage (tenant_id, user_id, conversation_id, message_id, provider, model, status)"
            " VALUES ($1, $2, $3, $4, 'offline', 'tutor', 'complete') RETURNING id",
            tenant, seeded.user_id, conversation, answer,
        ))
        seeded.flags.append(await db.fetchval(
            "INSERT INTO message_flags (tenant_id, conversation_id, message_id, kind) VALUES ($1, $2, $3, 'safety')"
            " RETURNING id",
            tenant, conversation, answer,
        ))
        seeded.conversations.append(conversation)
        seeded.messages += [question, answer]
    return seeded


async def _teacher_writes(db: asyncpg.Connection, tenant: str, teacher: str, conversation: str) -> int:
    teacher_id = await db.fetchval(
        "INSERT INTO users (tenant_id, external_id, role) VALUES ($1, $2, 'teacher')"
        " ON CONFLICT (tenant_id, external_id) DO UPDATE SET role = 'teacher' RETURNING id",
        tenant, teacher,
    )
    message_id: int = await db.fetchval(
        "INSERT INTO messages (tenant_id, conversation_id, role, text, status, author_id)"
        " VALUES ($1, $2, 'teacher', 'Try drawing it first.', 'complete', $3) RETURNING id",
        tenant, conversation, teacher_id,
    )
    return message_id


async def _ids(db: asyncpg.Connection, table: str, tenant: str | None = None) -> set[Any]:
    rows = await db.fetch(f"SELECT id FROM {table} WHERE $1::text IS NULL OR tenant_id = $1", tenant)
    return {str(r["id"]) if isinstance(r["id"], uuid.UUID) else r["id"] for r in rows}


@pytest.fixture
async def lifecycle(settings: Settings) -> AsyncIterator[Lifecycle]:
    assert settings.database_url
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        yield Lifecycle(pool)
    finally:
        await pool.close()


@pytest.fixture
async def fresh_database(services: Services) -> AsyncIterator[str]:
    """An empty database on the test server, dropped afterwards."""
    name = f"smartedu_restore_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(services.database_url)._replace(path="/" + name))
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


# -- backup and restore ---------------------------------------------------------------------------


async def test_backup_then_restore_into_a_fresh_database_keeps_every_conversation(
    server: Server, db: asyncpg.Connection, fresh_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="q1", text="What is a prime number?")
    await sock.until("done")
    await sock.close()
    await seed_user(db, "school-b", "stu-9", conversations=3)
    conversations, messages = await db.fetch(CONVERSATIONS), await db.fetch(MESSAGES)
    assert len(conversations) == 4 and len(messages) == 8

    dump = tmp_path / "nightly.dump"
    assert await _cli(server.settings, "backup", "--output", str(dump)) == 0
    out = capsys.readouterr().out
    assert f"backup written to {dump}" in out and "4 conversations, 8 messages" in out, out
    assert dump.read_bytes().startswith(b"PGDMP") and stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert not (tmp_path / "nightly.dump.partial").exists()

    target = replace(server.settings, database_url=fresh_database)
    assert await _cli(target, "restore", str(dump)) == 0
    assert "4 conversations, 8 messages" in capsys.readouterr().out
    restored = await asyncpg.connect(fresh_database)
    try:
        assert await restored.fetch(CONVERSATIONS) == conversations
        assert await restored.fetch(MESSAGES) == messages
        versions = "SELECT version FROM schema_migrations ORDER BY 1"
        assert await restored.fetch(versions) == await db.fetch(versions)
        # Identity sequences came along: new rows do not collide with restored ones.
        new_id = await restored.fetchval(
            "INSERT INTO messages (tenant_id, conversation_id, role, status) VALUES ($1, $2, 'user', 'complete')"
            " RETURNING id", conversations[0]["tenant_id"], conversations[0]["id"],
        )
        assert new_id > max(m["id"] for m in messages)

        assert await _cli(target, "restore", str(dump)) == 1
        assert "not empty" in capsys.readouterr().err

        await restored.execute("DELETE FROM conversations WHERE tenant_id = 'school-b'")
        assert await _cli(target, "restore", "--clean", str(dump)) == 0
        assert await restored.fetch(CONVERSATIONS) == conversations
        assert await restored.fetch(MESSAGES) == messages
    finally:
        await restored.close()


async def test_backup_into_a_directory_uses_the_default_name_there(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the dump went to "<dir>.partial", the rename onto the directory failed (exit 1) and the whole
    # dump stayed behind under that name.
    backups = tmp_path / "backups"
    backups.mkdir()
    assert await _cli(settings, "backup", "--output", str(backups)) == 0, capsys.readouterr().err
    written = list(backups.iterdir())
    assert len(written) == 1 and written[0].name.startswith("smartedu-") and written[0].suffix == ".dump"
    assert written[0].read_bytes().startswith(b"PGDMP")
    assert f"backup written to {written[0]}" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["backups"]


async def test_a_backup_that_cannot_be_put_in_place_leaves_no_partial_file(
    settings: Settings, tmp_path: Path
) -> None:
    occupied = tmp_path / "nightly.dump"  # a directory where the finished dump should be renamed to
    occupied.mkdir()
    assert settings.database_url is not None
    with pytest.raises(IsADirectoryError):
        await backup_database(settings.database_url, occupied)
    assert os.listdir(tmp_path) == ["nightly.dump"]


async def test_restore_refuses_a_file_that_is_not_a_backup(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a dump")
    assert await _cli(settings, "restore", str(junk)) == 1
    assert "is not a custom-format backup" in capsys.readouterr().err


def test_an_older_pg_dump_is_refused_with_a_clear_reason() -> None:
    old = PgTool("pg_dump", "/usr/bin/pg_dump", "15.20", 15, "PATH")
    new = PgTool("pg_dump", "/opt/pg/bin/pg_dump", "18.6", 18, "embedded PostgreSQL")
    assert pick_dump_tool([old, new], 16, "16.4") is new
    # The server's own version first, wherever it is found: pg_dump 18's archive makes pg_restore set
    # transaction_timeout, which PostgreSQL 15 refuses.
    assert pick_dump_tool([new, old], 15, "15.8") is old
    middle = PgTool("pg_dump", "/usr/lib/postgresql/17/bin/pg_dump", "17.2", 17, "PATH")
    assert pick_dump_tool([new, old, middle], 16, "16.4") is middle
    with pytest.raises(Exception, match=r"runs PostgreSQL 18\.1.*pg_dump 15\.20.*postgresql-client-18"):
        pick_dump_tool([old], 18, "18.1")
    with pytest.raises(Exception, match="pg_dump was not found"):
        pick_dump_tool([], 16, "16.4")


def test_restore_tools_are_tried_from_the_server_s_own_version() -> None:
    tools = [PgTool("pg_restore", f"/pg{major}/pg_restore", f"{major}.1", major, "PATH") for major in (18, 14, 15, 16)]
    assert [tool.major for tool in closest_first(tools, 15)] == [15, 16, 18, 14]


def test_the_password_goes_to_the_environment_not_the_command_line() -> None:
    target, env = libpq_target("postgresql://app:s%40cret@db.internal:5432/smartedu?sslmode=require")
    assert target == "postgresql://app@db.internal:5432/smartedu?sslmode=require"
    assert env["PGPASSWORD"] == "s@cret"
    assert libpq_target("postgresql://postgres:@/smartedu?host=/run/pg")[0] == "postgresql://postgres@/smartedu?host=/run/pg"


# -- retention ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("52w", timedelta(weeks=52)),
     ("90m", timedelta(minutes=90)), (" 7D ", timedelta(days=7))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert lifecycle_cli.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1y", "1.5d", "9999999999d", "99999999999999999999w"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="365d"):
        lifecycle_cli.parse_duration(text)


def test_a_tenants_own_retention_wins_over_the_default() -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    policies = [TenantRetention("a", None), TenantRetention("b", 30), TenantRetention("c", 0)]
    assert retention_rules(policies, now, timedelta(days=365)) == [
        RetentionRule("a", now - timedelta(days=365), "default limit"),
        RetentionRule("b", now - timedelta(days=30), "tenant retention 30 days"),
        RetentionRule("c", now - timedelta(days=365), "default limit"),
    ]
    assert [r.tenant_id for r in retention_rules(policies, now, None)] == ["b"]


def test_retention_beyond_the_calendar_expires_nothing() -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    rules = retention_rules([TenantRetention("forever", 2147483647)], now, timedelta(days=5_000_000))
    rules += retention_rules([TenantRetention("default", None)], now, timedelta(days=5_000_000))
    assert [r.cutoff for r in rules] == [datetime.min.replace(tzinfo=UTC)] * 2


async def test_a_purge_survives_a_tenant_that_keeps_everything(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: OverflowError, a traceback, and no tenant purged at all.
    await seed_user(db, "school-forever", "stu-1", conversations=1, age_days=400)
    await seed_user(db, "school-short", "stu-1", conversations=1, age_days=400)
    await db.execute("UPDATE tenants SET retention_days = 2147483647 WHERE id = 'school-forever'")
    await db.execute("UPDATE tenants SET retention_days = 30 WHERE id = 'school-short'")
    assert await _cli(settings, "purge", "--per-tenant") == 0
    out = capsys.readouterr().out
    assert "school-forever: inactive since before 0001-01-01 00:00 UTC" in out and "deleted 0 conversations" in out
    assert "school-short:" in out and "deleted 1 conversation," in out, out


async def test_purge_deletes_only_expired_conversations_of_the_tenant(
    settings: Settings, db: asyncpg.Connection, lifecycle: Lifecycle, capsys: pytest.CaptureFixture[str]
) -> None:
    a_old = await seed_user(db, "school-a", "stu-1", conversations=2, age_days=400)
    a_recent = await seed_user(db, "school-a", "stu-1", conversations=1, age_days=10)
    b_kept = await seed_user(db, "school-b", "stu-1", conversations=2, age_days=400)
    b_ancient = await seed_user(db, "school-b", "stu-1", conversations=1, age_days=600)
    everything = {t: await _ids(db, t) for t in ("conversations", "messages", "ai_usage", "message_flags")}

    assert await _cli(settings, "purge", "--older-than", "365d", "--tenant", "school-a", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would delete 2 conversations, 4 messages, 2 usage rows, 2 flags in 1 tenant" in out, out
    assert {t: await _ids(db, t) for t in everything} == everything

    rule = retention_rules(await lifecycle.retention_policies("school-a"), await lifecycle.now(), timedelta(days=365))
    progress: list[DataCounts] = []
    deleted = await lifecycle.purge(rule[0], batch_size=1, on_batch=progress.append)
    assert deleted == DataCounts(conversations=2, messages=4, usage=2, flags=2)
    assert [p.conversations for p in progress] == [1, 2]
    assert await _ids(db, "conversations") == everything["conversations"] - set(a_old.conversations)
    assert await _ids(db, "messages") == everything["messages"] - set(a_old.messages)
    assert await _ids(db, "ai_usage") == everything["ai_usage"] - set(a_old.usage)
    assert await _ids(db, "message_flags") == everything["message_flags"] - set(a_old.flags)

    # school-b keeps 500 days; --per-tenant applies only that.
    await db.execute("UPDATE tenants SET retention_days = 500 WHERE id = 'school-b'")
    assert await _cli(settings, "purge", "--per-tenant") == 0
    assert "school-b: inactive since before" in capsys.readouterr().out
    assert await _ids(db, "conversations") == set(a_recent.conversations + b_kept.conversations)

    # A default of 5 days reaches school-a's recent conversation; school-b's own 500 days still win.
    assert await _cli(settings, "purge", "--older-than", "5d", "--batch-size", "1") == 0
    out = capsys.readouterr().out
    assert "school-b: inactive since before" in out and "(tenant retention 500 days): deleted 0 conversations" in out
    assert await _ids(db, "conversations") == set(b_kept.conversations)
    assert b_ancient.conversations[0] not in await _ids(db, "conversations")

    assert await _cli(settings, "purge", "--older-than", "1d", "--tenant", "nowhere") == 1
    assert "no tenant 'nowhere'" in capsys.readouterr().err


async def test_a_purge_keeps_a_conversation_whose_new_question_is_being_answered(
    settings: Settings, db: asyncpg.Connection, lifecycle: Lifecycle
) -> None:
    # Saving a question does not touch conversations.updated_at (only its answer's commit does): an idle
    # conversation asked something while its answer is generated still looks expired by updated_at alone.
    busy = await seed_user(db, "school-a", "stu-1", conversations=1, age_days=400)
    asking = await seed_user(db, "school-a", "stu-2", conversations=1, age_days=400)
    idle = await seed_user(db, "school-a", "stu-3", conversations=1, age_days=400)
    pool = await connect_pool(settings.database_url, min_size=1, max_size=2)
    try:
        database = Database(pool)
        saved = await database.save_question("school-a", busy.conversations[0], "q-new", "and now?", busy.user_id)
        assert saved.created and saved.reply is not None
        cutoff = await lifecycle.now() - timedelta(days=365)
        assert await lifecycle.count_expired("school-a", cutoff) == DataCounts(2, 4, 2, 2)  # not `busy`
        # A question still being committed holds a key-share lock on its conversation: skipped, and kept
        # afterwards for the message it added.
        async with db.transaction():
            await db.execute(
                "INSERT INTO messages (tenant_id, conversation_id, role, text, status) VALUES ($1, $2, 'user', 'hi',"
                " 'complete')", "school-a", asking.conversations[0],
            )
            assert await lifecycle.purge_batch("school-a", cutoff) == DataCounts(1, 2, 1, 1)
        assert await lifecycle.purge(RetentionRule("school-a", cutoff, "test")) == DataCounts()
        assert await _ids(db, "conversations") == {busy.conversations[0], asking.conversations[0]}
        assert idle.conversations[0] not in await _ids(db, "conversations")
        committed = await database.finish_reply(
            "school-a", busy.user_id, busy.conversations[0], saved.reply.id, "an answer", "complete", 2, None
        )
        assert committed
    finally:
        await pool.close()


# -- data-protection requests ---------------------------------------------------------------------


async def test_export_user_holds_exactly_that_users_data(
    settings: Settings, db: asyncpg.Connection, lifecycle: Lifecycle, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mine = await seed_user(db, "school-a", "stu-1", conversations=2)
    other_tenant = await seed_user(db, "school-b", "stu-1", conversations=2)
    classmate = await seed_user(db, "school-a", "stu-2", conversations=1)
    teacher_note = await _teacher_writes(db, "school-a", "tea-1", mine.conversations[0])

    output = tmp_path / "stu-1.json"
    assert await _cli(settings, "export-user", "--tenant", "school-a", "--user", "stu-1", "--output", str(output)) == 0
    assert "2 conversations, 5 messages, 2 usage rows, 2 flags" in capsys.readouterr().out
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    text = output.read_text()
    document = orjson.loads(text)
    assert document["tenant_id"] == "school-a" and document["user"]["external_id"] == "stu-1"
    assert document["user"]["id"] == mine.user_id
    conversations = document["conversations"]
    assert [c["id"] for c in conversations] == mine.conversations
    assert sorted(m["id"] for c in conversations for m in c["messages"]) == sorted([*mine.messages, teacher_note])
    assert all(m["conversation_id"] == c["id"] for c in conversations for m in c["messages"])
    # How each answer ended is part of the student's data too.
    assert all({"truncated", "error_code", "retryable"} <= m.keys() for c in conversations for m in c["messages"])
    assert sorted(f["id"] for c in conversations for f in c["flags"]) == mine.flags
    assert [u["id"] for u in document["ai_usage"]] == mine.usage
    assert document["messages_in_other_conversations"] == []
    for stamp in [document["exported_at"], document["user"]["created_at"], conversations[0]["updated_at"],
                  conversations[0]["messages"][0]["created_at"]]:
        assert datetime.fromisoformat(stamp).tzinfo is not None
    for foreign in [other_tenant.user_id, *other_tenant.conversations, classmate.user_id, *classmate.conversations]:
        assert foreign not in text

    # To stdout by default; the teacher's export holds what they wrote in the student's conversation.
    assert await _cli(settings, "export-user", "--tenant", "school-a", "--user", "tea-1") == 0
    teacher = orjson.loads(capsys.readouterr().out)
    assert teacher["conversations"] == []
    assert [m["id"] for m in teacher["messages_in_other_conversations"]] == [teacher_note]

    assert await lifecycle.export_user("school-c", "stu-1") is None
    assert await _cli(settings, "export-user", "--tenant", "school-c", "--user", "stu-1") == 1
    assert "no user 'stu-1' in tenant 'school-c'" in capsys.readouterr().err


async def test_delete_user_removes_everything_of_theirs_and_nothing_else(
    settings: Settings, db: asyncpg.Connection, lifecycle: Lifecycle, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = await seed_user(db, "school-a", "stu-1", conversations=2)
    other_tenant = await seed_user(db, "school-b", "stu-1", conversations=2)
    classmate = await seed_user(db, "school-a", "stu-2", conversations=1)
    doomed_note = await _teacher_writes(db, "school-a", "tea-1", doomed.conversations[0])
    kept_note = await _teacher_writes(db, "school-a", "tea-1", classmate.conversations[0])
    before = {t: await _ids(db, t) for t in ("users", "conversations", "messages", "ai_usage", "message_flags")}

    assert await _cli(settings, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes") == 0
    assert "deleted user 'stu-1' of tenant 'school-a': 2 conversations, 5 messages, 2 usage rows, 2 flags" in (
        capsys.readouterr().out
    )
    after = {t: await _ids(db, t) for t in before}
    assert after["users"] == before["users"] - {doomed.user_id}
    assert after["conversations"] == before["conversations"] - set(doomed.conversations)
    assert after["ai_usage"] == before["ai_usage"] - set(doomed.usage)
    assert after["message_flags"] == before["message_flags"] - set(doomed.flags)
    gone = await db.fetchval("SELECT count(*) FROM messages WHERE conversation_id = ANY($1::uuid[])",
                             doomed.conversations)
    assert gone == 0 and after["messages"] == before["messages"] - {*doomed.messages, doomed_note}
    assert set(other_tenant.conversations) | set(classmate.conversations) <= after["conversations"]

    # A teacher's messages in a student's conversation stay with the student, without an author.
    removed = await lifecycle.delete_user("school-a", "tea-1", 3600)
    assert removed is not None and removed.counts == DataCounts() and removed.authored_elsewhere == 1
    assert await db.fetchrow("SELECT text, author_id FROM messages WHERE id = $1", kept_note) == (
        "Try drawing it first.", None
    )
    assert await lifecycle.delete_user("school-a", "tea-1", 3600) is None
    assert await _cli(settings, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes") == 1


async def test_delete_user_wins_over_an_answer_committed_at_the_same_moment(
    settings: Settings, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "database error: deadlock detected", exit 1, and the user and their answer stayed.
    doomed = await seed_user(db, "school-a", "stu-1", conversations=1)
    conversation = doomed.conversations[0]
    reply = await db.fetchval(
        "INSERT INTO messages (tenant_id, conversation_id, role, status) VALUES ('school-a', $1, 'assistant',"
        " 'streaming') RETURNING id",
        conversation,
    )
    # An answer's commit, in the order its statement takes its locks: the answer's row, then (the usage
    # row's foreign keys) the user's; delete-user starts in between.
    answer = await asyncpg.connect(settings.database_url)
    try:
        # The deadlock is found by whichever side has waited deadlock_timeout first; on a loaded machine that
        # could be the answer. delete-user is the side meant to lose (and to retry), so the answer waits longer.
        await answer.execute("SET deadlock_timeout = '30s'")
        async with answer.transaction():
            await answer.execute("UPDATE messages SET text = 'an answer', status = 'complete' WHERE id = $1", reply)
            answer_pid = await answer.fetchval("SELECT pg_backend_pid()")
            deleting = asyncio.create_task(
                _cli(settings, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes")
            )
            # delete-user holds the user's row and waits for the answer's.
            await _blocked_by(db, answer_pid, deleting)
            await answer.execute(
                "INSERT INTO ai_usage (tenant_id, user_id, conversation_id, message_id, provider, model, status)"
                " VALUES ('school-a', $1, $2, $3, 'offline', 'tutor', 'complete')",
                doomed.user_id, conversation, reply,
            )
    finally:
        await answer.close()
    assert await deleting == 0, capsys.readouterr().err
    assert "deleted user 'stu-1' of tenant 'school-a'" in capsys.readouterr().out
    for table in ("users", "conversations", "messages", "ai_usage", "message_flags"):
        assert await _ids(db, table) == set(), table


async def _blocked_by(db: asyncpg.Connection, pid: int, running: asyncio.Task[int]) -> None:
    """Wait until some backend waits for a lock that backend `pid` holds (or `running` ended without waiting)."""
    async with asyncio.timeout(30):
        while not running.done():
            if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid):
                return
            await asyncio.sleep(0.02)


def _smartedu() -> list[str]:
    """`python -m server` once server/__main__.py wires the commands; until then the same two-line wiring."""
    from server.__main__ import _parser

    if any("delete-user" in (getattr(action, "choices", None) or ()) for action in _parser()._actions):
        return [sys.executable, "-m", "server"]
    driver = (
        "import argparse, os, sys\n"
        "from server import lifecycle_cli\n"
        "from server.settings import Settings\n"
        "parser = argparse.ArgumentParser(prog='smartedu')\n"
        "lifecycle_cli.add_commands(parser.add_subparsers(dest='command', required=True))\n"
        "sys.exit(lifecycle_cli.run(parser.parse_args(), Settings.from_env(os.environ)))\n"
    )
    return [sys.executable, "-c", driver]


async def test_delete_user_asks_first_when_run_as_a_command(
    services: Services, settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    doomed = await seed_user(db, "school-a", "stu-1", conversations=1)
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url,
           "SMARTEDU_REDIS_PREFIX": settings.redis_prefix, "SMARTEDU_DATA_DIR": str(tmp_path)}
    command = [*_smartedu(), "delete-user", "--tenant", "school-a", "--user", "stu-1"]

    def answer(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, input=text, capture_output=True, text=True, env=env, timeout=30)

    declined = await asyncio.to_thread(answer, "n\n")
    assert declined.returncode == 1 and "nothing deleted" in declined.stderr, declined
    assert "1 conversation, 2 messages, 1 usage row, 1 flag" in declined.stdout
    assert await _ids(db, "conversations") == set(doomed.conversations)

    confirmed = await asyncio.to_thread(answer, "y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "deleted user 'stu-1'" in confirmed.stdout
    assert await _ids(db, "users") == set()


@pytest.mark.parametrize("command", sorted(lifecycle_cli.LIFECYCLE_COMMANDS))
def test_every_lifecycle_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _args(command, "--help")
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert f"usage: smartedu {command}" in help_text and "example" in help_text


async def test_without_migrate_on_start_the_data_commands_check_the_schema_and_change_nothing(
    settings: Settings, fresh_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A newer checkout run against production, whose replicas do not migrate either: the schema is not
    # changed behind them; the command says what to run.
    target = replace(settings, database_url=fresh_database, migrate_on_start=False)
    for argv in (("purge", "--per-tenant"), ("export-user", "--tenant", "school-a", "--user", "stu-1")):
        assert await _cli(target, *argv) == 1
        assert "lacks migrations 0001_" in capsys.readouterr().err
    conn = await asyncpg.connect(fresh_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()
    # With the setting's default, the command migrates first, as before.
    assert await _cli(replace(target, migrate_on_start=True), "purge", "--per-tenant") == 0
