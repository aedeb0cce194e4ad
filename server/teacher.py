"""Teachers' view of their courses: live presence, watching answers stream, speaking up, pausing the AI.

Teachers see the courses in their token's `courses` claim; admins see every course of their tenant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.models import Conversation, Course, TenantSettings
from storage.postgres import Database

from .answers import Answers, course_key
from .auth import Claims
from .errors import forbidden, not_found
from .hub import Hub
from .protocol import Intervene, SetAI, encode

if TYPE_CHECKING:
    from .chat import Session


class Classroom:
    """Everything a teacher (or admin) does; every lookup is scoped by the teacher's tenant."""

    def __init__(self, db: Database, hub: Hub, answers: Answers):
        self.db = db
        self.hub = hub
        self.answers = answers

    async def visible_course(self, claims: Claims, course_id: str) -> Course:
        """A course a teacher may watch (in the token's courses) or any course of an admin's tenant."""
        teaches = claims.role == "teacher" and bool(claims.courses) and course_id in (claims.courses or ())
        if not (teaches or claims.role == "admin"):
            raise forbidden("you may not watch this course")
        course = await self.db.get_course(claims.tenant, course_id)
        if course is None:
            raise not_found("course")
        return course

    async def live_snapshot(self, claims: Claims, course_id: str) -> dict[str, Any]:
        """Students online in a course right now, across replicas, each with whether the AI is paused for
        them now (read after the presence, which keeps what it was when they joined)."""
        await self.visible_course(claims, course_id)
        students = await self.hub.store.online(claims.tenant, course_id)
        ids = [c for c in (s.get("conversation_id") for s in students) if isinstance(c, str)]
        paused = await self.db.paused_conversations(claims.tenant, ids)
        for student in students:
            student["ai_paused"] = student.get("conversation_id") in paused
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
        # A client id that names another author's message: ClientIdTakenError, a bad_request for the socket.
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
            [(seq, _)] = await self.hub.emit(
                conversation.id, [encode(body)], floor=conversation.last_seq, course=course_key(conversation)
            )
            await self.db.record_seq(session.claims.tenant, conversation.id, seq, message.id)
        else:
            await session.peer.send(encode({**body, "seq": message.seq}))

    async def set_ai(self, session: Session, frame: SetAI) -> None:
        """Pause or resume the tutor for one student (all their conversations in the course); on resume, each
        waiting question is answered."""
        conversation = await self._teacher_conversation(session, frame.conversation_id)
        changed = await self.db.set_ai_paused(
            session.claims.tenant, conversation.user_id, conversation.course_id, frame.paused
        )
        # The named conversation always says so (the teacher's switch is settled by it); the student's other
        # conversations in the course do when they changed (a tab may be open on one of them).
        siblings = [c for c in changed if c.id != conversation.id]
        for each in [conversation, *siblings]:
            state = {"type": "ai_state", "conversation_id": each.id, "paused": frame.paused}
            [(seq, _)] = await self.hub.emit(each.id, [encode(state)], floor=each.last_seq, course=course_key(each))
            await self.db.record_seq(session.claims.tenant, each.id, seq)
        if frame.paused:
            return
        for each in [conversation, *siblings]:
            await self._answer_waiting(session, each)

    async def _answer_waiting(self, session: Session, conversation: Conversation) -> None:
        """On resume: answer the question the conversation kept waiting while paused, if there is one."""
        question = await self.db.unanswered_question(session.claims.tenant, conversation.id)
        if question is None:
            return
        # The answer is the student's: it is reserved against their budgets, like a message's. Not against
        # their rate limit: the question was counted when it was sent.
        budgets = self.answers.budgets
        tenant = session.tenant or TenantSettings(session.claims.tenant)
        reservation = await budgets.admit(
            tenant, conversation.user_id, question.text, conversation.id, rate_limited=False
        )
        # Only if it is still waiting: another teacher may be resuming at the same moment.
        reply = await budgets.reserved_for(
            reservation, self.db.answer_waiting_question(session.claims.tenant, conversation.id, question.id)
        )
        if reply is None:
            return
        course = await self._course_of(conversation)
        self.answers.start(conversation, course, question, reply.id, tenant, reservation)

    async def _course_of(self, conversation: Conversation) -> Course | None:
        if conversation.course_id is None:
            return None
        return await self.db.get_course(conversation.tenant_id, conversation.course_id)
