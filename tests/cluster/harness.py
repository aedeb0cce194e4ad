"""The cluster topology for tests: N `smartedu serve` processes behind a native NGINX.

The processes are the same `Replica` and `Nginx` that `smartedu cluster` runs (server/cluster.py); only
the services differ (the suite's fresh database and Redis, a private Redis prefix and tenant) and the
offline tutor is paced so an answer takes about a second and a half.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from server.cluster import Nginx, Replica, replica_env, stop_replicas, tail
from tests.conftest import TEST_SECRET, Services, Socket, token

DRAIN_SECONDS = 3.0
# The offline tutor at this pace answers in about 1.5 s: long enough to cut, kill or drain mid-answer.
TUTOR_ENV = {
    "SMARTEDU_AI": "offline",
    "SMARTEDU_OFFLINE_TTFT_MS": "50",
    "SMARTEDU_OFFLINE_TOKENS_PER_S": "60",
    "SMARTEDU_DRAIN_SECONDS": str(DRAIN_SECONDS),
    "SMARTEDU_MESSAGES_PER_MINUTE": "10000",
    "SMARTEDU_DB_POOL_MIN": "1",
    "SMARTEDU_DB_POOL_MAX": "8",
    "SMARTEDU_LOG_LEVEL": "INFO",
}
COURSE = "algebra-1"
WATCHED_COURSE = "geometry-watch"
COURSES = {
    COURSE: ("Algebra I", "Linear equations and their graphs."),
    WATCHED_COURSE: ("Geometry", "Angles, triangles and circles."),
}


def client_address(i: int) -> str:
    """A loopback source address for client `i`.

    NGINX's ip_hash keys on the first three octets of an IPv4 address, so 127.0.0.2 and 127.0.0.3 count
    as one client; these addresses differ in the third (and second) octet. All of 127/8 is loopback on
    Linux, so no interface needs configuring.
    """
    return f"127.{1 + i // 250}.{1 + i % 250}.1"


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (held open together so they are distinct)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class ClusterSocket(Socket):
    """A protocol socket that owns its ClientSession (one per source address)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession, source: str):
        super().__init__(ws)
        self.session = session
        self.source = source

    async def close(self) -> None:
        try:
            await self.ws.close()
        finally:
            await self.session.close()


@dataclass
class ReplicaHandle:
    """One replica under test: kill it, drain it, bring it back."""

    process: Replica

    @property
    def replica_id(self) -> str:
        return self.process.replica_id

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def running(self) -> bool:
        return self.process.running

    def kill9(self) -> int | None:
        return self.process.kill()

    async def terminate(self, timeout: float = DRAIN_SECONDS + 15) -> int | None:
        """SIGTERM and wait for the exit code (None if it had to be killed after `timeout`)."""
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, timeout)
        if code is None:
            await asyncio.to_thread(self.process.kill)
        return code

    async def restart(self) -> None:
        """Stop it if it runs, start it again on the same port, and wait for `/ready`."""
        if self.running:
            await self.terminate()
        self.process.start()
        await asyncio.to_thread(self.process.wait_ready, 60.0)

    async def ensure_running(self) -> None:
        if not self.running:
            await self.restart()


@dataclass
class Cluster:
    replicas: list[ReplicaHandle]
    nginx: Nginx
    services: Services = field(repr=False)
    tenant: str
    redis_prefix: str
    _clients: list[ClusterSocket] = field(default_factory=list, repr=False)

    # -- topology -------------------------------------------------------------------------------

    def replica(self, k: int) -> ReplicaHandle:
        """Replica `k`, counting from 1 like their ids (replica-1 ...)."""
        return self.replicas[k - 1]

    @property
    def nginx_url(self) -> str:
        return self.nginx.url

    def log_tails(self, lines: int = 15) -> str:
        parts = [f"--- {r.replica_id} ({r.process.log_path})\n{tail(r.process.log_path, lines)}" for r in self.replicas]
        parts.append(f"--- nginx ({self.nginx.error_log})\n{tail(self.nginx.error_log, lines)}")
        return "\n".join(parts)

    # -- identities -----------------------------------------------------------------------------

    def student_token(self, user: str, *, name: str | None = None) -> str:
        return token(user, tenant=self.tenant, name=name or user)

    def teacher_token(self, user: str, courses: list[str]) -> str:
        return token(user, role="teacher", tenant=self.tenant, courses=courses, name=user)

    # -- clients --------------------------------------------------------------------------------

    async def _open(
        self, base_url: str, hello: Mapping[str, Any] | None, source: str, welcome: bool, timeout: float
    ) -> ClusterSocket:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))
        try:
            ws = await session.ws_connect(
                base_url + "/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5.0), autoping=True
            )
        except BaseException:
            await session.close()
            raise
        sock = ClusterSocket(ws, session, source)
        self._clients.append(sock)
        if hello is not None:
            await sock.send(type="hello", **hello)
            if welcome:
                await sock.expect("welcome", timeout)
        return sock

    async def connect_direct(
        self,
        k: int,
        hello: Mapping[str, Any] | None = None,
        *,
        source: str = "127.0.0.1",
        welcome: bool = True,
        timeout: float = 10.0,
    ) -> ClusterSocket:
        """A socket straight to replica `k` (bypassing NGINX)."""
        return await self._open(self.replica(k).url, hello, source, welcome, timeout)

    async def connect_nginx(
        self,
        hello: Mapping[str, Any] | None = None,
        *,
        source: str | None = None,
        welcome: bool = True,
        timeout: float = 10.0,
    ) -> ClusterSocket:
        """A socket through NGINX from `source` (a loopback address; ip_hash picks the replica by it)."""
        return await self._open(self.nginx_url, hello, source or client_address(0), welcome, timeout)

    async def close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)

    async def replica_behind_nginx(self, source: str) -> str:
        """The replica NGINX routes `source` to (from `/health`)."""
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(self.nginx_url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            assert response.status == 200, await response.text()
            body = await response.json()
            return str(body["replica"])

    async def committed_messages(self, student_token: str, conversation_id: str) -> list[dict[str, Any]]:
        """The conversation's newest 100 messages from the HTTP API, through NGINX, oldest first."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.nginx_url}/api/conversations/{conversation_id}/messages",
                params={"limit": "100"},
                headers={"Authorization": f"Bearer {student_token}"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response,
        ):
            assert response.status == 200, await response.text()
            body = await response.json()
            messages: list[dict[str, Any]] = body["messages"]
            return messages

    async def committed_message(self, student_token: str, conversation_id: str, message_id: int) -> dict[str, Any]:
        messages = await self.committed_messages(student_token, conversation_id)
        found = [m for m in messages if m["id"] == message_id]
        assert found, f"message {message_id} is not in the API's page: {messages}"
        return found[0]

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.services.database_url)
        try:
            yield conn
        finally:
            await conn.close()


async def _seed(database_url: str, tenant: str) -> None:
    from storage.postgres import Database

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        for course, (title, description) in COURSES.items():
            await Database(pool).upsert_course(tenant, course, title, description)
    finally:
        await pool.close()


async def _forget_redis_keys(redis_url: str, prefix: str) -> None:
    from redis.asyncio import from_url

    client = from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=prefix + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


def _base_env() -> dict[str, str]:
    """The test process's environment without anything that would configure the replicas differently."""
    skip = ("DATABASE_URL", "REDIS_URL", "GEMINI_API_KEY", "OPENAI_API_KEY")
    return {k: v for k, v in os.environ.items() if k not in skip and not k.startswith("SMARTEDU_")}


@contextlib.contextmanager
def running_cluster(services: Services, nginx_binary: str, *, replicas: int = 3) -> Iterator[Cluster]:
    """Start `replicas` replicas and NGINX; stop everything (even after a failure) on exit."""
    run_id = uuid.uuid4().hex[:10]
    tenant = f"cluster-{run_id}"
    redis_prefix = f"test:cluster:{run_id}:"
    workdir = Path(tempfile.mkdtemp(prefix="smartedu-cluster-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        stack.callback(lambda: asyncio.run(_forget_redis_keys(services.redis_url, redis_prefix)))
        asyncio.run(_seed(services.database_url, tenant))
        *replica_ports, nginx_port = free_ports(replicas + 1)
        origins = [f"http://127.0.0.1:{nginx_port}"]
        handles = []
        for k, port in enumerate(replica_ports, start=1):
            env = replica_env(
                _base_env(),
                replica_id=f"replica-{k}",
                database_url=services.database_url,
                redis_url=services.redis_url,
                jwt_secret=TEST_SECRET,
                allowed_origins=origins,
                extra={**TUTOR_ENV, "SMARTEDU_REDIS_PREFIX": redis_prefix},
            )
            handles.append(ReplicaHandle(Replica(f"replica-{k}", port, env, workdir / "logs" / f"replica-{k}.log")))
        processes = [h.process for h in handles]
        stack.callback(stop_replicas, processes, DRAIN_SECONDS + 10)
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready(60)
        nginx = Nginx(nginx_binary, workdir / "nginx", nginx_port, [f"127.0.0.1:{p}" for p in replica_ports])
        stack.callback(nginx.stop)
        nginx.start()
        yield Cluster(handles, nginx, services, tenant, redis_prefix)
