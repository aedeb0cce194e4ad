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
