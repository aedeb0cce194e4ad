"""TCP keepalive on PostgreSQL connections (storage/postgres.py): the options it sets, on the sockets of
both event loops the server may run on, and none on a Unix socket. tests/integration/test_postgres_outage.py
checks the pool's and the readiness probe's connections."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from storage.postgres import keep_alive, keepalive_options


@pytest.mark.parametrize("dead_after_s", [4, 10, 12, 15, 60])
def test_the_options_give_up_a_silent_connection_in_the_time_asked(dead_after_s: int) -> None:
    idle, interval, count = keepalive_options(dead_after_s)
    assert idle >= 1 and interval >= 1 and count == 3
    assert idle + interval * count == dead_after_s


def _options(sock: socket.socket) -> tuple[int, ...]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def _connected_socket_options(dead_after_s: int) -> tuple[int, ...]:
    """Options of a client transport's socket (what asyncpg hands over) after `keep_alive`."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda _, writer: accepted.set_result(writer), "127.0.0.1", 0)
    async with server:
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        try:
            sock = writer.transport.get_extra_info("socket")
            keep_alive(sock, dead_after_s)
            return _options(sock)
        finally:
            for link in (writer, await accepted):
                link.close()
                await link.wait_closed()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_tcp_connection_gets_keepalive_on_either_event_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # `smartedu serve` runs on uvloop, whose transports hand out a socket-like object, not a socket.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(_connected_socket_options(12)) == (1, 6, 2, 3, 12_000)
        assert runner.run(_connected_socket_options(0))[0] == 0  # 0: keepalive off


def test_a_unix_socket_is_left_alone() -> None:
    # The embedded PostgreSQL listens on a Unix socket: no TCP options (setting them would raise).
    left, right = socket.socketpair()
    with left, right:
        keep_alive(left, 12)
        assert left.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
