"""Read-only check that the database has every migration this build ships, for replicas that do not migrate."""

from __future__ import annotations

import asyncpg

from .migrate import Migration, load_migrations


async def pending_migrations(pool: asyncpg.Pool) -> list[Migration]:
    """The shipped migrations that schema_migrations does not list; reads only (no DDL, no lock)."""
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            applied: set[int] = set()
        else:
            applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    return [migration for migration in load_migrations() if migration.version not in applied]
