"""Shared fixtures: real PostgreSQL and Redis (from TEST_DATABASE_URL/TEST_REDIS_URL, else embedded).

Each test run creates its own database (the suite refuses to touch an existing one), each test starts
from empty tables and gets its own Redis key prefix.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.auth import mint_token
from server.embedded import EmbeddedServices
from server.keys import CHAT, REDIS
from server.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

TEST_SECRET = "test-secret-" + "x" * 60
IN_CI = os.environ.get("CI", "").lower() == "true"

TABLES = (
    "message_flags, document_passages, ai_usage, messages, conversations, course_documents, courses, users, tenants,"
    " erased_users, revoked_sessions"
)


def require_tool(path: str | None, what: str) -> str:
    """The tool's path; in CI a missing tool fails the test, elsewhere it skips it."""
    if path:
        return path
    message = f"{what} is not installed (.ci/run installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def interrupt(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Stop a server process as Ctrl-C would, unless it has ended; kill it if it outlasts `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str


def with_database(url: str, name: str) -> str:
    """The same server's URL for another database (its query, such as an embedded server's socket, kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    from storage.migrate import apply_migrations

    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """One fresh database and one Redis for the whole run; embedded servers when no URLs are given."""
    admin_url = os.environ.get("TEST_DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL")
    embedded: EmbeddedServices | None = None
    data_dir = Path(tempfile.mkdtemp(prefix="smartedu-test-"))
    try:
        if not admin_url or not redis_url:
            embedded = EmbeddedServices(data_dir)
            try:
                embedded.start(postgres=not admin_url, redis=not redis_url)
            except Exception as exc:  # a missing service is a failure, never a skip
                pytest.fail(f"could not start embedded PostgreSQL/Redis: {exc}")
            admin_url = admin_url or embedded.database_url
            redis_url = redis_url or embedded.redis_url
        name = f"smartedu_test_{uuid.uuid4().hex[:10]}"
        asyncio.run(_create_database(admin_url, name))
        database_url = with_database(admin_url, name)
        asyncio.run(_migrate(database_url))
        try:
            yield Services(database_url, redis_url)
        finally:
            asyncio.run(_drop_database(admin_url, name))
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def clean_settings(services: Services, redis_url: str | None = None) -> Settings:
    """Test settings on empty tables and a fresh Redis prefix."""
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return Settings(
        database_url=services.database_url,
        redis_url=redis_url or services.redis_url,
        jwt_secret=TEST_SECRET,
        redis_prefix=f"test:{uuid.uuid4().hex[:12]}:",
        offline_ttft_ms=0,
        offline_tokens_per_s=0,
        messages_per_minute=1000,
        db_pool_min=1,
        db_pool_max=5,
        replica_id="test",
    )


@pytest.fixture
async def settings(services: Services) -> Settings:
    return await clean_settings(services)


@pytest.fixture
async def db(services: Services) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for assertions about what is committed."""
    conn = await asyncpg.connect(services.database_url)
    try:
        yield conn
    finally:
        await conn.close()


def token(
    user: str = "stu-1",
    *,
    role: str = "student",
    tenant: str = "school-a",
    courses: list[str] | None = None,
    ttl_s: int = 3600,
    secret: str = TEST_SECRET,
    name: str | None = None,
) -> str:
    return mint_token(secret, user=user, tenant=tenant, role=role, courses=courses, ttl_s=ttl_s, name=name)


class Socket:
    """A protocol client for tests: JSON in, JSON out, with helpers to wait for frame types."""

    def __init__(self, ws: ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}")
        frame: dict[str, Any] = orjson.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def until(self, kind: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every frame up to and including the first of type `kind`."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                seen.append(frame)
                if frame["type"] == kind:
                    return seen

    async def close_code(self, timeout: float = 5.0) -> int | None:
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type == WSMsgType.TEXT:
                self.frames.append(orjson.loads(msg.data))

    async def close(self) -> None:
        await self.ws.close()


Connect = Callable[..., Awaitable[Socket]]


@dataclass
class Server:
    """A running app under test, its settings, and a way to open protocol sockets to it."""

    client: TestClient[Any, Any]
    settings: Settings

    async def connect(
        self, hello: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None, welcome: bool = True
    ) -> Socket:
        """Open a socket and (unless hello is None) say hello; the welcome is read when `welcome`."""
        ws = await self.client.ws_connect("/ws", headers=headers or {})
        sock = Socket(ws)
        if hello is not None:
            await sock.send(type="hello", **hello)
            if welcome:
                await sock.expect("welcome")
        return sock


async def kill_pubsub_of(server: Server) -> None:
    """Drop one replica's pub/sub connection (its own socket: other runs on the same Redis are left alone)."""
    hub = server.client.app[CHAT].hub
    assert hub._pubsub is not None and hub._pubsub.connection is not None
    writer = hub._pubsub.connection._writer
    assert writer is not None
    writer.transport.abort()


def hold_pubsub_reconnects(server: Server, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the replica's next pub/sub connections wait before they subscribe, so that what is published
    meanwhile is missed for sure: (set when it is reconnecting, set it to let it go on)."""
    client = server.client.app[REDIS].client
    pubsub = client.pubsub
    reconnecting, let_go = asyncio.Event(), asyncio.Event()

    def held(**kwargs: Any) -> Any:
        connection = pubsub(**kwargs)
        subscribe = connection.subscribe

        async def subscribe_later(*args: Any, **kw: Any) -> Any:
            reconnecting.set()
            await let_go.wait()
            return await subscribe(*args, **kw)

        connection.subscribe = subscribe_later
        return connection

    monkeypatch.setattr(client, "pubsub", held)
    return reconnecting, let_go


Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
def serve(aiohttp_client: Any, settings: Settings) -> Serve:
    """Start the app with the test settings plus overrides (e.g. a slower offline tutor)."""

    async def _serve(*, env: dict[str, str] | None = None, **overrides: Any) -> Server:
        current = replace(settings, **overrides)
        # Tests never read the machine's environment (no real API keys): `env` is all the provider sees.
        client: TestClient[Any, Any] = await aiohttp_client(create_app(current, env=env or {}))
        return Server(client, current)

    return _serve


@pytest.fixture
async def server(serve: Serve) -> Server:
    return await serve()


@pytest.fixture
def connect(server: Server) -> Connect:
    return server.connect


def welcome_of(sock: Socket) -> dict[str, Any]:
    return next(f for f in sock.frames if f["type"] == "welcome")


async def seed_course(
    settings: Settings, tenant: str, course: str, title: str = "Course", description: str = ""
) -> None:
    from storage.postgres import Database

    assert settings.database_url
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        await Database(pool).upsert_course(tenant, course, title, description)
    finally:
        await pool.close()


def commit_then_lose_the_reply(run: Callable[[list[T]], Awaitable[list[R]]]) -> Callable[[list[T]], Awaitable[list[R]]]:
    """A batch statement (`run`) whose batches of two or more commit, then fail as if the connection had
    dropped before PostgreSQL's reply arrived."""

    async def lossy(items: list[T]) -> list[R]:
        results = await run(items)
        if len(items) > 1:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return results

    return lossy


def answer_text(frames: list[dict[str, Any]], reply_id: int) -> str:
    """The answer as the client saw it, checking that token offsets are contiguous."""
    text = ""
    for frame in frames:
        if frame["type"] == "token" and frame["reply_id"] == reply_id:
            assert frame["offset"] == len(text), (frame, len(text))
            text += frame["text"]
    return text
