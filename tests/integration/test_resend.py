"""A resent message gets the same ack as the first, seq included, also while its answer still streams."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Serve, token

pytestmark = pytest.mark.integration


async def test_resend_while_the_answer_streams_gets_the_first_ack(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=40)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="same", text="Explain fractions")
    first = await sock.expect("ack")
    await sock.expect("token")
    await sock.send(type="message", id="same", text="Explain fractions")
    frames = await sock.until("ack")  # tokens of the answer may come first
    assert frames[-1] == first and first["seq"] > 0
    done = (await sock.until("done"))[-1]
    assert done["reply_id"] == first["reply_id"]
    await sock.send(type="message", id="same", text="Explain fractions")
    assert await sock.expect("ack") == first  # and after it ended, from PostgreSQL
    assert await db.fetchval("SELECT count(*) FROM messages") == 2

