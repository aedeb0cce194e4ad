"""The transport-agnostic chat core: sessions, the turn (commit, ack, stream, commit, done), history,
teacher monitoring, leases on answers being generated, and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from ai.base import AIError, AIRequest, CourseContext, Provider, Usage, estimate_tokens
from ai.base import Turn as HistoryTurn
from ai.prompt import build_system_instruction
from storage.documents import Documents
from storage.models import Conversation, Course, Message, MessageStatus, TenantSettings, UsageRecord, User
from storage.postgres import Database

from .auth import Claims
from .errors import ChatError, ErrorCode, bad_request, forbidden, not_found
from .hub import Hub, Peer
from .logs import request_id
from .metrics import Metrics
from .protocol import HistoryRequest, Intervene, SendMessage, SetAI, encode, error_frame
from .settings import Settings
from .tracing import Tracer
from .turns import TokenBatcher, Turn, stream_answer

log = logging.getLogger(__name__)

LEASE_TTL_MS = 6000
PRESENCE_TTL_MS = 15000


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
    watching: set[str] = field(default_factory=set)
    presence: tuple[str, str] | None = None  # (tenant, course) where this session is announced
    tenant: TenantSettings | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _lease_member(turn: Turn) -> str:
    return orjson.dumps([turn.tenant_id, turn.user_id, turn.conversation_id, turn.reply_id, turn.course_id]).decode()


class ChatService:
    """Owns every turn and background task of this process; all are cancelled and awaited on close."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        hub: Hub,
        provider: Provider,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ):
        self.settings = settings
        self.metrics = metrics or Metrics(settings.replica_id)
        self.tracer = tracer or Tracer()
        self.db = db
        self.hub = hub
        self.provider = provider
        self.hub.on_control = self._on_control
        self._turns: dict[int, Turn] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sessions: dict[str, Session] = {}
        self._closing = False
        self._maintenance: asyncio.Task[None] | None = None
        self.documents = Documents(db)

    async def start(self) -> None:
        await self.hub.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="chat-maintenance")

    # -- hello ------------------------------------------------------------------------------------

    async def open_session(
        self,
        peer: Peer,
        claims: Claims,
        conversation_id: str | None,
        course_id: str | None,
        resume_from: int | None = None,
    ) -> Session:
        """Resolve `hello`, send `welcome` and the catch-up (replay), then let live frames through."""
        with self.tracer.span("hello", tenant=claims.tenant, role=claims.role):
            return await self._open_session(peer, claims, conversation_id, course_id, resume_from)

    async def _open_session(
        self,
        peer: Peer,
        claims: Claims,
        conversation_id: str | None,
        course_id: str | None,
        resume_from: int | None,
    ) -> Session:
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
        session.tenant = await self.db.get_tenant(claims.tenant)
        course = await self._course_of(conversation)
        session.joined[conversation.id] = Joined(conversation, course)
        # Subscribed and buffering before the snapshot: nothing published after it can be missed.
        member = await self.hub.join(conversation.id, peer, buffering=True)
        snapshot = await self.hub.store.snapshot(conversation.id)
        limit = self.settings.history_messages
        history = await self.db.recent_messages(claims.tenant, conversation.id, limit + 1)
        has_more = len(history) > limit
        history = history[1:] if has_more else history
        resumed = resume_from is not None and snapshot.covers(resume_from)
        if resumed:
            assert resume_from is not None
            catch_up = [(s, f) for s, f in snapshot.entries if s > resume_from]
        else:
            # Answers still streaming: their tokens so far, so the client can show them.
            streaming = {m.id for m in history if m.status == "streaming"}
            catch_up = [(s, f) for s, f in snapshot.entries if _reply_of(f) in streaming]
        welcome: dict[str, Any] = {
            "type": "welcome",
            "session_id": session.id,
            "user": {"id": user.id, "role": user.role, "tenant": user.tenant_id, "name": user.display_name},
            "conversation_id": conversation.id,
            "course_id": conversation.course_id,
            "course_title": course.title if course else None,
            "ai_paused": conversation.ai_paused,
            "features": ["resume", "regenerate", "history"],
            "has_more": has_more,
            "history": [m.to_wire() for m in history],
            "seq": max(snapshot.seq, conversation.last_seq),
        }
        if resume_from is not None:
            welcome["resumed"] = resumed
            self.metrics.resumes.labels(outcome="resumed" if resumed else "missed").inc()
            self.metrics.replayed.inc(len(catch_up))
        await peer.send(encode(welcome))
        await self.hub.catch_up(member, catch_up, snapshot.seq)
        self._sessions[session.id] = session
        await self._announce(session, conversation)
        return session

    async def _course(self, claims: Claims, course_id: str) -> Course:
        if not claims.may_use_course(course_id):
            raise forbidden("this course is not in your token's courses")
        course = await self.db.get_course(claims.tenant, course_id)
        if course is None:
            raise not_found("course")
        return course

    async def _course_of(self, conversation: Conversation) -> Course | None:
        if conversation.course_id is None:
            return None
        return await self.db.get_course(conversation.tenant_id, conversation.course_id)

    async def _joined(self, session: Session, conversation_id: str | None) -> Joined:
        """The conversation a frame names (default: the session's), joining it if it is the user's."""
        conversation_id = conversation_id or session.current
        joined = session.joined.get(conversation_id)
        if joined is not None:
            return joined
        conversation = await self.db.get_conversation(session.claims.tenant, session.user.id, conversation_id)
        if conversation is None:
            raise not_found("conversation")
        joined = Joined(conversation, await self._course_of(conversation))
        session.joined[conversation.id] = joined
        await self.hub.join(conversation.id, session.peer)
        return joined

    async def close_session(self, session: Session) -> None:
        """Forget the socket; answers it started go on (another tab or a reconnect can pick them up)."""
        self._sessions.pop(session.id, None)
        for conversation_id in session.joined:
            self.hub.leave(conversation_id, session.peer)
        for course_id in session.watching:
            self.hub.unwatch(session.claims.tenant, course_id, session.peer)
        if session.presence is not None:
            tenant_id, course_id = session.presence
            with contextlib.suppress(Exception):
                await self.hub.store.depart(tenant_id, course_id, session.id)
                await self.hub.course_event(
                    tenant_id, course_id, encode({"type": "event", "course_id": course_id, "kind": "left",
                                                  "student": {"session_id": session.id, "user_id": session.claims.sub}})
                )

    # -- presence ---------------------------------------------------------------------------------

    def _presence_info(self, session: Session, conversation: Conversation) -> dict[str, Any]:
        return {
            "session_id": session.id,
            "user_id": session.claims.sub,
            "name": session.user.display_name,
            "role": session.user.role,
            "conversation_id": conversation.id,
            "replica": self.settings.replica_id,
            "since": int(time.time()),
        }

    async def _announce(self, session: Session, conversation: Conversation) -> None:
        if session.user.role != "student" or conversation.course_id is None:
            return
        tenant_id, course_id = session.claims.tenant, conversation.course_id
        info = self._presence_info(session, conversation)
        await self.hub.store.announce(tenant_id, course_id, session.id, orjson.dumps(info), PRESENCE_TTL_MS)
        session.presence = (tenant_id, course_id)
        await self.hub.course_event(
            tenant_id, course_id, encode({"type": "event", "course_id": course_id, "kind": "joined", "student": info})
        )

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
        reservation = await self._admit(session, frame)
        try:
            with self.tracer.span("persist", conversation_id=conversation.id):
                saved = await self.db.save_question(
                    claims.tenant, conversation.id, frame.id, frame.text, session.user.id
                )
        except Exception:
            await self._settle(reservation, 0, 0)
            raise
        if not saved.created or saved.reply is None:
            await self._settle(reservation, 0, 0)  # nothing will be generated for this message
        ack: dict[str, Any] = {
            "type": "ack",
            "id": frame.id,
            "message_id": saved.message.id,
            "reply_id": saved.reply.id if saved.reply else None,
            "conversation_id": conversation.id,
            "text": saved.message.text,
        }
        if not saved.created:
            # A resend: the same ack again, to this socket only, and no second answer.
            ack["seq"] = saved.message.seq
            await session.peer.send(encode(ack))
            return
        try:
            [(seq, _)] = await self.hub.emit(
                conversation.id, [encode(ack)], floor=conversation.last_seq, course=_course_key(conversation)
            )
            await self.db.set_message_seq(claims.tenant, saved.message.id, seq)
        finally:
            # The question is committed: it gets its answer (or a final status) even if the ack failed.
            if saved.reply is not None:
                turn = self._start_turn(conversation, joined.course, saved.message, saved.reply.id, session.tenant)
                turn.reservation = reservation

    def _start_turn(
        self,
        conversation: Conversation,
        course: Course | None,
        question: Message,
        reply_id: int,
        tenant: TenantSettings | None = None,
    ) -> Turn:
        turn = Turn(
            tenant_prompt=tenant.system_prompt if tenant else None,
            tenant_id=conversation.tenant_id,
            user_id=conversation.user_id,
            conversation_id=conversation.id,
            question_id=question.id,
            reply_id=reply_id,
            question=question.text,
            course_id=conversation.course_id,
        )
        self._turns[turn.reply_id] = turn
        turn.task = asyncio.create_task(self._run_turn(turn, course), name=f"turn-{turn.reply_id}")
        return turn

    async def _admit(self, session: Session, frame: SendMessage) -> Reservation:
        """Rate limit and token budgets, checked and reserved in one Redis round trip."""
        tenant = session.tenant or TenantSettings(session.claims.tenant)
        settings = self.settings
        tenant_limit, user_limit = tenant.daily_token_budget, tenant.user_daily_token_budget
        limits = (
            tenant_limit if tenant_limit is not None else settings.tenant_daily_tokens,
            user_limit if user_limit is not None else settings.user_daily_tokens,
        )
        output = settings.max_output_tokens
        amounts = (output + estimate_tokens(frame.text) + 1000, output)
        day = time.strftime("%Y%m%d", time.gmtime())
        code, wait = await self.hub.store.admit(
            session.claims.tenant, session.user.id, day,
            per_minute=settings.messages_per_minute, limits=limits, amounts=amounts,
        )
        if code:
            self.metrics.refusals.labels(reason="rate_limited" if code == 1 else "quota_exceeded").inc()
        if code == 1:
            raise ChatError(ErrorCode.RATE_LIMITED, "too many messages; wait a moment", frame.id, retry_after=wait)
        if code in (2, 3):
            whose = "your school's" if code == 2 else "your"
            raise ChatError(
                ErrorCode.QUOTA_EXCEEDED, f"{whose} daily tutor budget is used up", frame.id,
                retry_after=_seconds_to_midnight(),
            )
        return Reservation(session.claims.tenant, session.user.id, day, amounts[0], amounts[1])

    async def _settle(self, reservation: Reservation | None, total_tokens: int, output_tokens: int) -> None:
        """Replace a reservation by what was really used."""
        if reservation is None:
            return
        deltas = (total_tokens - reservation.tenant_tokens, output_tokens - reservation.user_tokens)
        try:
            await self.hub.store.adjust_tokens(reservation.tenant_id, reservation.user_id, reservation.day, deltas)
        except Exception:
            log.exception("could not reconcile a token reservation")

    async def cancel(self, session: Session, reply_id: int) -> None:
        """Stop the user's answer wherever it is generated; an answer that already ended is left as it is."""
        turn = self._turns.get(reply_id)
        if turn is not None and turn.tenant_id == session.claims.tenant and turn.user_id == session.user.id:
            turn.stop("stopped")
            return
        message = await self.db.find_user_message(session.claims.tenant, session.user.id, reply_id)
        if message is None or message.role != "assistant":
            raise not_found("reply", ref=str(reply_id))
        if message.status == "streaming":
            await self.hub.store.publish_control(
                {"op": "cancel", "reply_id": reply_id, "tenant": session.claims.tenant, "user": session.user.id}
            )

    def _on_control(self, message: dict[str, Any]) -> None:
        if message.get("op") == "cancel":
            turn = self._turns.get(int(message.get("reply_id", 0)))
            if turn is not None and turn.tenant_id == message.get("tenant") and turn.user_id == message.get("user"):
                turn.stop("stopped")

    async def regenerate(self, session: Session, reply_id: int) -> None:
        """Answer a question again after its answer ended as interrupted, failed or stopped."""
        message = await self.db.find_user_message(session.claims.tenant, session.user.id, reply_id)
        if message is None or message.role != "assistant" or message.reply_to is None:
            raise not_found("reply", ref=str(reply_id))
        if message.status in ("streaming", "complete"):
            raise bad_request("only an interrupted, failed or stopped answer can be regenerated", str(reply_id))
        joined = await self._joined(session, message.conversation_id)
        question = await self.db.get_message(session.claims.tenant, message.conversation_id, message.reply_to)
        assert question is not None
        reply = await self.db.create_reply(session.claims.tenant, message.conversation_id, question.id)
        ack = {
            "type": "ack",
            "id": question.client_id,
            "message_id": question.id,
            "reply_id": reply.id,
            "conversation_id": message.conversation_id,
            "text": question.text,
            "regenerated": True,
        }
        await self.hub.emit(message.conversation_id, [encode(ack)], course=_course_key(joined.conversation))
        self._start_turn(joined.conversation, joined.course, question, reply.id)

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        return lock

    async def _run_turn(self, turn: Turn, course: Course | None) -> None:
        lock = self._lock(turn.conversation_id)
        member = _lease_member(turn)
        try:
            with contextlib.suppress(Exception):  # the maintenance loop renews it again in 2 s
                await self.hub.store.renew_leases([member], LEASE_TTL_MS)
            async with lock:
                with self.tracer.span("turn", conversation_id=turn.conversation_id, reply_id=turn.reply_id):
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
            with contextlib.suppress(Exception):
                await self.hub.store.release_lease(member)

    async def _generate(self, turn: Turn, course: Course | None) -> None:
        batcher = TokenBatcher(lambda text, offset: self._emit_token(turn, text, offset))
        status: MessageStatus = "complete"
        usage: Usage | None = None
        failure: AIError | None = None
        cancelled = False
        try:
            with self.tracer.span("history"):
                request = await self._build_request(turn, course) if turn.stop_reason is None else None
            # Checked again after the await: a cancel may have arrived while the history loaded.
            if request is not None and turn.stop_reason is None:
                with self.tracer.span("ai", provider=self.provider.name, model=self.provider.model):
                    turn.stream_task = asyncio.create_task(stream_answer(self.provider, request, turn, batcher))
                    usage = await turn.stream_task
                if usage is not None and usage.blocked:
                    await self._blocked(turn, batcher)
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
            self.metrics.ai_errors.labels(kind=exc.kind).inc()
            log.warning("ai provider failed", extra={"kind": exc.kind, "reply_id": turn.reply_id})
        except Exception:
            log.exception("turn failed", extra={"reply_id": turn.reply_id})
            status = "failed"
        try:
            await batcher.flush()
        except Exception:
            log.exception("token delivery failed", extra={"reply_id": turn.reply_id})
            status = "failed" if status == "complete" else status
        with self.tracer.span("done", status=status):
            await self._finish(turn, status, usage, batcher.offset, failure)
        if cancelled:
            raise asyncio.CancelledError

    async def _build_request(self, turn: Turn, course: Course | None) -> AIRequest:
        recent = await self.db.recent_messages(
            turn.tenant_id, turn.conversation_id, self.settings.history_messages + 1, before=turn.reply_id
        )
        # The question goes last, separately; unfinished answers are left out of the context.
        history = tuple(
            HistoryTurn(m.role, _unlabelled(m.text) if m.role == "user" else m.text)
            for m in recent
            if m.id != turn.question_id and m.text and (m.role != "assistant" or m.status == "complete")
        )[-self.settings.history_messages :]
        context = None
        if course is not None:
            names = await self.documents.names(turn.tenant_id, course.id)
            passages = []
            if names and self.settings.grounding_passages:
                passages = await self.documents.search(
                    turn.tenant_id, course.id, turn.question, self.settings.grounding_passages
                )
            turn.passage_ids = tuple(p.id for p in passages)
            context = CourseContext(
                course.id,
                course.title,
                course.description,
                course.system_prompt,
                document_names=tuple(names),
                passages=tuple((p.id, p.document_name, p.body) for p in passages),
            )
        instruction = build_system_instruction(
            context, turn.tenant_prompt, grounding_chars=self.settings.grounding_chars
        )
        return AIRequest(
            question=_unlabelled(turn.question),
            history=history,
            course=context,
            system_instruction=instruction,
            tenant_id=turn.tenant_id,
            user_id=turn.user_id,
            conversation_id=turn.conversation_id,
            request_id=request_id.get() or f"reply-{turn.reply_id}",
        )

    async def _blocked(self, turn: Turn, batcher: TokenBatcher) -> None:
        """A safety block: the student gets a friendly message, and teachers get a flag."""
        note = SAFETY_MESSAGE if not turn.parts else "\n\n" + SAFETY_MESSAGE
        turn.parts.append(note)
        batcher.push(note)
        flag_id = await self.db.add_flag(turn.tenant_id, turn.conversation_id, turn.question_id, "safety_block")
        flag = {
            "type": "flag",
            "conversation_id": turn.conversation_id,
            "message_id": turn.question_id,
            "reply_id": turn.reply_id,
            "flag_id": flag_id,
            "kind": "safety_block",
        }
        await self.hub.emit(turn.conversation_id, [encode(flag)], course=turn.course_key)

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
        [(seq, _)] = await self.hub.emit(turn.conversation_id, [frame], course=turn.course_key)
        turn.last_seq = seq

    async def _finish(
        self, turn: Turn, status: MessageStatus, usage: Usage | None, length: int, failure: AIError | None
    ) -> None:
        """Commit the answer's final state, then tell every joined socket (`done`)."""
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
                passage_ids=turn.passage_ids,
            )
        used = (record.prompt_tokens + record.output_tokens, record.output_tokens) if record else (0, 0)
        reservation, turn.reservation = turn.reservation, None
        await self._settle(reservation, *used)
        committed = await self.db.finish_reply(
            turn.tenant_id, turn.user_id, turn.conversation_id, turn.reply_id, turn.text, status, turn.last_seq, record
        )
        turn.finished = True
        self._observe(status, record)
        if not committed:
            return  # another replica already ended it (its lease had expired)
        await self._emit_done(turn.conversation_id, turn.reply_id, status, length, record, turn.course_key)
        if failure is not None:
            error = ChatError(
                ErrorCode.AI_UNAVAILABLE,
                "the tutor is unavailable right now; please try again",
                ref=str(turn.reply_id),
                retry_after=failure.retry_after,
            )
            await self.hub.deliver(turn.conversation_id, [(0, error_frame(error))])

    def _observe(self, status: str, record: UsageRecord | None) -> None:
        metrics = self.metrics
        metrics.turns.labels(status=status).inc()
        if record is None:
            return
        labels = {"provider": record.provider, "model": record.model}
        if record.ttft_ms is not None:
            metrics.ttft.labels(**labels).observe(record.ttft_ms / 1000)
        metrics.duration.labels(**labels).observe(record.duration_ms / 1000)
        metrics.tokens.inc(record.output_tokens)

    async def _emit_done(
        self,
        conversation_id: str,
        reply_id: int,
        status: str,
        length: int,
        record: UsageRecord | None,
        course: tuple[str, str] | None,
    ) -> None:
        done = {
            "type": "done",
            "reply_id": reply_id,
            "conversation_id": conversation_id,
            "status": status,
            "length": length,
            "usage": {
                "prompt_tokens": record.prompt_tokens if record else 0,
                "output_tokens": record.output_tokens if record else 0,
            },
        }
        await self.hub.emit(conversation_id, [encode(done)], course=course)

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

    # -- teachers -------------------------------------------------------------------------------

    async def visible_course(self, claims: Claims, course_id: str) -> Course:
        """A course a teacher may watch (in the token's courses) or any course of an admin's tenant."""
        teaches = claims.role == "teacher" and bool(claims.courses) and course_id in (claims.courses or ())
        if not (teaches or claims.role == "admin"):
            raise forbidden("you may not watch this course")
        course = await self.db.get_course(claims.tenant, course_id)
        if course is None:
            raise not_found("course")
        return course

    async def origin_allowed_for(self, tenant_id: str, origin: str) -> bool:
        """Whether a browser origin is one of the tenant's allowed embedding origins."""
        tenant = await self.db.get_tenant(tenant_id)
        return origin.rstrip("/") in tenant.allowed_origins

    async def live_snapshot(self, claims: Claims, course_id: str) -> dict[str, Any]:
        """Students online in a course right now, across replicas."""
        await self.visible_course(claims, course_id)
        students = await self.hub.store.online(claims.tenant, course_id)
        return {"type": "snapshot", "course_id": course_id, "students": students}

    async def watch(self, session: Session, course_id: str, watch: bool) -> None:
        if not watch:
            session.watching.discard(course_id)
            self.hub.unwatch(session.claims.tenant, course_id, session.peer)
            return
        await self.visible_course(session.claims, course_id)
        await self.hub.watch(session.claims.tenant, course_id, session.peer)
        session.watching.add(course_id)
        await session.peer.send(encode(await self.live_snapshot(session.claims, course_id)))

    async def teacher_conversation(self, claims: Claims, conversation_id: str) -> Conversation:
        """A conversation in a course the teacher may see (admins: any course of the tenant)."""
        conversation = await self.db.tenant_conversation(claims.tenant, conversation_id)
        if conversation is None or conversation.course_id is None:
            raise not_found("conversation")
        await self.visible_course(claims, conversation.course_id)
        return conversation

    async def _teacher_conversation(self, session: Session, conversation_id: str) -> Conversation:
        return await self.teacher_conversation(session.claims, conversation_id)

    async def intervene(self, session: Session, frame: Intervene) -> None:
        """A teacher's message in a student's conversation: committed, delivered live, part of the AI's context."""
        conversation = await self._teacher_conversation(session, frame.conversation_id)
        message, created = await self.db.save_teacher_message(
            session.claims.tenant, conversation.id, frame.id, frame.text, session.user.id
        )
        body = {
            "type": "teacher_message",
            "conversation_id": conversation.id,
            "message_id": message.id,
            "id": frame.id,
            "name": session.user.display_name,
            "text": message.text,
        }
        if created:
            await self.hub.emit(conversation.id, [encode(body)], course=_course_key(conversation))
        else:
            await session.peer.send(encode({**body, "seq": message.seq}))

    async def set_ai(self, session: Session, frame: SetAI) -> None:
        """Pause or resume the tutor for one student; on resume, a waiting question is answered."""
        conversation = await self._teacher_conversation(session, frame.conversation_id)
        await self.db.set_ai_paused(session.claims.tenant, conversation.id, frame.paused)
        state = {"type": "ai_state", "conversation_id": conversation.id, "paused": frame.paused}
        await self.hub.emit(conversation.id, [encode(state)], course=_course_key(conversation))
        if frame.paused:
            return
        question = await self.db.unanswered_question(session.claims.tenant, conversation.id)
        if question is not None:
            reply = await self.db.create_reply(session.claims.tenant, conversation.id, question.id)
            course = await self._course_of(conversation)
            self._start_turn(conversation, course, question, reply.id)

    # -- background work: leases, presence, subscriptions ------------------------------------

    async def _maintain(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                if tick % 2 == 0:
                    await self.hub.store.renew_leases([_lease_member(t) for t in self._turns.values()], LEASE_TTL_MS)
                await self._take_over_expired()
                if tick % 5 == 0:
                    sessions = [(*s.presence, s.id) for s in self._sessions.values() if s.presence]
                    await self.hub.store.heartbeat(sessions, PRESENCE_TTL_MS)
                    await self.hub.prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maintenance failed")

    async def _take_over_expired(self) -> None:
        """Answers whose replica stopped renewing its lease end as interrupted, with the text logged so far."""
        for member in await self.hub.store.claim_expired_leases():
            tenant_id, user_id, conversation_id, reply_id, course_id = orjson.loads(member)
            if reply_id in self._turns:
                continue  # ours after all (a slow renewal); the next renewal restores the lease
            snapshot = await self.hub.store.snapshot(conversation_id)
            text = "".join(_token_text(frame, reply_id) for _, frame in snapshot.entries)
            committed = await self.db.finish_reply(
                tenant_id, user_id, conversation_id, reply_id, text, "interrupted", snapshot.seq, None
            )
            if committed:
                log.warning("took over an abandoned answer", extra={"reply_id": reply_id})
                course = (tenant_id, course_id) if course_id else None
                await self._emit_done(conversation_id, reply_id, "interrupted", len(text), None, course)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def active_turns(self) -> int:
        return len(self._turns)

    async def drain(self, deadline_s: float) -> None:
        """Stop taking messages, ask clients to reconnect elsewhere, and let answers finish until the deadline."""
        self._closing = True
        for session in list(self._sessions.values()):
            after_ms = random.randint(500, 3000)
            await session.peer.send(encode({"type": "reconnect", "after_ms": after_ms}))
        deadline = time.monotonic() + deadline_s
        while self._turns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Interrupt every answer still running, commit it, and stop the background work."""
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
        for session in list(self._sessions.values()):
            await self.close_session(session)
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        await self.hub.close()
        with contextlib.suppress(Exception):
            await self.provider.close()


SAFETY_MESSAGE = (
    "I can't help with that. Let's keep our conversation safe and about your learning. "
    "If something is worrying you, please talk to your teacher or another adult you trust. "
    "What would you like to work on in your course?"
)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens reserved against today's budgets before an answer, settled after it."""

    tenant_id: str
    user_id: str
    day: str
    tenant_tokens: int
    user_tokens: int


def _unlabelled(text: str) -> str:
    """A student cannot pass their words off as the teacher's: the label the providers use is defused."""
    return text.replace("[Teacher message]", "[Teacher-message (typed by the student)]")


def _seconds_to_midnight() -> float:
    now = time.time()
    return 86400 - now % 86400


def _final(reason: str) -> MessageStatus:
    return "interrupted" if reason == "interrupted" else "stopped"


def _course_key(conversation: Conversation) -> tuple[str, str] | None:
    return (conversation.tenant_id, conversation.course_id) if conversation.course_id else None


def _reply_of(frame: bytes) -> int | None:
    if not frame.startswith(b'{"type":"token"'):
        return None
    value = orjson.loads(frame).get("reply_id")
    return int(value) if isinstance(value, int) else None


def _token_text(frame: bytes, reply_id: int) -> str:
    if not frame.startswith(b'{"type":"token"'):
        return ""
    data = orjson.loads(frame)
    return str(data["text"]) if data.get("reply_id") == reply_id else ""

