"""`smartedu serve` with SMARTEDU_MIGRATE_ON_START=false: a data-only database role, migrations left to a Job.

The least-privilege setup of docs/deploy.md: the migration Job connects as a role that may change the
schema, the replicas as one that may only read and write rows. A replica that migrated on start ran
CREATE TABLE IF NOT EXISTS schema_migrations and died with "permission denied for schema public".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import TEST_SECRET, Services, interrupt, token

pytestmark = pytest.mark.integration

SMARTEDU = [sys.executable, "-m", "server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as(url: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    user = user or parts.username or ""
    # Only the user changes: the host stays as given (empty, with ?host=/socket/dir, for the embedded server).
    where = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{password}@{where}" if password else f"{user}@{where}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + database if database else parts.path))


def _env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("SMARTEDU_") and key not in ("DATABASE_URL", "REDIS_URL", "GEMINI_API_KEY")
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SMARTEDU_JWT_SECRET=TEST_SECRET,
        SMARTEDU_REDIS_PREFIX=f"test:{uuid.uuid4().hex[:12]}:",
        SMARTEDU_AI="offline",
        SMARTEDU_OFFLINE_TTFT_MS="0",
        SMARTEDU_OFFLINE_TOKENS_PER_S="0",
        SMARTEDU_DB_POOL_MIN="1",
        SMARTEDU_DB_POOL_MAX="2",
        **extra,
    )
    return env


@dataclass(frozen=True)
class DataOnlyRole:
    url: str


@contextlib.asynccontextmanager
async def data_only_role(database_url: str) -> AsyncIterator[DataOnlyRole]:
    """A login role that may read and write the tables of the migrated test database, and nothing else."""
    name = f"smartedu_app_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    database = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}")
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}")
        # PostgreSQL 15+ already withholds CREATE on public from ordinary roles; older servers grant it.
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        yield DataOnlyRole(_as(database_url, user=name, password=password))
    finally:
        await conn.execute(f"DROP OWNED BY {name}")
        await conn.execute(f"DROP ROLE {name}")
        await conn.close()


@contextlib.asynccontextmanager
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database no migration has touched, as an operator's is before the first migration Job."""
    name = f"smartedu_test_{uuid.uuid4().hex[:10]}_empty"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield _as(database_url, database=name)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@contextlib.contextmanager
def serving(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*SMARTEDU, "serve", "--no-seed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        interrupt(proc, 30)
        assert proc.stderr is not None
        proc.stderr.close()


async def wait_ready(proc: subprocess.Popen[str], base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(base_url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError("serve did not become ready")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Exit code and standard error of a process expected to stop by itself."""
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


async def test_a_data_only_role_serves_when_the_app_does_not_migrate(services: Services) -> None:
    async with data_only_role(services.database_url) as role:
        port = _free_port()
        env = _env(role.url, services.redis_url, SMARTEDU_PORT=str(port), SMARTEDU_MIGRATE_ON_START="false")
        with serving(env) as proc:
            await wait_ready(proc, f"http://127.0.0.1:{port}")
            # A hello writes the user: the role's row privileges are all a replica needs.
            async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_str(orjson.dumps({"type": "hello", "token": token("least-privilege")}).decode())
                frame = orjson.loads((await ws.receive(timeout=10)).data)
                assert frame["type"] == "welcome", frame

        # The default still migrates on start, which such a role may not do.
        with serving(_env(role.url, services.redis_url, SMARTEDU_PORT=str(_free_port()))) as proc:
            code, stderr = await asyncio.to_thread(finish, proc)
        assert code != 0 and "permission denied for schema public" in stderr, stderr


async def test_a_replica_refuses_a_database_with_pending_migrations_and_changes_nothing(services: Services) -> None:
    async with empty_database(services.database_url) as url:
        env = _env(url, services.redis_url, SMARTEDU_PORT=str(_free_port()), SMARTEDU_MIGRATE_ON_START="false")
        with serving(env) as proc:
            code, stderr = await asyncio.to_thread(finish, proc)
        assert code == 2, stderr
        assert "the database lacks migrations 0001_" in stderr and "smartedu migrate" in stderr, stderr
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
        finally:
            await conn.close()

        # The Job runs `smartedu migrate` with the same ConfigMap (SMARTEDU_MIGRATE_ON_START=false): it migrates.
        migrate = await asyncio.to_thread(
            subprocess.run, [*SMARTEDU, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert migrate.returncode == 0, migrate.stderr
        port = _free_port()
        with serving({**env, "SMARTEDU_PORT": str(port)}) as proc:
            await wait_ready(proc, f"http://127.0.0.1:{port}")
