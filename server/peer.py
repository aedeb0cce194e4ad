"""One socket's way out. A frame goes straight into the transport while the client keeps up; behind a
client that does not, it waits in the socket's own backlog, written by the socket's own writer task, so
a stalled client never holds up the hub's fan-out to the others (nor the answer that emits). A client
that falls a whole backlog behind is closed with 1013: it reconnects and resumes from the log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable

from aiohttp import WSMsgType, web

from .errors import CloseCode
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

# How far a client may fall behind: bytes queued for it and buffered by its transport (the kernel's
# socket buffer comes on top). Past this it is closed with 1013.
BACKLOG_LIMIT_BYTES = 1 << 20
# The longest a close may take, closing handshake included, before the connection is aborted.
CLOSE_TIMEOUT_S = 15.0
# A client closed for falling behind is not reading: its close frame gets this long to leave.
SHED_TIMEOUT_S = 2.0


class WebSocketPeer:
    """An aiohttp WebSocket as the hub's `Peer`: text frames from ready-made JSON bytes."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        on_fall_behind: Callable[[], None] | None = None,
    ):
        self.ws = ws
        self.id = uuid.uuid4().hex
        # Not checked with isinstance: uvloop's transports have the methods but not the asyncio classes.
        self._transport = transport
        self._backlog_limit = BACKLOG_LIMIT_BYTES
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._shedding: asyncio.Task[None] | None = None
        self._on_fall_behind = on_fall_behind  # counts it (a metric)

    async def send(self, data: bytes) -> bool:
        if self.ws.closed or self._shedding is not None:
            return False
        if self._writer is None and self._has_room(len(data)):
            try:
                await self.ws.send_frame(data, WSMsgType.TEXT)  # the transport takes it without waiting
            except (ConnectionError, RuntimeError):
                return False
            return True
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._behind() > self._backlog_limit:
            self._fall_behind()
            return False
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="socket-writer")
        return True

    def _has_room(self, size: int) -> bool:
        """Whether a frame of `size` bytes can be written without waiting for the client: the transport's
        buffer is at most its low-water mark (so its writing is not paused) and stays within the high one."""
        transport = self._transport
        if transport is None:
            return True
        low, high = transport.get_write_buffer_limits()
        buffered = transport.get_write_buffer_size()
        return buffered <= low and buffered + size <= high

    def _behind(self) -> int:
        """Bytes sent to the client and not yet taken by its connection: the backlog and what the transport
        buffers (aiohttp waits for the transport only once per 64 KiB written, so that can be much)."""
        buffered = self._transport.get_write_buffer_size() if self._transport is not None else 0
        return self._backlog_bytes + buffered

    async def _write(self) -> None:
        try:
            while self._backlog:
                data = self._backlog.popleft()
                self._backlog_bytes -= len(data)
                await self.ws.send_frame(data, WSMsgType.TEXT)  # waits while the client's window is full
        except (ConnectionError, RuntimeError):
            self._backlog.clear()
            self._backlog_bytes = 0
        finally:
            self._writer = None

    def _fall_behind(self) -> None:
        log.warning("closing a socket that fell behind", extra={"behind_bytes": self._behind()})
        if self._on_fall_behind is not None:
            self._on_fall_behind()
        self._backlog.clear()
        self._backlog_bytes = 0
        self._shedding = asyncio.create_task(self._shed(), name="socket-shed")

    async def _shed(self) -> None:
        if self._writer is not None:
            await cancel_and_wait(self._writer)
        await self._close(CloseCode.TOO_SLOW, "too far behind: reconnect and resume", SHED_TIMEOUT_S)

    async def close(self, code: int, message: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close after the frames already sent (within `timeout`, else the connection is aborted)."""
        if self._shedding is not None:
            await asyncio.wait({self._shedding})
            return
        await self._close(code, message, timeout)

    async def _close(self, code: int, message: str, timeout: float) -> None:
        closed = False
        try:
            async with asyncio.timeout(timeout):
                if self._writer is not None:
                    await asyncio.wait({self._writer})
                await self.ws.close(code=code, message=message.encode()[:120])
                closed = True
        except TimeoutError:
            log.info("a socket did not take its close in time: aborted", extra={"code": code})
        finally:
            if not closed and self._transport is not None:
                self._transport.abort()  # a plain close would wait for ever to flush to a stalled client

    async def discard(self) -> None:
        """Stop the writer (the socket's handler is done with it); a close for falling behind, bounded by
        SHED_TIMEOUT_S, is let finish so that a client that is merely slow still gets its close code."""
        if self._writer is not None:
            await cancel_and_wait(self._writer)
        if self._shedding is not None:
            await asyncio.wait({self._shedding})
