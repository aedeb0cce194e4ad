"""The durable floor benchmark server (benchmarks/durable_floor_server.py) keeps the promises it stands for:
a question is in PostgreSQL before its `ack`, the answer before its `done`, the answer's frames are in its
Redis stream log before they are sent, and every question is counted in Redis."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Services

ROOT = Path(__file__).resolve().parents[2]


def _load() -> Any:
    path = ROOT / "benchmarks" / "durable_floor_server.py"
    spec = importlib.util.spec_from_file_location("durable_floor_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up while they are built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def floor(services: Services) -> AsyncIterator[tuple[TestClient[Any, Any], asyncpg.Connection, redis.Redis, str]]:
    module = _load()
    prefix = f"test-durable-floor:{uuid.uuid4().hex[:8]}:"
    client = TestClient(TestServer(module.create_app(services.database_url, services.redis_url, 1, prefix)))
    await client.start_server()
    conn = await asyncpg.connect(services.database_url)
    store = redis.Redis.from_url(services.redis_url)
    try:
        yield client, conn, store, prefix
    finally:
        await client.close()
        await conn.execute("DROP TABLE IF EXISTS durable_floor_messages")
        await conn.close()
        keys = [key async for key in store.scan_iter(match=f"{prefix}*")]
        if keys:
            await store.delete(*keys)
        await store.aclose()


async def _turn(client: TestClient[Any, Any], conversation: str, question: str) -> list[dict[str, Any]]:
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"type": "hello", "token": "unused", "course_id": "c", "conversation_id": conversation})
        assert (await ws.receive_json(timeout=10))["type"] == "welcome"
        await ws.send_json({"type": "message", "id": f"m-{conversation}", "text": question})
        return [await ws.receive_json(timeout=10) for _ in range(3)]


async def test_a_turn_is_durable_before_its_ack_and_done(
    floor: tuple[TestClient[Any, Any], asyncpg.Connection, redis.Redis, str],
) -> None:
    client, conn, store, prefix = floor
    ack, token, done = await _turn(client, "conv-1", "what is a prime?")
    assert [ack["type"], token["type"], done["type"]] == ["ack", "token", "done"]
    assert ack["id"] == "m-conv-1" and done["status"] == "complete" and done["length"] == len(token["text"])
    rows = await conn.fetch(
        "SELECT id::text, role, text FROM durable_floor_messages WHERE tenant_id = 'floor' AND conversation_id = $1"
        " ORDER BY created_at, role DESC",
        "conv-1",
    )
    assert [(r["id"], r["role"], r["text"]) for r in rows] == [
        (ack["message_id"], "user", "what is a prime?"),
        (ack["reply_id"], "assistant", token["text"]),
    ]
    logged = await store.xrange(f"{prefix}log:{{conv-1}}")
    assert [entry[1][b"f"] for entry in logged] == [
        b'{"type":"token","reply_id":"%s","conversation_id":"conv-1","seq":2,"offset":0,"text":"t0 "}'
        % ack["reply_id"].encode(),
        b'{"type":"done","reply_id":"%s","conversation_id":"conv-1","seq":3,"status":"complete","length":3,'
        b'"usage":{"prompt_tokens":0,"output_tokens":1}}' % ack["reply_id"].encode(),
    ]
    assert 0 < await store.ttl(f"{prefix}log:{{conv-1}}") <= 3600
    assert await store.get(f"{prefix}rate:{{conv-1}}") == b"1"
    assert 0 < await store.ttl(f"{prefix}rate:{{conv-1}}") <= 60


async def test_turns_in_flight_together_are_each_kept(
    floor: tuple[TestClient[Any, Any], asyncpg.Connection, redis.Redis, str],
) -> None:
    client, conn, store, prefix = floor
    conversations = [f"conv-{n}" for n in range(20)]
    answers = await asyncio.gather(*(_turn(client, c, f"question {c}") for c in conversations))
    assert all([f["type"] for f in frames] == ["ack", "token", "done"] for frames in answers)
    counts = await conn.fetch(
        "SELECT conversation_id, count(*) AS n FROM durable_floor_messages GROUP BY conversation_id"
    )
    assert {r["conversation_id"]: r["n"] for r in counts} == dict.fromkeys(conversations, 2)
    for conversation in conversations:
        assert await store.xlen(f"{prefix}log:{{{conversation}}}") == 2
