"""The transport-agnostic chat core: hello and sessions, a student's message (admit, commit, ack, start the
answer), cancel, regenerate, history, presence, drain. Answers live in answers.py, budgets in
budgets.py, teachers' actions in teacher.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from ai.base import Provider
from storage.errors import AnswerFencedError
from storage.models import Conversation, Course, Message, PastMessage, TenantSettings, User
from storage.postgres import Database
from storage.redis_store import ANSWER_START, ANSWER_START_RESENT
from storage.roundtrips import RoundTrips

from .answers import LEASE_TTL_MS, Answers, course_key, lease_member
from .auth import Claims
from .budgets import Budgets, Reservation
from .erasures import REFRESH_S, Erasures
from .errors import (
    ACCOUNT_DELETED,
    ChatError,
    CloseCode,
    bad_request,
    forbidden,
    not_found,
    regenerate_refused,
    restarting,
)
from .hub import Hub, Peer
from .metrics import Metrics
from .protocol import HistoryRequest, SendMessage, encode
from .revocations import Revocations
from .settings import Settings
from .tasks import cancel_and_wait
from .teacher import Classroom
from .tracing import Tracer

log = logging.getLogger(__name__)

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
    expired: bool = False  # its token (or cookie session) ran out or was logged out; its socket is closing


class ChatService:
    """Sessions and the path of a student's message; answers, budgets and teachers live in their own parts."""

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
        self.db = db
        self.hub = hub
        self.metrics = metrics or Metrics(settings.replica_id)
        self.tracer = tracer or Tracer()
        self.budgets = Budgets(settings, hub.store, self.metrics)
        self.answers = Answers(settings, db, hub, provider, self.budgets, self.metrics, self.tracer)
        self.classroom = Classroom(db, hub, self.answers)
        self.erasures = Erasures(db)
        self.revocations = Revocations(db, hub.store)
        self.hub.on_control = self._on_control
        self.hub.on_reconnect = self._on_reconnect
        self._sessions: dict[str, Session] = {}
        # Sockets close in crowds (a class ends, a network drops): their departures share round trips.
        self._departures: RoundTrips[tuple[str, str, str, bytes], None] = RoundTrips(self._depart, "departures")
        self._closing = False
        self._maintenance: asyncio.Task[None] | None = None
        # Closes of sockets whose token expired or whose user was erased, and erased users' log deletions.
        self._expiring: set[asyncio.Task[None]] = set()
        # Cookie sessions logged out (id -> when they would have expired), from the control channel: their
        # sockets are closed, including one whose hello was under way when the logout was announced.
        self._revoked: dict[str, float] = {}

    async def start(self) -> None:
        try:
            await self.erasures.refresh()
        except Exception as exc:  # read again before the first check (and by the maintenance loop)
            log.warning("could not read the erased users", extra={"error": repr(exc)})
        await self.hub.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="chat-maintenance")

    async def open_session(
        self,
        peer: Peer,
        claims: Claims,
        conversation_id: str | None,
        course_id: str | None,
        resume_from: int | None = None,
        *,
        new_conversation: bool = False,
        deadline: asyncio.Timeout | None = None,
    ) -> Session:
        """Resolve `hello`, send `welcome` and the catch-up (replay), then let live frames through. `deadline`
        (the caller's bound on the hello) is lifted when the welcome goes: a welcomed socket is never told
        `busy`."""
        with self.tracer.span("hello", tenant=claims.tenant, role=claims.role):
            return await self._open_session(
                peer, claims, conversation_id, course_id, resume_from, new_conversation, deadline
            )

    async def _open_session(
        self,
        peer: Peer,
        claims: Claims,
        conversation_id: str | None,
        course_id: str | None,
        resume_from: int | None,
        new_conversation: bool,
        deadline: asyncio.Timeout | None,
    ) -> Session:
        user = await self.db.upsert_user(claims.tenant, claims.sub, claims.role, claims.name, claims.issued_at)
        course: Course | None = None
        if conversation_id is not None:
            conversation = await self.user_conversation(claims, user.id, conversation_id)
        else:
            if course_id is None and claims.role == "student" and claims.courses is not None:
                # A student whose token names courses chats in one of them, where its teachers see it.
                if len(claims.courses) != 1:
                    raise forbidden("your token names several courses: say which one in hello's course_id")
                course_id = claims.courses[0]
            if course_id is not None:
                course = await self._course(claims, course_id)  # the conversation's course, read once
            if new_conversation:
                conversation = await self.db.start_conversation(claims.tenant, user.id, course_id)
            else:
                latest = await self.db.latest_conversation(claims.tenant, user.id, course_id)
                conversation = latest or await self.db.create_conversation(claims.tenant, user.id, course_id)
        session = Session(peer=peer, claims=claims, user=user, current=conversation.id)
        session.tenant = await self.db.get_tenant(claims.tenant)
        if course is None:
            course = await self._course_of(conversation)
        session.joined[conversation.id] = Joined(conversation, course)
        try:
            await self._welcome(session, conversation, course, resume_from, deadline)
        except BaseException:
            # Nothing of a failed hello stays (hub membership, presence): the socket may say hello again.
            await self.close_session(session)
            raise
        self._sessions[session.id] = session
        if self.erasures.erased(claims):  # erased while this hello was under way (announced meanwhile)
            self._close_erased(session)
        return session

    async def _welcome(
        self,
        session: Session,
        conversation: Conversation,
        course: Course | None,
        resume_from: int | None,
        deadline: asyncio.Timeout | None = None,
    ) -> None:
        """Join the conversation, announce the student, then send `welcome` and the catch-up: the welcome
        goes only once every step that can fail has succeeded."""
        peer, user = session.peer, session.user
        # Subscribed and buffering before the snapshot: nothing published after it can be missed.
        member = await self.hub.join(conversation.id, peer, buffering=True)
        snapshot = await self.hub.store.snapshot(conversation.id)
        limit = self.settings.history_messages
        history = await self.db.recent_messages(session.claims.tenant, conversation.id, limit + 1)
        has_more = len(history) > limit
        history = history[1:] if has_more else history
        resumed = resume_from is not None and snapshot.covers(resume_from, conversation.last_seq)
        if resumed:
            assert resume_from is not None
            catch_up = [(s, f) for s, f in snapshot.entries if s > resume_from]
        else:
            # Answers still streaming: their tokens so far, so the client can show them.
            streaming = {m.id for m in history if m.status == "streaming"}
            catch_up = [(s, f) for s, f in snapshot.entries if _reply_of(f) in streaming]
        await self._announce(session, conversation)
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
        if deadline is not None and not deadline.expired():
            deadline.reschedule(None)
        await peer.send(encode(welcome))
        await self.hub.catch_up(member, catch_up, snapshot.seq)

    async def user_conversation(self, claims: Claims, user_id: str, conversation_id: str) -> Conversation:
        """The user's own conversation (else not_found), if the token may use its course (else forbidden)."""
        conversation = await self.db.get_conversation(claims.tenant, user_id, conversation_id)
        if conversation is None:
            raise not_found("conversation")
        if conversation.course_id is None:
            claims.require_no_course()
        else:
            claims.require_course(conversation.course_id)
        return conversation

    async def _course(self, claims: Claims, course_id: str) -> Course:
        claims.require_course(course_id)
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
        conversation = await self.user_conversation(session.claims, session.user.id, conversation_id)
        joined = Joined(conversation, await self._course_of(conversation))
        session.joined[conversation.id] = joined
        try:
            await self.hub.join(conversation.id, session.peer)
        except BaseException:
            # Not joined after all: the next frame naming it tries again (else this socket would never
            # hold it, and would miss what other replicas send about it).
            del session.joined[conversation.id]
            self.hub.leave(conversation.id, session.peer)
            raise
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
            left = encode({"type": "event", "course_id": course_id, "kind": "left",
                           "student": {"session_id": session.id, "user_id": session.claims.sub}})
            await self.hub.deliver_watchers(tenant_id, course_id, left)
            try:
                await self._departures.submit((tenant_id, course_id, session.id, left))
            except Exception as exc:  # the presence entry expires with its heartbeat within 15 s
                log.warning("could not record a departure", extra={"error": repr(exc)})

    async def _depart(self, departures: list[tuple[str, str, str, bytes]]) -> list[None]:
        await self.hub.store.depart(departures, self.hub.node)
        return [None] * len(departures)

    def _presence_info(self, session: Session, conversation: Conversation) -> dict[str, Any]:
        return {
            "session_id": session.id,
            "user_id": session.claims.sub,
            "name": session.user.display_name,
            "role": session.user.role,
            "conversation_id": conversation.id,
            "ai_paused": conversation.ai_paused,  # as it was at `hello`; snapshots read it again
            "replica": self.settings.replica_id,
            "since": int(time.time()),
        }

    async def _announce(self, session: Session, conversation: Conversation) -> None:
        if session.user.role != "student" or conversation.course_id is None:
            return
        tenant_id, course_id = session.claims.tenant, conversation.course_id
        info = self._presence_info(session, conversation)
        joined = encode({"type": "event", "course_id": course_id, "kind": "joined", "student": info})
        # Presence and the `joined` event for other replicas' teachers: one round trip.
        await self.hub.store.announce(
            tenant_id, course_id, session.id, orjson.dumps(info), PRESENCE_TTL_MS, event=(self.hub.node, joined)
        )
        session.presence = (tenant_id, course_id)
        await self.hub.deliver_watchers(tenant_id, course_id, joined)

    async def submit(self, session: Session, frame: SendMessage) -> None:
        """Validate, rate-limit, commit, ack, then start (or queue) the answer."""
        if self._closing:
            raise restarting("the server is restarting", frame.id)
        try:
            joined = await self._joined(session, frame.conversation_id)
        except ChatError as exc:
            exc.ref = frame.id
            raise
        claims, conversation = session.claims, joined.conversation
        tenant = session.tenant or TenantSettings(claims.tenant)
        reservation = await self.budgets.admit(tenant, session.user.id, frame.text, frame.id)
        try:
            with self.tracer.span("persist", conversation_id=conversation.id):
                saved = await self.db.save_question(
                    claims.tenant, conversation.id, frame.id, frame.text, session.user.id,
                    history=self.settings.history_messages,
                )
        except Exception:
            await self.budgets.settle(reservation, 0, 0)
            raise
        ack: dict[str, Any] = {
            "type": "ack",
            "id": frame.id,
            "message_id": saved.message.id,
            "reply_id": saved.reply.id if saved.reply else None,
            "conversation_id": conversation.id,
            "text": saved.message.text,
        }
        if not saved.created:
            # A resend: the same ack again, to this socket only, and no second answer. The ack's seq is
            # committed with the answer; until then it is read back from the log (resends are rare, and
            # storing it right after the ack would cost every turn a write).
            seq = saved.message.seq or await self._logged_ack_seq(conversation.id, saved.message.id)
            if not seq and await self._claim_unstarted(conversation, saved.reply):
                # Never acknowledged, its answer never started: the first send was committed but its reply
                # lost (the connection dropped as PostgreSQL restarted). Acknowledged and answered now, unless
                # the first send's ack gets there first (it was only late): then that one stands.
                if await self._acknowledge(
                    session, joined, ack, saved.message, saved.reply, reservation, resent=True
                ):
                    return
                seq = await self._logged_ack_seq(conversation.id, saved.message.id)
            else:
                await self.budgets.settle(reservation, 0, 0)  # nothing will be generated for this message
            ack["seq"] = seq
            await session.peer.send(encode(ack))
            return
        if saved.reply is None:
            await self.budgets.settle(reservation, 0, 0)  # paused: nothing will be generated yet
        await self._acknowledge(
            session, joined, ack, saved.message, saved.reply, reservation, history=saved.history
        )

    async def _claim_unstarted(self, conversation: Conversation, reply: Message | None) -> bool:
        """Whether a resent question's answer is still a placeholder no replica generates (none holds its
        lease), taking its lease for this replica if so."""
        if reply is None or reply.status != "streaming" or self.answers.running(reply.id):
            return False
        member = lease_member(
            conversation.tenant_id, conversation.user_id, conversation.id, reply.id, conversation.course_id
        )
        return await self.hub.store.lease_if_free(member, LEASE_TTL_MS)

    async def _logged_ack_seq(self, conversation_id: str, message_id: int) -> int:
        """The seq of a question's first ack, from the conversation's log (0 when it is not there)."""
        snapshot = await self.hub.store.snapshot(conversation_id)
        for seq, frame in snapshot.entries:
            if frame.startswith(b'{"type":"ack"'):
                data = orjson.loads(frame)
                if data.get("message_id") == message_id and not data.get("regenerated"):
                    return seq
        return 0

    async def _acknowledge(
        self,
        session: Session,
        joined: Joined,
        ack: dict[str, Any],
        question: Message,
        reply: Message | None,
        reservation: Reservation | None,
        *,
        history: list[PastMessage] | None = None,
        keep_seq: bool = True,
        resent: bool = False,
    ) -> bool:
        """Emit a committed question's ack (taking its answer's lease in the same round trip), then start
        the answer. `keep_seq`: the ack's seq is stored with the answer (one statement), so a resend gets
        the same ack; a regenerated answer keeps the question's first ack. False when another replica
        acknowledged the question and started its answer first (a resend racing the first send's ack): no
        ack is logged, and the answer is that replica's. `resent`: the ack of a resend that found the question
        unacknowledged, refused also when the first send's ack was logged meanwhile."""
        conversation = joined.conversation
        seq, leased, started_elsewhere = 0, False, False
        lease, answer = None, None
        if reply is not None:
            lease = lease_member(
                conversation.tenant_id, conversation.user_id, conversation.id, reply.id, conversation.course_id
            )
            answer = (reply.id, f"{ANSWER_START_RESENT}{reply.id}" if resent else ANSWER_START)
        try:
            [(seq, _)] = await self.hub.emit(
                conversation.id, [encode(ack)], floor=conversation.last_seq, course=course_key(conversation),
                lease=lease, answer=answer,
            )
            leased = lease is not None
            if reply is None:  # paused: no answer's commit will record the ack's seq
                await self.db.record_seq(session.claims.tenant, conversation.id, seq, question.id)
        except AnswerFencedError:
            started_elsewhere = True
        finally:
            # The question is committed: it gets its answer (or a final status) even if the ack failed.
            if reply is not None and not started_elsewhere:
                self.answers.start(
                    conversation, joined.course, question, reply.id, session.tenant, reservation,
                    seq if keep_seq else 0, leased=leased, history=history,
                )
        if started_elsewhere:
            await self.budgets.settle(reservation, 0, 0)  # nothing will be generated here
        return not started_elsewhere

    async def cancel(self, session: Session, reply_id: int) -> None:
        """Stop the user's answer wherever it is generated; an answer that already ended is left as it is."""
        if self.answers.stop(reply_id, session.claims.tenant, session.user.id):
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
            self.answers.stop(int(message.get("reply_id", 0)), str(message.get("tenant")), str(message.get("user")))
        elif message.get("op") == "documents_changed":
            self.answers.documents.forget(str(message.get("tenant")), str(message.get("course")))
        elif message.get("op") == "revoke_session":
            self._revoked[str(message.get("session"))] = float(message.get("until", 0))
            self._close_expired()
        elif message.get("op") == "erase_user":
            tenant_id, external_id = str(message.get("tenant")), str(message.get("user"))
            if isinstance(deleted_at := message.get("deleted_at"), float | int):
                expires_at = message.get("expires_at")
                self.erasures.add(tenant_id, external_id, deleted_at, float(expires_at or 0))
            self._erase_user(
                tenant_id,
                external_id,
                str(message.get("user_id")),
                [str(c) for c in message.get("conversations") or ()],
            )

    def _erase_user(self, tenant_id: str, external_id: str, user_id: str, conversation_ids: list[str]) -> None:
        """`smartedu delete-user` erased this user: close their sockets here with 4403 (a frame into the
        deleted account could only fail), stop their answers, and once those have ended delete the
        conversations' stream logs again, since an answer's last frames may have been logged after the
        command deleted them."""
        for session in self._sessions.values():
            if session.claims.tenant == tenant_id and session.claims.sub == external_id:
                self._close_erased(session)
        stopped = self.answers.stop_user(tenant_id, user_id)
        if stopped:
            self._own(self._forget_after(stopped, conversation_ids))

    async def _forget_after(self, answers: list[asyncio.Task[None]], conversation_ids: list[str]) -> None:
        await asyncio.wait(answers)
        try:
            await self.hub.store.forget_conversations(conversation_ids)
        except Exception as exc:  # the logs expire an hour after their last frame
            log.warning("could not delete an erased user's stream logs", extra={"error": repr(exc)})

    def _close_erased(self, session: Session) -> None:
        if not session.expired:
            session.expired = True
            self._own(session.peer.close(CloseCode.FORBIDDEN, ACCOUNT_DELETED))

    def _own(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task of its own, kept in `_expiring` (cancelled and awaited on shutdown)."""
        task = asyncio.create_task(work)
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def regenerate(self, session: Session, reply_id: int) -> None:
        """Answer a question again after its newest answer ended as interrupted, failed or stopped: admitted
        like a message (rate limit, budgets), and not while a teacher has paused the AI, nor when the answer
        ended for good (blocked, declined, rejected: `regenerate_refused`)."""
        claims, ref = session.claims, str(reply_id)
        if self._closing:
            raise restarting("the server is restarting", ref)
        message = await self.db.find_user_message(claims.tenant, session.user.id, reply_id)
        if message is None or message.role != "assistant" or message.reply_to is None:
            raise not_found("reply", ref=ref)
        try:
            joined = await self._joined(session, message.conversation_id)
        except ChatError as exc:
            exc.ref = ref
            raise
        if refused := regenerate_refused(message.blocked, message.error_code, ref):
            raise refused
        if message.status in ("streaming", "complete"):
            raise bad_request("only an interrupted, failed or stopped answer can be regenerated", ref)
        # Read again: the paused flag (and the seq floor) may have changed since the socket joined.
        conversation = await self.db.get_conversation(claims.tenant, session.user.id, message.conversation_id)
        if conversation is None:
            raise not_found("conversation", ref=ref)
        joined.conversation = conversation
        if conversation.ai_paused:
            raise forbidden("your teacher has paused the tutor for this conversation", ref)
        question = await self.db.get_message(claims.tenant, conversation.id, message.reply_to)
        if question is None:
            raise not_found("reply", ref=ref)
        tenant = session.tenant or TenantSettings(claims.tenant)
        reservation = await self.budgets.admit(tenant, session.user.id, question.text, ref)
        reply = await self.budgets.reserved_for(
            reservation, self.db.regenerate_reply(claims.tenant, conversation.id, question.id, reply_id)
        )
        if reply is None:  # another regenerate (or a pause) got there first
            raise bad_request("only the newest answer of a question, once ended, can be regenerated", ref)
        ack = {
            "type": "ack",
            "id": question.client_id,
            "message_id": question.id,
            "reply_id": reply.id,
            "conversation_id": conversation.id,
            "text": question.text,
            "regenerated": True,
        }
        await self._acknowledge(session, joined, ack, question, reply, reservation, keep_seq=False)

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

    async def origin_allowed_for(self, tenant_id: str, origin: str) -> bool:
        """Whether a browser origin is one of the tenant's allowed embedding origins."""
        tenant = await self.db.get_tenant(tenant_id)
        return origin.rstrip("/") in tenant.allowed_origins

    async def _maintain(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                if tick % 2 == 0:
                    await self.answers.renew_leases()
                    self._close_expired()
                await self.answers.take_over_expired()
                if tick % 30 == 0:
                    await self.answers.end_unstarted()
                if tick % REFRESH_S == 0 and await self.erasures.refresh():
                    # Erased by a delete-user run without REDIS_URL (nothing was announced): their sockets.
                    for session in self._sessions.values():
                        if self.erasures.erased(session.claims):
                            self._close_erased(session)
                if tick % 5 == 0:
                    sessions = [(*s.presence, s.id) for s in self._sessions.values() if s.presence]
                    await self.hub.store.heartbeat(sessions, PRESENCE_TTL_MS)
                    await self.hub.prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maintenance failed")

    async def log_out(self, tenant_id: str, session_id: str, remaining_s: int) -> None:
        """Revoke a cookie session until it would have expired and close its sockets on every replica (this
        one at once, before the announcement comes back)."""
        await self.revocations.revoke(tenant_id, session_id, remaining_s)
        self._on_control({"op": "revoke_session", "session": session_id, "until": time.time() + remaining_s})

    async def _on_reconnect(self) -> None:
        """After a pub/sub reconnect: what was announced meanwhile was not heard here."""
        self.answers.documents.forget_all()
        await self._recheck_logged_out()

    async def _recheck_logged_out(self) -> None:
        """After a pub/sub reconnect: a logout announced meanwhile was not heard here, so ask Redis about the
        cookie sessions with sockets on this replica (one round trip) and close those logged out."""
        open_sessions = {
            s.claims.session_id: s.claims for s in self._sessions.values() if s.claims.session_id and not s.expired
        }
        if not open_sessions:
            return
        tenants = {session_id: claims.tenant for session_id, claims in open_sessions.items()}
        for session_id in await self.revocations.revoked_among(tenants):
            self._revoked[session_id] = float(open_sessions[session_id].exp)
        self._close_expired()

    def logged_out(self, claims: Claims) -> bool:
        """Whether these cookie-session claims were logged out since they were read (no round trip)."""
        return claims.session_id is not None and claims.session_id in self._revoked

    def _close_expired(self) -> None:
        """Close the sockets whose token (or cookie session) has expired or was logged out with 4401, as a
        hello with it would be refused; the client signs in again and resumes. Each close waits for the
        client's closing handshake, so it runs in a task of its own (kept in `_expiring`) and never holds up
        the leases."""
        now = time.time()
        if self._revoked:
            self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
        for session in self._sessions.values():
            if session.expired:
                continue
            if session.claims.exp <= now:
                reason = "token expired"
            elif self.logged_out(session.claims):
                reason = "session logged out"
            else:
                continue
            session.expired = True
            self._own(session.peer.close(CloseCode.BAD_TOKEN, reason))

    async def drain(self, deadline_s: float) -> None:
        """Stop taking messages, ask clients to reconnect elsewhere, and let answers finish until the deadline."""
        self._closing = True
        for session in list(self._sessions.values()):
            after_ms = random.randint(500, 3000)
            await session.peer.send(encode({"type": "reconnect", "after_ms": after_ms}))
        await self.answers.wait_idle(deadline_s)

    async def close(self) -> None:
        """Interrupt every answer still running, commit it, and stop the background work."""
        self._closing = True
        await self.answers.close()
        # Together, so that their departures share round trips (one after the other, each waited for its own).
        await asyncio.gather(*(self.close_session(session) for session in list(self._sessions.values())))
        if self._maintenance is not None:
            await cancel_and_wait(self._maintenance)
        for task in list(self._expiring):
            await cancel_and_wait(task)
        await self.hub.close()
        with contextlib.suppress(Exception):
            await self.answers.provider.close()


def _reply_of(frame: bytes) -> int | None:
    if not frame.startswith(b'{"type":"token"'):
        return None
    value = orjson.loads(frame).get("reply_id")
    return int(value) if isinstance(value, int) else None
