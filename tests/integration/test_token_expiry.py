"""A socket lives as long as its token: when the token expires the server closes it with 4401 (a hello with
that token would be refused), and the client signs in again."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import CloseCode
from server.keys import CHAT
from tests.conftest import Server, token

pytestmark = pytest.mark.integration


async def test_a_socket_is_closed_when_its_token_expires(server: Server) -> None:
    expiring = await server.connect({"token": token("stu-1", ttl_s=2)})
    lasting = await server.connect({"token": token("stu-2", ttl_s=3600)})
    assert await expiring.close_code(timeout=8.0) == CloseCode.BAD_TOKEN
    chat = server.client.app[CHAT]
    async with asyncio.timeout(5):
        while len(chat._sessions) != 1:
            await asyncio.sleep(0.02)
    await lasting.send(type="ping")
    assert (await lasting.expect("pong"))["type"] == "pong"
