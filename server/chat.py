"""The transport-agnostic chat core: sessions, the turn (commit, ack, stream, commit, done), history."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from ai.base import AIError, AIRequest, CourseContext, Provider, Usage
from ai.base import Turn as HistoryTurn
from storage.models import Conversation, Course, Message, MessageStatus, UsageRecord, User
from storage.postgres import Database

from .auth import Claims
from .errors import ChatError, ErrorCode, forbidden, not_found
from .hub import Hub, Peer
from .protocol import HistoryRequest, SendMessage, encode, error_frame
from .settings import Settings
from .turns import TokenBatcher, Turn, stream_answer

log = logging.getLogger(__name__)


@dataclass
class Joined:
    """A conversation a socket has joined, with what the turn needs to know about it."""

    conversation: Conversation
    course: Course | None


@dataclass(eq=False)
class Session:
    """One authenticated socket's view: who it is and which conversations it joined."""

    peer: Peer
    claims: Claims
    user: User
    current: str
    joined: dict[str, Joined] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Welcome:
    session: Session
    frame: bytes


class ChatService:
    """Owns every turn of this process; cancelled and awaited on shutdown."""

    def __init__(self, settings: Settings, db: Database, hub: Hub, provider: Provider):
        self.settings = settings
        self.db = db
        self.hub = hub
        self.provider = provider
        self._turns: dict[int, Turn] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False

    # -- hello ------------------------------------------------------------------------------------

    async def open_session(
        self, peer: Peer, claims: Claims, conversation_id: str | None, course_id: str | None
    ) -> Welcome:
        """Resolve the user, course and conversation named by `hello` and build the `welcome`."""
        user = await self.db.upsert_user(claims.tenant, claims.sub, claims.role, claims.name)
        if conversation_id is not None:
            conversation = await self.db.get_conversation(claims.tenant, user.id, conversation_id)
            if conversation is None:
                raise not_found("conversation")
            if conversation.course_id is not None and not claims.may_use_course(conversation.course_id):
                raise forbidden("this course is not in your token's courses")
        else:
            if course_id is not None:
                await self._course(claims, course_id)
            conversation = await self.db.latest_conversation(claims.tenant, user.id, course_id)
            if conversation is None:
                conversation = await self.db.create_conversation(claims.tenant, user.id, course_id)
        session = Session(peer=peer, claims=claims, user=user, current=conversation.id)
        joined = await self._join(session, conversation)
        history = await self.db.recent_messages(claims.tenant, conversation.id, self.settings.history_messages)
        seq = await self.hub.store.current_seq(conversation.id)
        frame = encode(
            {
                "type": "welcome",
                "session_id": session.id,
                "user": {"id": user.id, "role": user.role, "tenant": user.tenant_id, "name": user.display_name},
                "conversation_id": conversation.id,
                "course_id": joined.conversation.course_id,
                "history": [m.to_wire() for m in history],
                "seq": max(seq or 0, conversation.last_seq),
            }
        )
        return Welcome(session, frame)

    async def _course(self, claims: Claims, course_id: str) -> Course:
        if not claims.may_use_course(course_id):
            raise forbidden("this course is not in your token's courses")
        course = await self.db.get_course(claims.tenant, course_id)
        if course is None:
            raise not_found("course")
        return course

    async def _join(self, session: Session, conversation: Conversation) -> Joined:
        course = None
        if conversation.course_id is not None:
            course = await self.db.get_course(conversation.tenant_id, conversation.course_id)
        joined = Joined(conversation, course)
        session.joined[conversation.id] = joined
        self.hub.join(conversation.id, session.peer)
        return joined

    async def _joined(self, session: Session, conversation_id: str | None) -> Joined:
        """The conversation a frame names (default: the session's), joining it if it is the user's."""
        conversation_id = conversation_id or session.current
        joined = session.joined.get(conversation_id)
        if joined is not None:
            return joined
        conversation = await self.db.get_conversation(session.claims.tenant, session.user.id, conversation_id)
        if conversation is None:
            raise not_found("conversation")
        return await self._join(session, conversation)

    def close_session(self, session: Session) -> None:
        """Forget the socket; answers it started go on (another tab or a reconnect can pick them up)."""
        for conversation_id in session.joined:
            self.hub.leave(conversation_id, session.peer)

    # -- the turn -------------------------------------------------------------------------------

    async def submit(self, session: Session, frame: SendMessage) -> None:
        """Validate, rate-limit, commit, ack, then start (or queue) the answer."""
        if self._closing:
            raise ChatError(ErrorCode.AI_UNAVAILABLE, "the server is restarting", frame.id, retry_after=1.0)
        try:
            joined = await self._joined(session, frame.conversation_id)
        except ChatError as exc:
            exc.ref = frame.id
            raise
        claims, conversation = session.claims, joined.conversation
        wait = await self.hub.store.hit_rate_limit(claims.tenant, session.user.id, self.settings.messages_per_minute)
        if wait > 0:
            raise ChatError(ErrorCode.RATE_LIMITED, "too many messages; wait a moment", frame.id, retry_after=wait)
        seq = await self.hub.reserve(conversation.id, conversation.last_seq)
        saved = await self.db.save_question(
            claims.tenant, conversation.id, frame.id, frame.text, seq, session.user.id
        )
        ack = {
            "type": "ack",
            "id": frame.id,
            "message_id": saved.message.id,
            "reply_id": saved.reply.id,
            "conversation_id": conversation.id,
            "text": saved.message.text,
        }
        if not saved.created:
            # A resend: the same ack again, to this socket only, and no second answer.
            ack["seq"] = saved.message.seq
            await session.peer.send(encode(ack))
            return
        await self.hub.emit_reserved(conversation.id, seq, encode(ack))
        turn = Turn(
            tenant_id=claims.tenant,
            user_id=session.user.id,
            conversation_id=conversation.id,
            question_id=saved.message.id,
            reply_id=saved.reply.id,
            question=frame.text,
        )
        self._turns[turn.reply_id] = turn
        turn.task = asyncio.create_task(self._run_turn(turn, joined.course), name=f"turn-{turn.reply_id}")

    async def cancel(self, session: Session, reply_id: int) -> None:
        """Stop the user's answer; an answer that already ended is left as it is."""
        turn = self._turns.get(reply_id)
        if turn is not None and turn.tenant_id == session.claims.tenant and turn.user_id == session.user.id:
            turn.stop("stopped")
            return
        message = await self.db.find_user_message(session.claims.tenant, session.user.id, reply_id)
        if message is None or message.role != "assistant":
            raise not_found("reply", ref=str(reply_id))

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        return lock

    async def _run_turn(self, turn: Turn, course: Course | None) -> None:
        lock = self._lock(turn.conversation_id)
        try:
            async with lock:
                await self._generate(turn, course)
        except asyncio.CancelledError:
            # Cancelled while queued behind another answer: it still needs a final status.
            if not turn.finished:
                await self._finish(turn, "interrupted", None, 0, None)
            raise
        except Exception:
            log.exception("turn could not be finished", extra={"reply_id": turn.reply_id})
        finally:
            self._turns.pop(turn.reply_id, None)
            if not lock.locked() and self._locks.get(turn.conversation_id) is lock:
                del self._locks[turn.conversation_id]

    async def _generate(self, turn: Turn, course: Course | None) -> None:
        batcher = TokenBatcher(lambda text, offset: self._emit_token(turn, text, offset))
        status: MessageStatus = "complete"
        usage: Usage | None = None
        failure: AIError | None = None
        cancelled = False
        try:
            request = await self._build_request(turn, course) if turn.stop_reason is None else None
            # Checked again after the await: a cancel may have arrived while the history loaded.
            if request is not None and turn.stop_reason is None:
                turn.stream_task = asyncio.create_task(stream_answer(self.provider, request, turn, batcher))
                usage = await turn.stream_task
            status = "complete" if turn.stop_reason is None else _final(turn.stop_reason)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            if turn.stream_task is not None:
                turn.stream_task.cancel()
                await asyncio.wait([turn.stream_task])
            status = "interrupted" if cancelled else _final(turn.stop_reason or "stopped")
        except AIError as exc:
            failure, status = exc, "failed"
            log.warning("ai provider failed", extra={"kind": exc.kind, "reply_id": turn.reply_id})
        except Exception:
            log.exception("turn failed", extra={"reply_id": turn.reply_id})
            status = "failed"
        try:
            await batcher.flush()
        except Exception:
            log.exception("token delivery failed", extra={"reply_id": turn.reply_id})
            status = "failed" if status == "complete" else status
        await self._finish(turn, status, usage, batcher.offset, failure)
        if cancelled:
            raise asyncio.CancelledError

    async def _build_request(self, turn: Turn, course: Course | None) -> AIRequest:
        recent = await self.db.recent_messages(
            turn.tenant_id, turn.conversation_id, self.settings.history_messages + 1, before=turn.reply_id
        )
        # The question itself is the newest row; other unanswered placeholders carry no text.
        history = tuple(
            HistoryTurn(m.role, m.text) for m in recent if m.id != turn.question_id and m.text
        )[-self.settings.history_messages :]
        context = None
        if course is not None:
            context = CourseContext(course.id, course.title, course.description, course.system_prompt)
        return AIRequest(
            question=turn.question,
            history=history,
            course=context,
            tenant_id=turn.tenant_id,
            user_id=turn.user_id,
            conversation_id=turn.conversation_id,
        )

    async def _emit_token(self, turn: Turn, text: str, offset: int) -> None:
        frame = encode(
            {
                "type": "token",
                "reply_id": turn.reply_id,
                "conversation_id": turn.conversation_id,
                "offset": offset,
                "text": text,
            }
        )
        await self.hub.emit(turn.conversation_id, [frame], 0)

    async def _finish(
        self, turn: Turn, status: MessageStatus, usage: Usage | None, length: int, failure: AIError | None
    ) -> None:
        """Commit the answer's final state, then tell every joined socket (`done`)."""
        text = turn.text
        now = time.monotonic()
        record = None
        if turn.started:
            record = UsageRecord(
                provider=self.provider.name,
                model=self.provider.model,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else len(turn.parts),
                ttft_ms=(turn.first_token_at - turn.started) * 1000 if turn.first_token_at else None,
                duration_ms=(now - turn.started) * 1000,
            )
        seq = await self.hub.reserve(turn.conversation_id, 0)
        await self.db.finish_reply(
            turn.tenant_id, turn.user_id, turn.conversation_id, turn.reply_id, text, status, seq, record
        )
        turn.finished = True
        done = {
            "type": "done",
            "reply_id": turn.reply_id,
            "conversation_id": turn.conversation_id,
            "status": status,
            "length": length,
            "usage": {
                "prompt_tokens": record.prompt_tokens if record else 0,
                "output_tokens": record.output_tokens if record else 0,
            },
        }
        await self.hub.emit_reserved(turn.conversation_id, seq, encode(done))
        if failure is not None:
            error = ChatError(
                ErrorCode.AI_UNAVAILABLE,
                "the tutor is unavailable right now; please try again",
                ref=str(turn.reply_id),
                retry_after=failure.retry_after,
            )
            await self.hub.deliver(turn.conversation_id, [error_frame(error)])

    # -- history --------------------------------------------------------------------------------

    async def history(self, session: Session, request: HistoryRequest) -> bytes:
        """A page of older messages of one of the user's conversations."""
        joined = await self._joined(session, request.conversation_id)
        return encode(await self.history_page(session.claims.tenant, joined.conversation, request))

    async def history_page(
        self, tenant_id: str, conversation: Conversation, request: HistoryRequest
    ) -> dict[str, object]:
        rows = await self.db.recent_messages(tenant_id, conversation.id, request.limit + 1, before=request.before)
        has_more = len(rows) > request.limit
        page: list[Message] = rows[1:] if has_more else rows
        return {
            "type": "history",
            "conversation_id": conversation.id,
            "messages": [m.to_wire() for m in page],
            "has_more": has_more,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def active_turns(self) -> int:
        return len(self._turns)

    async def close(self) -> None:
        """Interrupt every answer still running, commit it, and wait for all of them."""
        self._closing = True
        turns = list(self._turns.values())
        for turn in turns:
            turn.stop("interrupted")
            if turn.task is not None:
                turn.task.cancel()
        tasks = [t.task for t in turns if t.task is not None]
        if tasks:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("turn ended with an error at shutdown", exc_info=result)
        with contextlib.suppress(Exception):
            await self.provider.close()


def _final(reason: str) -> MessageStatus:
    return "interrupted" if reason == "interrupted" else "stopped"
