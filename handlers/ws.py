"""GET /ws: the WebSocket endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMessage, WSMsgType, web

from server.errors import CloseCode, forbidden, restarting
from server.keys import CHAT, METRICS, SETTINGS, SOCKETS, STATE, VERIFIER
from server.origins import is_web_origin, origin_allowed
from server.peer import WebSocketPeer
from server.session import SocketSession
from server.websession import session_claims

from .common import bearer_token

log = logging.getLogger(__name__)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    settings = request.app[SETTINGS]
    if request.app[STATE].draining:
        raise restarting("this replica is restarting; reconnect")
    origin = request.headers.get("Origin")
    trusted = origin_allowed(origin, request.host, settings.allowed_origins)
    anyone = "*" in settings.allowed_origins
    if not trusted and not anyone and not is_web_origin(origin):
        raise forbidden("this origin may not open a socket")
    # The session cookie counts only from trusted origins; other origins must be a tenant's, checked at hello
    # (with `*`, any origin, but with a token only).
    cookie_claims = await session_claims(request) if trusted and origin else None
    ws = web.WebSocketResponse(heartbeat=30, compress=False, max_msg_size=settings.max_frame_bytes * 4)
    await ws.prepare(request)
    peer = WebSocketPeer(ws, request.transport, on_fall_behind=request.app[METRICS].slow_sockets.inc)
    request.app[SOCKETS].add(peer)
    session = SocketSession(
        settings, request.app[CHAT], request.app[VERIFIER], peer, bearer_token(request),
        cookie_claims=cookie_claims, pending_origin=None if trusted or anyone else origin,
    )
    try:
        if await _hello_in_time(ws, session, settings.hello_timeout):
            async for msg in ws:
                await _handle(session, msg)
    except Exception:
        log.exception("socket crashed")
        await ws.close(code=CloseCode.CRASH, message=b"internal error")
    finally:
        try:
            await session.close()
        finally:
            await peer.discard()  # the socket's writer, if a backlog was being written
    return ws


async def _handle(session: SocketSession, msg: WSMessage) -> None:
    if msg.type == WSMsgType.TEXT:
        await session.on_text(msg.data)
    elif msg.type == WSMsgType.BINARY:
        await session.on_binary()


async def _hello_in_time(ws: web.WebSocketResponse, session: SocketSession, timeout: float) -> bool:
    """Handle frames until `hello` succeeds. The deadline bounds waiting for frames, not handling them
    (a slow database must not turn a timely hello into a 4408). False when the socket is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not session.ready:
        remaining = deadline - loop.time()
        msg = None
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=remaining)
        if msg is None:
            session.hello_timed_out()
            await ws.close(code=CloseCode.HELLO_TIMEOUT, message=b"no hello in time")
            return False
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return False
        await _handle(session, msg)
    return True

