"""Migrations: ordered, recorded once, and safe when several replicas start at the same moment."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest

from storage import migrate
from storage.migrate import Migration, apply_migrations, load_migrations
from storage.postgres import Database
from tests.conftest import Services, with_database

pytestmark = pytest.mark.integration


async def test_concurrent_migrations_apply_each_version_once(services: Services) -> None:
    name = f"smartedu_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(services.database_url, name)
        connections = [await asyncpg.connect(url) for _ in range(4)]
        try:
            results = await asyncio.gather(*(apply_migrations(c) for c in connections))
        finally:
            for conn in connections:
                await conn.close()
        versions = [m.version for m in load_migrations()]
        applied = sorted(v for result in results for v in result)
        assert applied == versions  # every version applied exactly once, by whichever replica won the lock
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
            assert [r["version"] for r in rows] == versions
            assert await apply_migrations(conn) == []
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_migration_longer_than_the_command_timeout_applies_while_another_replica_waits(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Index builds on big tables outlast the pool's command timeout, and so does a replica's wait for the
    lock while another one runs them: neither may fail (every replica would crash-loop)."""
    shipped = load_migrations()
    slow = Migration(9001, "slow_index", "SELECT pg_sleep(1.2); CREATE TABLE slow_probe (id integer)")
    monkeypatch.setattr(migrate, "load_migrations", lambda: [*shipped, slow])
    name = f"smartedu_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(services.database_url, name)
        # The product's pools have a command timeout (30 s); these have a much shorter one.
        pools = [await asyncpg.create_pool(url, min_size=1, max_size=1, command_timeout=0.4) for _ in range(2)]
        try:
            first = asyncio.create_task(Database(pools[0]).migrate())
            async with asyncio.timeout(5):
                while not await admin.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1", name
                ):
                    await asyncio.sleep(0.02)
            with caplog.at_level(logging.INFO, logger="storage.migrate"):
                second = await Database(pools[1]).migrate()
            assert await first == [m.version for m in shipped] + [9001]
            assert second == []
            assert "waiting for the migration lock" in [r.getMessage() for r in caplog.records]
            assert await pools[0].fetchval("SELECT to_regclass('slow_probe') IS NOT NULL")
        finally:
            for pool in pools:
                await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_answers_blocked_before_the_blocked_column_are_marked_by_its_migration(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0006 marks the answers earlier releases committed after a safety block (their question has a flag),
    so they leave the model's context too; not another answer of a flagged question made after the flag."""
    shipped = load_migrations()
    name = f"smartedu_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(with_database(services.database_url, name))
        try:
            monkeypatch.setattr(migrate, "load_migrations", lambda: [m for m in shipped if m.version < 6])
            await apply_migrations(conn)
            await conn.execute("INSERT INTO tenants (id) VALUES ('school-a')")
            user = await conn.fetchval(
                "INSERT INTO users (tenant_id, external_id, role) VALUES ('school-a', 'stu', 'student') RETURNING id"
            )
            conversation = await conn.fetchval(
                "INSERT INTO conversations (tenant_id, user_id) VALUES ('school-a', $1) RETURNING id", user
            )

            async def message(role: str, status: str, reply_to: int | None = None) -> int:
                return int(await conn.fetchval(
                    "INSERT INTO messages (tenant_id, conversation_id, role, text, status, reply_to)"
                    " VALUES ('school-a', $1, $2, 'text', $3, $4) RETURNING id", conversation, role, status, reply_to
                ))

            fine = await message("user", "complete")
            fine_answer = await message("assistant", "complete", fine)
            unsafe = await message("user", "complete")
            blocked = await message("assistant", "complete", unsafe)
            stopped_at_block = await message("user", "complete")
            stopped = await message("assistant", "stopped", stopped_at_block)
            for question in (unsafe, stopped_at_block):
                await conn.execute(
                    "INSERT INTO message_flags (tenant_id, conversation_id, message_id, kind)"
                    " VALUES ('school-a', $1, $2, 'safety_block')", conversation, question
                )
            regenerated = await message("assistant", "complete", stopped_at_block)

            monkeypatch.setattr(migrate, "load_migrations", lambda: shipped)
            assert 6 in await apply_migrations(conn)
            rows = await conn.fetch("SELECT id, blocked FROM messages WHERE role = 'assistant'")
            assert dict(map(tuple, rows)) == {fine_answer: False, blocked: True, stopped: False, regenerated: False}
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
