"""A hello that fails part-way leaves nothing behind: no welcome, no session, no hub membership."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server.keys import CHAT
from tests.conftest import Server, seed_course, token

pytestmark = pytest.mark.integration


def _fails_once(original: Callable[..., Awaitable[Any]]) -> tuple[Callable[..., Awaitable[Any]], list[int]]:
    """`original`, except that its first call raises a Redis connection error; and the count of calls."""
    calls = [0]

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RedisConnectionError("redis went away")
        return await original(*args, **kwargs)

    return wrapper, calls


async def test_a_hello_that_fails_late_is_unwound(server: Server) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    chat = server.client.app[CHAT]
    store = chat.hub.store
    store.announce, _ = _fails_once(store.announce)  # type: ignore[method-assign]
    hello = {"type": "hello", "token": token(courses=["alg-1"]), "course_id": "alg-1"}
    sock = await server.connect()
    await sock.send(**hello)
    error = await sock.recv()
    assert error["type"] == "error" and error["code"] == "internal", error  # and no welcome before it
    assert chat._sessions == {}
    assert all(chat.hub.members(c) == 0 for c in list(chat.hub._members))

    await sock.send(**hello)  # the socket still waits for a hello, and this one works
    welcome = await sock.expect("welcome")
    conversation = welcome["conversation_id"]
    assert len(chat._sessions) == 1 and chat.hub.members(conversation) == 1
    await sock.send(type="message", id="m1", text="hi")
    await sock.until("done")

    await sock.close()
    async with asyncio.timeout(5):
        while chat._sessions or chat.hub.members(conversation):
            await asyncio.sleep(0.02)


async def test_a_conversation_whose_join_failed_is_joined_by_the_next_frame(server: Server) -> None:
    for course in ("alg-1", "geo-1"):
        await seed_course(server.settings, "school-a", course, course)
    student = token(courses=["alg-1", "geo-1"])
    other = await server.connect({"token": student, "course_id": "geo-1"})
    geometry = other.frames[0]["conversation_id"]
    await other.close()
    chat = server.client.app[CHAT]
    async with asyncio.timeout(5):
        while chat.hub.members(geometry):
            await asyncio.sleep(0.02)
    await chat.hub.prune()  # this replica lets go of it, so the next join must hold it again
    sock = await server.connect({"token": student, "course_id": "alg-1"})
    store = chat.hub.store
    store.hold, calls = _fails_once(store.hold)  # type: ignore[method-assign]
    await sock.send(type="message", id="g1", text="What is a rhombus?", conversation_id=geometry)
    error = await sock.expect("error")
    assert error["code"] == "internal" and error["ref"] == "g1", error
    assert chat.hub.members(geometry) == 0
    await sock.send(type="message", id="g1", text="What is a rhombus?", conversation_id=geometry)
    assert (await sock.expect("ack"))["conversation_id"] == geometry
    assert calls == [2] and chat.hub.members(geometry) == 1
    await sock.until("done")
