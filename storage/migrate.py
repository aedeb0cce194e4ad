"""Versioned SQL migrations, applied in order under an advisory lock so replicas can race safely."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every replica.
_LOCK_KEY = 0x5EDC_0001
# How long one migration, or the wait for another replica's, may take. Migrations run on connections of the
# product's pool, whose command timeout (30 s) is for its queries: an index build on a big table outlasts
# it, and a replica that gave up waiting for the lock would crash-loop while another one migrates.
MIGRATION_TIMEOUT_S = 24 * 3600.0
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """All migrations shipped in storage/migrations, ordered by version."""
    found: list[Migration] = []
    for entry in resources.files("storage").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def apply_migrations(conn: asyncpg.Connection | PoolConnectionProxy) -> list[int]:
    """Apply every pending migration, each in its own transaction; return the versions applied."""
    applied: list[int] = []
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        log.info("waiting for the migration lock")  # another replica is migrating
        started = time.monotonic()
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY, timeout=MIGRATION_TIMEOUT_S)
        log.info("migration lock taken", extra={"waited_s": round(time.monotonic() - started, 3)})
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql, timeout=MIGRATION_TIMEOUT_S)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
            applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied
