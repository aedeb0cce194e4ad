"""The frame limit counts bytes of UTF-8, as documented; a frame far over it closes the socket (1009)."""

from __future__ import annotations

import pytest
from aiohttp import WSCloseCode

from tests.conftest import Server, token

pytestmark = pytest.mark.integration


async def test_the_frame_limit_counts_bytes(server: Server) -> None:
    limit = server.settings.max_frame_bytes
    sock = await server.connect({"token": token()})
    fits = '{"type":"ping","pad":"' + "é" * ((limit - 40) // 2) + '"}'  # two bytes each
    assert len(fits.encode()) <= limit
    await sock.ws.send_str(fits)
    assert (await sock.expect("pong"))["type"] == "pong"
    over = '{"type":"ping","pad":"' + "é" * (limit // 2 + 10) + '"}'  # fewer characters than the limit
    assert len(over) < limit < len(over.encode())
    await sock.ws.send_str(over)
    error = await sock.expect("error")
    assert error["code"] == "too_large" and f"{limit} bytes" in error["message"]
    await sock.send(type="ping")  # refused, and the socket goes on
    assert (await sock.expect("pong"))["type"] == "pong"


async def test_a_frame_far_over_the_limit_closes_with_1009(server: Server) -> None:
    sock = await server.connect({"token": token()})
    await sock.ws.send_str('{"type":"ping","pad":"' + "y" * (server.settings.max_frame_bytes * 4) + '"}')
    assert await sock.close_code() == WSCloseCode.MESSAGE_TOO_BIG == 1009
