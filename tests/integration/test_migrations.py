"""Migrations: ordered, recorded once, and safe when several replicas start at the same moment."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from storage.migrate import apply_migrations, load_migrations
from tests.conftest import Services, _with_database

pytestmark = pytest.mark.integration


async def test_concurrent_migrations_apply_each_version_once(services: Services) -> None:
    name = f"smartedu_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(services.database_url, name)
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
