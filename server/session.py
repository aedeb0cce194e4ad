"""The protocol state machine of one socket: wait for `hello`, then dispatch frames to the chat core."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable

import asyncpg
from redis.exceptions import RedisError

from storage.errors import StorageError

from .auth import Claims, TokenVerifier
from .chat import ChatService, Session
from .errors import FATAL_CLOSE, ChatError, ErrorCode, bad_request, busy, forbidden, from_storage, unauthorized
from .peer import WebSocketPeer
from .protocol import (
    PONG,
    Cancel,
    ClientFrame,
    Hello,
    HistoryRequest,
    Intervene,
    Ping,
    Regenerate,
    SendMessage,
    SetAI,
    Watch,
    error_frame,
    parse_client_frame,
    ref_of,
)
from .settings import Settings

log = logging.getLogger(__name__)

# InternalClientError: asyncpg's, on a connection PostgreSQL is closing (a restart) mid-transaction.
_DEPENDENCY_ERRORS = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, RedisError, OSError, TimeoutError
)


class SocketSession:
    """Everything one socket may do, in protocol order."""

    def __init__(
        self,
        settings: Settings,
        chat: ChatService,
        verifier: TokenVerifier,
        peer: WebSocketPeer,
        header_token: str | None,
        *,
        cookie_claims: Claims | None = None,
        pending_origin: str | None = None,
    ):
        self.settings = settings
        self.chat = chat
        self.verifier = verifier
        self.peer = peer
        self.header_token = header_token
        self.cookie_claims = cookie_claims
        self.pending_origin = pending_origin
        self.session: Session | None = None
        self.metrics = chat.metrics

    @property
    def ready(self) -> bool:
        return self.session is not None

    async def on_binary(self) -> None:
        await self.peer.send(error_frame(bad_request("binary frames are not supported; send JSON text frames")))

    async def on_text(self, data: str) -> None:
        """Handle one text frame; every failure becomes an `error` frame (or a close for bad auth)."""
        frame: ClientFrame | None = None
        try:
            if _too_large(data, self.settings.max_frame_bytes):
                raise ChatError(ErrorCode.TOO_LARGE, f"frame larger than {self.settings.max_frame_bytes} bytes")
            frame = parse_client_frame(
                data,
                max_message_chars=self.settings.max_message_chars,
                history_page_max=self.settings.history_page_max,
            )
            if isinstance(frame, SendMessage):
                started = time.perf_counter()
                self.metrics.messages.inc()
                await self._dispatch(frame)
                self.metrics.ack_latency.observe(time.perf_counter() - started)
            else:
                await self._dispatch(frame)
        except (ChatError, StorageError) as caught:
            exc = caught if isinstance(caught, ChatError) else from_storage(caught, ref_of(frame))
            await self.peer.send(error_frame(exc))
            if self.session is None:
                self.metrics.hellos.labels(outcome=exc.code.value).inc()
                if exc.code in FATAL_CLOSE:
                    await self.peer.close(FATAL_CLOSE[exc.code], exc.message)
        except _DEPENDENCY_ERRORS as exc:
            # `ref` stays what it is for every error (the client retries a message by it); the log's
            # reference goes in `log_ref`.
            log_ref = uuid.uuid4().hex[:12]
            log.error("dependency failed", extra={"ref": log_ref, "error": repr(exc)})
            error = ChatError(ErrorCode.INTERNAL, "a backing service is unavailable; try again", ref_of(frame), 1.0)
            await self.peer.send(error_frame(error, log_ref))

    async def _dispatch(self, frame: object) -> None:
        if self.session is None:
            if not isinstance(frame, Hello):
                raise bad_request("the first frame must be hello")
            await self._hello_within_deadline(frame)
            return
        session = self.session
        if isinstance(frame, SendMessage):
            await self.chat.submit(session, frame)
        elif isinstance(frame, Cancel):
            await self.chat.cancel(session, frame.reply_id)
        elif isinstance(frame, HistoryRequest):
            await self.peer.send(await self.chat.history(session, frame))
        elif isinstance(frame, Ping):
            await self.peer.send(PONG)
        elif isinstance(frame, Regenerate):
            await self.chat.regenerate(session, frame.reply_id)
        elif isinstance(frame, Watch):
            await _referenced(frame, self.chat.classroom.watch(session, frame.course_id, frame.watch))
        elif isinstance(frame, Intervene):
            await _referenced(frame, self.chat.classroom.intervene(session, frame))
        elif isinstance(frame, SetAI):
            await _referenced(frame, self.chat.classroom.set_ai(session, frame))
        else:
            raise bad_request("hello was already received")

    async def _hello_within_deadline(self, frame: Hello) -> None:
        """`hello`, given at most `hello_deadline` seconds: at class start hundreds of hellos queue for a small
        database pool, and one that waits longer is told `busy` (and closed with 1013, so the client backs
        off) instead of hanging until the client gives up and retries on top of the work still queued."""
        deadline = asyncio.timeout(self.settings.hello_deadline)
        try:
            async with deadline:
                await self._hello(frame, deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("hello over its deadline", extra={"deadline_s": self.settings.hello_deadline})
            raise busy("the server is busy; try again in a moment") from None

    async def _hello(self, frame: Hello, deadline: asyncio.Timeout) -> None:
        token = frame.token or self.header_token
        if token is None and self.cookie_claims is not None:
            claims = self.cookie_claims
            if self.chat.logged_out(claims):  # after the upgrade, before this hello
                raise unauthorized("this session has been logged out; sign in again")
        else:
            claims = self.verifier.verify(token)
        await self.chat.erasures.refuse(claims)  # the user upsert refuses them too; this costs no round trip
        if self.pending_origin is not None and not await self.chat.origin_allowed_for(
            claims.tenant, self.pending_origin
        ):
            raise forbidden("this origin may not open a socket for your school")
        self.session = await self.chat.open_session(
            self.peer, claims, frame.conversation_id, frame.course_id, frame.resume_from,
            new_conversation=frame.new_conversation, deadline=deadline,
        )
        self.metrics.hellos.labels(outcome="ok").inc()
        self.metrics.connections.labels(role=claims.role).inc()
        log.info(
            "hello",
            extra={"tenant": claims.tenant, "user_id": self.session.user.id,
                   "conversation_id": self.session.current, "session_id": self.session.id},
        )

    async def close(self) -> None:
        if self.session is not None:
            self.metrics.connections.labels(role=self.session.claims.role).dec()
            await self.chat.close_session(self.session)

    def hello_timed_out(self) -> None:
        self.metrics.hellos.labels(outcome="timeout").inc()


def _too_large(data: str, limit: int) -> bool:
    """Whether the frame is over `limit` bytes of UTF-8 (as it came over the wire); only a frame that may
    be (over a quarter of the limit in characters, at most 4 bytes each) is encoded to count them."""
    chars = len(data)
    if chars * 4 <= limit:
        return False
    return chars > limit or len(data.encode("utf-8", "surrogatepass")) > limit


async def _referenced(frame: ClientFrame, action: Awaitable[None]) -> None:
    """Errors of a teacher action name what they are about (course, client id or conversation)."""
    try:
        await action
    except ChatError as exc:
        if exc.ref is None:
            exc.ref = ref_of(frame)
        raise
