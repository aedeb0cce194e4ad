"""delete-user and purge against live state: a running server, connected sockets, answers streaming, Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import WSMsgType
from redis.asyncio import Redis

from server.errors import CloseCode
from server.keys import CHAT, REDIS
from server.settings import Settings
from storage.seed import DEMO_STUDENT, DEMO_TENANT
from tests.conftest import Serve, Server, Socket, seed_course, token
from tests.integration.test_cli import SMARTEDU, _chat, _free_port, _start, _stop
from tests.integration.test_lifecycle import _cli, seed_user

pytestmark = pytest.mark.integration


async def _redis_dump(settings: Settings) -> bytes:
    """Every key under the test's prefix and everything stored in it, as one blob to search."""
    assert settings.redis_url
    client = Redis.from_url(settings.redis_url)
    parts: list[bytes] = []
    try:
        async for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
            parts.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                parts.append(await client.get(key) or b"")
            elif kind == "stream":
                parts += [v for _, fields in await client.xrange(key) for v in fields.values()]
            elif kind == "hash":
                parts += [v for pair in (await client.hgetall(key)).items() for v in pair]
            elif kind == "zset":
                parts += await client.zrange(key, 0, -1)
            elif kind == "set":
                parts += list(await client.smembers(key))
    finally:
        await client.aclose()
    return b"\n".join(parts)


async def _ask(sock: Socket, client_id: str, text: str) -> list[dict[str, Any]]:
    await sock.send(type="message", id=client_id, text=text)
    return await sock.until("done")


async def _close_frame(sock: Socket) -> tuple[int, str]:
    """The code and reason of the close frame the server sends, after any text frames."""
    while True:
        msg = await sock.ws.receive(timeout=5)
        if msg.type != WSMsgType.TEXT:
            assert msg.type == WSMsgType.CLOSE, msg
            return int(msg.data), str(msg.extra)


async def _idle(server: Server) -> None:
    """Until no answer runs on the server any more."""
    async with asyncio.timeout(10):
        while server.client.app[CHAT].answers.active:
            await asyncio.sleep(0.05)


async def test_delete_user_while_connected_and_streaming_closes_them_and_leaves_nothing_in_redis(
    serve: Serve, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # Long answers in frequent frames: frames keep coming while the command runs.
    server = await serve(offline_tokens_per_s=1000, offline_reply_words=5000, frame_interval_ms=1)
    for tenant in ("school-a", "school-b"):
        await seed_course(server.settings, tenant, "alg-1", "Algebra")
    teacher = await server.connect({"token": token("tea-1", role="teacher", courses=["alg-1"])})
    await teacher.send(type="watch", course_id="alg-1")
    await teacher.expect("snapshot")
    doomed = await server.connect({"token": token(name="Ada Lovelace", courses=["alg-1"])})
    mine = doomed.frames[0]["conversation_id"]
    # The same external id in another school is another person: untouched.
    other = await server.connect({"token": token(tenant="school-b", name="Bob Builder", courses=["alg-1"])})
    theirs = other.frames[0]["conversation_id"]
    await other.send(type="message", id="b1", text="question-from-bob about fractions")
    bobs_reply = (await other.expect("ack"))["reply_id"]
    await other.until("token")

    await doomed.send(type="message", id="a1", text="question-from-ada about rhombi")
    await doomed.until("token")  # an answer is streaming
    before = await _redis_dump(server.settings)
    assert b"question-from-ada" in before and b"Ada Lovelace" in before and mine.encode() in before

    assert await _cli(server.settings, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes") == 0
    assert "deleted user 'stu-1' of tenant 'school-a'" in capsys.readouterr().out

    # Their socket is closed (it cannot go on chatting into the deleted account), and the teacher is told.
    assert await _close_frame(doomed) == (CloseCode.FORBIDDEN, "account deleted")
    async with asyncio.timeout(5):
        while True:
            event = await teacher.expect("event")
            if event["kind"] == "left":
                assert event["student"]["user_id"] == "stu-1"
                break
    await other.send(type="cancel", reply_id=bobs_reply)
    await _idle(server)
    # A teacher opening the course afterwards does not see them either.
    await teacher.send(type="watch", course_id="alg-1")
    assert (await teacher.until("snapshot"))[-1]["students"] == []
    # The streaming answer's commit recreated nothing: school-a keeps only the teacher and their (empty)
    # conversation from the watch's hello.
    assert await db.fetch("SELECT external_id FROM users WHERE tenant_id = 'school-a'") == [("tea-1",)]
    owners = await db.fetch(
        "SELECT DISTINCT u.external_id FROM conversations c JOIN users u ON u.id = c.user_id"
        " WHERE c.tenant_id = 'school-a'"
    )
    assert owners == [("tea-1",)]
    for table in ("messages", "ai_usage", "message_flags"):
        assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = 'school-a'") == 0, table
    assert await db.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", theirs) == 2
    # Nothing of theirs is readable in Redis any more: no question, answer, name or conversation.
    async with asyncio.timeout(5):
        while True:
            after = await _redis_dump(server.settings)
            if mine.encode() not in after:
                break
            await asyncio.sleep(0.1)
    for personal in (b"question-from-ada", b"Ada Lovelace"):
        assert personal not in after, personal
    # The other school's student keeps everything, and their socket.
    assert b"question-from-bob" in after and b"Bob Builder" in after
    assert (await other.until("done"))[-1]["status"] == "stopped"
    await other.send(type="ping")
    await other.expect("pong")


async def test_purge_removes_the_purged_conversations_stream_logs(
    serve: Serve, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve(offline_tokens_per_s=0)
    old = await server.connect({"token": token("stu-old")})
    purged = old.frames[0]["conversation_id"]
    await _ask(old, "o1", "question-to-be-purged")
    await old.close()
    kept = await server.connect({"token": token("stu-new")})
    await _ask(kept, "n1", "question-to-be-kept")
    await db.execute("UPDATE conversations SET updated_at = now() - interval '400 days' WHERE id = $1", purged)
    await db.execute("UPDATE messages SET created_at = now() - interval '400 days' WHERE conversation_id = $1", purged)
    assert b"question-to-be-purged" in await _redis_dump(server.settings)

    assert await _cli(server.settings, "purge", "--older-than", "365d") == 0
    assert "deleted 1 conversation," in capsys.readouterr().out
    after = await _redis_dump(server.settings)
    assert b"question-to-be-purged" not in after and purged.encode() not in after
    assert b"question-to-be-kept" in after


async def test_without_redis_the_commands_work_and_say_what_was_not_cleaned(
    serve: Serve, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve(offline_tokens_per_s=0)
    sock = await server.connect({"token": token()})
    await _ask(sock, "q1", "a question")
    database_only = replace(server.settings, redis_url=None)
    assert await _cli(database_only, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes") == 0
    captured = capsys.readouterr()
    assert "deleted user 'stu-1'" in captured.out
    assert "REDIS_URL is not set" in captured.err and "not cleaned" in captured.err, captured.err
    assert await db.fetchval("SELECT count(*) FROM users") == 0

    # A purge with a retention longer than the logs live has nothing to say about Redis.
    old = await seed_user(db, "school-a", "stu-2", conversations=1, age_days=400)
    assert await _cli(database_only, "purge", "--older-than", "365d") == 0
    captured = capsys.readouterr()
    assert "deleted 1 conversation," in captured.out and "REDIS_URL" not in captured.err, captured.err
    assert old.conversations[0] not in str(await db.fetch("SELECT id FROM conversations"))

    # A Redis that cannot be reached: the rows are deleted, the command says what it could not do.
    await seed_user(db, "school-a", "stu-3", conversations=1)
    unreachable = replace(server.settings, redis_url="redis://127.0.0.1:1/0")
    assert await _cli(unreachable, "delete-user", "--tenant", "school-a", "--user", "stu-3", "--yes") == 1
    captured = capsys.readouterr()
    assert "deleted user 'stu-3'" in captured.out
    assert "the database rows are deleted, but Redis was not cleaned" in captured.err, captured.err
    assert await db.fetchval("SELECT count(*) FROM users WHERE external_id = 'stu-3'") == 0
    # A daily purge does not fail for logs that have expired anyway.
    await seed_user(db, "school-a", "stu-4", conversations=1, age_days=400)
    assert await _cli(unreachable, "purge", "--older-than", "365d") == 0
    assert "Redis was not cleaned" in capsys.readouterr().err


async def test_delete_user_removes_presence_entries_a_crashed_replica_left_behind(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve(offline_tokens_per_s=0)
    await seed_course(server.settings, "school-a", "alg-1", "Algebra")
    sock = await server.connect({"token": token(courses=["alg-1"])})
    await sock.close()
    # A replica that crashed never takes its sessions off; a classmate's heartbeats keep the course's keys.
    store = server.client.app[REDIS]
    for session, user, name in (("gone", "stu-1", "Ada Lovelace"), ("here", "stu-2", "Grace Hopper")):
        info = orjson.dumps({"session_id": session, "user_id": user, "name": name, "role": "student"})
        await store.announce("school-a", "alg-1", session, info, 60_000)

    assert await _cli(server.settings, "delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes") == 0
    capsys.readouterr()
    after = await _redis_dump(server.settings)
    assert b"Ada Lovelace" not in after and b"Grace Hopper" in after
    assert [s["user_id"] for s in await store.online("school-a", "alg-1")] == ["stu-2"]


def test_in_embedded_mode_delete_user_cleans_the_running_servers_embedded_redis(tmp_path: Path) -> None:
    port = _free_port()
    proc, url = _start(tmp_path, port)
    try:
        token = url.split("token=")[1]
        asyncio.run(_chat(f"http://127.0.0.1:{port}/ws", token, "embedded-question-to-erase"))
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SMARTEDU_JWT_SECRET")}
        env["SMARTEDU_DATA_DIR"] = str(tmp_path / "data")
        deleted = subprocess.run(
            [*SMARTEDU, "delete-user", "--tenant", DEMO_TENANT, "--user", DEMO_STUDENT, "--yes"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert deleted.returncode == 0 and "REDIS_URL is not set" not in deleted.stderr, deleted
        embedded = Settings(redis_url=f"unix://{tmp_path / 'data' / 'redis.sock'}")
        assert b"embedded-question-to-erase" not in asyncio.run(_redis_dump(embedded))
    finally:
        _stop(proc)
