"""Class start: hellos that the database cannot serve in time get an explicit `busy` and a 1013 close,
instead of hanging until the client gives up, and leave nothing registered behind them."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from server.keys import CHAT
from tests.conftest import Serve, seed_course, token

pytestmark = pytest.mark.integration


async def test_a_hello_stuck_behind_a_saturated_database_is_told_busy(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(db_pool_min=1, db_pool_max=1, hello_deadline=0.5)
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    chat = server.client.app[CHAT]
    hello = {"token": token("stu-1", courses=["alg-1"]), "course_id": "alg-1"}
    # Another session holds `users` (a migration, a slow commit): the hello's first statement waits on it,
    # with the pool's only connection, and the second hello waits for that connection.
    lock = db.transaction()
    await lock.start()
    await db.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        first = await server.connect(hello, welcome=False)
        second = await server.connect({**hello, "token": token("stu-2", courses=["alg-1"])}, welcome=False)
        for sock in (first, second):
            error = await sock.expect("error", timeout=3.0)
            assert error["code"] == "busy" and error["retry_after"] > 0, error
            assert await sock.close_code(timeout=3.0) == 1013
    finally:
        await lock.rollback()
    assert chat._sessions == {}
    assert all(chat.hub.members(c) == 0 for c in list(chat.hub._members))
    # The pool's connection came back (the waiting statement was cancelled, not left to finish later).
    again = await server.connect(hello)
    await again.send(type="message", id="m1", text="What is a variable?")
    await again.until("done")
    assert len(chat._sessions) == 1
    await again.close()
    async with asyncio.timeout(5):
        while chat._sessions:
            await asyncio.sleep(0.02)
