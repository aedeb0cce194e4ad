"""A socket that stops reading must not hold up the others: each peer has a bounded backlog of its own,
and a peer that falls too far behind is closed (1013) instead of stalling the fan-out."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import uvloop
from aiohttp.test_utils import TestClient, TestServer

from server import peer
from server.app import SHUTDOWN_CLOSE_TIMEOUT_S, create_app, stop
from server.hub import Hub
from server.keys import CHAT, METRICS
from server.settings import Settings
from tests.conftest import Serve, Server, Socket, seed_course, token

pytestmark = pytest.mark.integration


class StalledClient:
    """A WebSocket client on a tiny receive buffer that says hello, reads its welcome, then never reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: Server, hello: dict[str, object]) -> StalledClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (str(server.client.host), int(server.client.port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: {server.client.host}:{server.client.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer)
        client.send({"type": "hello", **hello})
        seen = b""
        async with asyncio.timeout(5):
            while b'"welcome"' not in seen:
                seen += await reader.read(1024)
        return client

    def send(self, frame: dict[str, object]) -> None:
        payload = orjson.dumps(frame)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 65536
        size = len(payload)
        length = struct.pack("!B", 0x80 | size) if size < 126 else struct.pack("!BH", 0xFE, size)
        self.writer.write(b"\x81" + length + mask + masked)

    async def closed_by_server(self, timeout: float) -> bool:
        """Read everything now: True when the server has closed (or aborted) the connection."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def abort(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
async def stalled() -> AsyncIterator[list[StalledClient]]:
    clients: list[StalledClient] = []
    yield clients
    for client in clients:
        client.abort()


def _small_send_buffers(hub: Hub, conversation: str) -> None:
    """Loopback lets the kernel buffer megabytes for a client that does not read: small send buffers on
    the server's side, as a slow mobile link leaves in effect, so that a stall reaches the server soon."""
    peers = [m.peer for m in hub._members[conversation].values()]
    for watchers in hub._watchers.values():
        peers += watchers.values()
    for each in peers:
        assert isinstance(each, peer.WebSocketPeer) and each._transport is not None
        each._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)


async def _read_all(sock: Socket, arrivals: dict[str, float]) -> None:
    """Keep reading (a test socket not read would stall too), noting when each teacher message arrives."""
    while True:
        frame = await sock.recv(timeout=60)
        if frame["type"] == "event" and frame["kind"] == "frame":
            frame = frame["frame"]
        if frame["type"] == "teacher_message":
            arrivals[frame["id"]] = time.monotonic()


@pytest.mark.parametrize("across", [False, True], ids=["one replica", "from another replica"])
async def test_stalled_sockets_do_not_delay_the_others(
    serve: Serve, stalled: list[StalledClient], monkeypatch: pytest.MonkeyPatch, across: bool
) -> None:
    """A student tab and a teacher stop reading while a teacher writes to the conversation again and again:
    the healthy tab and teacher get each message within milliseconds all along, and the stalled sockets
    are closed once their backlog is full. Before, the fan-out waited on the first stalled socket for
    ever: after about 250 KB, neither the healthy tab nor the teacher got anything more. From another
    replica, that stalled the replica's pub/sub listener, so every conversation held there."""
    monkeypatch.setattr(peer, "BACKLOG_LIMIT_BYTES", 256 * 1024)
    await _flood_past_stalled_sockets(serve, stalled, across)


def test_stalled_sockets_do_not_delay_the_others_on_uvloop(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`smartedu serve` runs on uvloop, whose transports are not asyncio's classes (the backlog once
    went unused there, checked by isinstance): the same flood, on uvloop."""
    monkeypatch.setattr(peer, "BACKLOG_LIMIT_BYTES", 256 * 1024)

    async def run() -> None:
        clients: list[TestClient[Any, Any]] = []
        stalled: list[StalledClient] = []

        async def serve(**overrides: Any) -> Server:
            current = replace(settings, **overrides)
            client: TestClient[Any, Any] = TestClient(TestServer(create_app(current, env={})))
            await client.start_server()
            clients.append(client)
            return Server(client, current)

        try:
            await _flood_past_stalled_sockets(serve, stalled, across=False)
        finally:
            for each in stalled:
                each.abort()
            for client in clients:
                await client.close()

    uvloop.run(run())


async def _flood_past_stalled_sockets(serve: Serve, stalled: list[StalledClient], across: bool) -> None:
    server = await serve(replica_id="replica-a")
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I", "Equations.")
    tab = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = tab.frames[0]["conversation_id"]
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    await teacher.send(type="watch", course_id="alg-1")
    await teacher.expect("snapshot")
    author = teacher
    if across:
        other = await serve(replica_id="replica-b")
        author = await other.connect({"token": token("teach-3", role="teacher", courses=["alg-1"])})
    hello = {"token": token(courses=["alg-1"]), "conversation_id": conversation}
    stalled.append(await StalledClient.open(server, hello))
    stalled.append(await StalledClient.open(server, {"token": token("teach-2", role="teacher", courses=["alg-1"])}))
    stalled[1].send({"type": "watch", "course_id": "alg-1"})
    hub = server.client.app[CHAT].hub
    async with asyncio.timeout(5):
        while len(hub._watchers.get(("school-a", "alg-1"), ())) < 2:
            await asyncio.sleep(0.01)
    assert hub.members(conversation) == 2
    _small_send_buffers(hub, conversation)

    sent: dict[str, float] = {}
    at_tab: dict[str, float] = {}
    at_teacher: dict[str, float] = {}
    readers = [asyncio.create_task(_read_all(tab, at_tab)), asyncio.create_task(_read_all(teacher, at_teacher))]
    try:
        async with asyncio.timeout(30):
            for i in range(600):  # 2.4 MB to each socket
                sent[f"n{i}"] = time.monotonic()
                await author.send(type="intervene", conversation_id=conversation, id=f"n{i}", text="x" * 4000)
                while f"n{i}" not in at_tab or f"n{i}" not in at_teacher:
                    await asyncio.sleep(0.001)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    lags = sorted(max(at_tab[i], at_teacher[i]) - sent[i] for i in sent)
    median, longest = lags[len(lags) // 2], lags[-1]
    print(f"{across=}: round trip to the healthy sockets: median {median * 1000:.0f} ms, max {longest * 1000:.0f} ms")
    assert median < 0.1 and longest < 2
    for client in stalled:
        assert await client.closed_by_server(10)
    assert hub.members(conversation) == 1
    assert len(hub._watchers[("school-a", "alg-1")]) == 1


async def test_an_answer_streams_on_while_another_tab_stalls(
    serve: Serve, stalled: list[StalledClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's task emits each frame to every tab of the conversation: a tab that stops reading
    neither slows the answer for the other tab nor keeps it from being committed."""
    monkeypatch.setattr(peer, "BACKLOG_LIMIT_BYTES", 64 * 1024)
    server = await serve(offline_tokens_per_s=5000, offline_ttft_ms=0, offline_reply_words=4000, frame_interval_ms=5,
                         max_output_tokens=10000)
    tab = await server.connect({"token": token()})
    conversation = tab.frames[0]["conversation_id"]
    stalled.append(await StalledClient.open(server, {"token": token(), "conversation_id": conversation}))
    hub = server.client.app[CHAT].hub
    assert hub.members(conversation) == 2
    _small_send_buffers(hub, conversation)

    await tab.send(type="message", id="long", text="Tell me everything")
    await tab.expect("ack")
    arrivals = [time.monotonic()]
    frames = []
    async with asyncio.timeout(30):
        while not frames or frames[-1]["type"] != "done":
            frames.append(await tab.recv())
            arrivals.append(time.monotonic())
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    print(f"{len(frames)} frames in {arrivals[-1] - arrivals[0]:.2f} s, longest gap {gaps[-1] * 1000:.0f} ms")
    assert frames[-1]["status"] == "complete" and gaps[-1] < 1
    assert await stalled[0].closed_by_server(10)
    assert hub.members(conversation) == 1
    assert server.client.app[METRICS].registry.get_sample_value("smartedu_slow_sockets_closed_total") == 1


async def test_a_stalled_client_does_not_hold_up_stopping(
    serve: Serve, stalled: list[StalledClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping closes every socket with 1012, after the frames already queued for it. A client that has
    stopped reading with frames still queued (not yet far enough behind to be closed for it) is dropped
    after SHUTDOWN_CLOSE_TIMEOUT_S. Before, its close waited on its full connection with no limit, until
    the stop deadline (8 s) gave up on the whole cleanup behind it (interrupted answers, the pools)."""
    monkeypatch.setattr(peer, "BACKLOG_LIMIT_BYTES", 64 << 20)  # never closed for falling behind here
    server = await serve()
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I", "Equations.")
    tab = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = tab.frames[0]["conversation_id"]
    hub = server.client.app[CHAT].hub
    healthy = {m.peer for m in hub._members[conversation].values()}
    hello = {"token": token(courses=["alg-1"]), "conversation_id": conversation}
    stalled.append(await StalledClient.open(server, hello))
    _small_send_buffers(hub, conversation)
    stuck = [m.peer for m in hub._members[conversation].values() if m.peer not in healthy]
    assert len(stuck) == 1 and isinstance(stuck[0], peer.WebSocketPeer)
    teacher = await server.connect({"token": token("teach-1", role="teacher", courses=["alg-1"])})
    await teacher.send(type="watch", course_id="alg-1")
    await teacher.expect("snapshot")
    for i in range(400):  # until the stalled client's frames queue up behind its full connection
        await teacher.send(type="intervene", conversation_id=conversation, id=f"n{i}", text="x" * 4000)
        await tab.expect("teacher_message")  # the healthy tab keeps reading
        if stuck[0]._backlog:
            break
    assert stuck[0]._backlog
    runner = server.client.server.runner
    assert runner is not None
    started = time.monotonic()
    finished = await stop(runner)
    elapsed = time.monotonic() - started
    print(f"stopped in {elapsed:.2f} s")
    assert finished and elapsed < SHUTDOWN_CLOSE_TIMEOUT_S + 2
    assert await stalled[0].closed_by_server(1)
