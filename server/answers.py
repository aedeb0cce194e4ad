"""Answers: generated in their own tasks, streamed as numbered frames, committed with a final status.

Each answer holds a lease in Redis while it runs; a replica that finds an expired lease takes the answer
over: from then on Redis refuses the answer's frames from its former replica (alive but slow, perhaps, and
told to stop generating it), and the answer is committed as interrupted with the text its tokens carried,
then announced with its `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import orjson

from ai.base import AIError, AIRequest, CourseContext, Provider, Usage, estimate_prompt_tokens, estimate_tokens
from ai.base import Turn as HistoryTurn
from ai.prompt import build_system_instruction
from storage.documents import Documents
from storage.errors import AnswerFencedError
from storage.models import Conversation, Course, Message, MessageStatus, PastMessage, TenantSettings, UsageRecord
from storage.postgres import UNAVAILABLE_ERRORS, Database
from storage.redis_store import ANSWER_END, ANSWER_END_TAKEN_OVER, ANSWER_TOKEN, LogSnapshot, TokenAdjustment

from .budgets import Budgets, Reservation
from .errors import ChatError, ai_failure, answer_failed
from .hub import Hub
from .logs import request_id
from .metrics import Metrics
from .protocol import encode, error_frame
from .settings import Settings
from .tracing import Tracer
from .turns import TokenBatcher, Turn, stream_answer

log = logging.getLogger(__name__)

LEASE_TTL_MS = 6000
# How often the leases of running answers are renewed (the maintenance loop's every other tick).
LEASE_RENEW_S = 2.0
# An answer's lease is taken with its question's ack, milliseconds after its placeholder is committed: one
# still without a lease after this long was never started.
UNSTARTED_AFTER_S = 60.0
# An answer's commit that fails because PostgreSQL restarts or fails over is tried again, after 0.2 s,
# then twice as long each time up to 2 s, for this long: a restart takes seconds, a managed fail-over
# usually under half a minute.
COMMIT_RETRY_S = 30.0
COMMIT_RETRY_FIRST_S = 0.2
COMMIT_RETRY_MAX_S = 2.0
# A change of course documents is announced within this time, or left to the other replicas' cache expiry:
# the teacher's request does not wait on a Redis that does not answer.
ANNOUNCE_TIMEOUT_S = 2.0

SAFETY_MESSAGE = (
    "I can't help with that. Let's keep our conversation safe and about your learning. "
    "If something is worrying you, please talk to your teacher or another adult you trust. "
    "What would you like to work on in your course?"
)


def lease_member(tenant_id: str, user_id: str, conversation_id: str, reply_id: int, course_id: str | None) -> str:
    """The lease of one answer, as stored in the leases index: everything a takeover needs."""
    return orjson.dumps([tenant_id, user_id, conversation_id, reply_id, course_id]).decode()


def _lease_member(turn: Turn) -> str:
    return lease_member(turn.tenant_id, turn.user_id, turn.conversation_id, turn.reply_id, turn.course_id)


class Answers:
    """Owns every answer this process generates: started, queued per conversation, leased, committed."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        hub: Hub,
        provider: Provider,
        budgets: Budgets,
        metrics: Metrics,
        tracer: Tracer,
    ):
        self.settings = settings
        self.db = db
        self.hub = hub
        self.provider = provider
        self.budgets = budgets
        self.metrics = metrics
        self.tracer = tracer
        self.documents = Documents(db, settings.max_course_documents, on_change=self._announce_documents)
        self._turns: dict[int, Turn] = {}
        # One lock per conversation with an answer queued or running here, and how many use it: it goes with
        # the last (`locked()` is no guide: it is False from a release until the next waiter runs).
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._closing = False  # stopping: a failed commit is left to another replica's takeover at once

    def start(
        self,
        conversation: Conversation,
        course: Course | None,
        question: Message,
        reply_id: int,
        tenant: TenantSettings | None = None,
        reservation: Reservation | None = None,
        question_seq: int = 0,
        leased: bool = False,
        history: list[PastMessage] | None = None,
    ) -> Turn:
        """Run an answer for a committed question (queued behind the conversation's current one)."""
        turn = Turn(
            tenant_prompt=tenant.system_prompt if tenant else None,
            tenant_id=conversation.tenant_id,
            user_id=conversation.user_id,
            conversation_id=conversation.id,
            question_id=question.id,
            reply_id=reply_id,
            question=question.text,
            course_id=conversation.course_id,
            reservation=reservation,
            question_seq=question_seq,
            leased=leased,
            history=history,
            floor=conversation.last_seq,
        )
        self._turns[turn.reply_id] = turn
        turn.task = asyncio.create_task(self._run_turn(turn, course), name=f"turn-{turn.reply_id}")
        return turn

    async def _announce_documents(self, tenant_id: str, course_id: str) -> None:
        """Tell the other replicas that a course's documents changed, so that they read its names again."""
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
                changed: dict[str, object] = {"op": "documents_changed", "tenant": tenant_id, "course": course_id}
                await self.hub.store.publish_control(changed)
        except Exception as exc:  # the change is made: the others read the names again within NAMES_TTL_S
            log.warning(
                "could not announce a change of course documents",
                extra={"tenant": tenant_id, "course_id": course_id, "error": repr(exc)},
            )

    def stop(self, reply_id: int, tenant_id: str, user_id: str) -> bool:
        """Stop the user's answer if this process generates it."""
        turn = self._turns.get(reply_id)
        if turn is None or turn.tenant_id != tenant_id or turn.user_id != user_id:
            return False
        turn.stop("stopped")
        return True

    def stop_user(self, tenant_id: str, user_id: str) -> list[asyncio.Task[None]]:
        """Stop every answer of the user this process generates (or has queued); their tasks."""
        tasks: list[asyncio.Task[None]] = []
        for turn in list(self._turns.values()):
            if turn.tenant_id == tenant_id and turn.user_id == user_id:
                turn.stop("stopped")
                if turn.task is not None:
                    tasks.append(turn.task)
        return tasks

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        """The conversation's lock, for one more answer (each gives it back with `_unlock`)."""
        lock, users = self._locks.get(conversation_id) or (asyncio.Lock(), 0)
        self._locks[conversation_id] = (lock, users + 1)
        return lock

    def _unlock(self, conversation_id: str) -> None:
        lock, users = self._locks[conversation_id]
        if users > 1:
            self._locks[conversation_id] = (lock, users - 1)
        else:
            del self._locks[conversation_id]

    async def _run_turn(self, turn: Turn, course: Course | None) -> None:
        lock = self._lock(turn.conversation_id)
        member = _lease_member(turn)
        try:
            if not turn.leased:  # usually taken with the ack, in the same round trip
                if not await self._claim(turn):
                    return
                with contextlib.suppress(Exception):  # the maintenance loop renews it again in 2 s
                    await self.hub.store.renew_leases([member], LEASE_TTL_MS)
                turn.leased = True
            async with lock:
                with self.tracer.span("turn", conversation_id=turn.conversation_id, reply_id=turn.reply_id):
                    await self._generate(turn, course)
        except asyncio.CancelledError:
            # Cancelled while queued behind another answer: it still needs a final status. One cancelled
            # while being ended (only the stop deadline does that) may have sent frames past a length of 0
            # and have its commit on its way: it keeps its lease, and a takeover ends it from the log.
            if not turn.finished and not turn.ending:
                await self._finish(turn, "interrupted", None, 0, None)
            raise
        except Exception:
            log.exception("turn could not be finished", extra=turn.log_context)
        finally:
            self._turns.pop(turn.reply_id, None)
            self._unlock(turn.conversation_id)
            # Usually dropped with the `done`, in the same round trip. An answer that could not be committed,
            # or whose `done` was not logged after its commit, keeps it: no longer renewed, it expires and a
            # takeover (here or on another replica, once PostgreSQL answers) ends the answer as interrupted,
            # or sends the `done` of what was committed.
            if turn.leased and turn.finished and not turn.done_pending:
                with contextlib.suppress(Exception):
                    await self.hub.store.release_lease(member)

    async def _claim(self, turn: Turn) -> bool:
        """An answer started without its ack's claim (the ack failed, or a teacher resumed the AI): whether it
        is this replica's to generate. When another replica started it first (a resend of its question
        raced the first ack), or took it over, it is left to that one."""
        try:
            if await self.hub.store.claim_answer(turn.conversation_id, turn.reply_id, self.hub.node):
                return True
        except Exception as exc:  # Redis unreachable: generated here, as the ack would have it
            log.warning("could not claim an answer; generating it", extra={**turn.log_context, "error": repr(exc)})
            return True
        log.info("answer started by another replica; not generated here", extra=turn.log_context)
        await self.budgets.settle(turn.reservation, 0, 0)
        turn.reservation, turn.finished = None, True
        return False

    async def _generate(self, turn: Turn, course: Course | None) -> None:
        batcher = TokenBatcher(
            lambda text, offset: self._emit_token(turn, text, offset), self.settings.frame_interval_ms / 1000
        )
        status: MessageStatus = "complete"
        usage: Usage | None = None
        failure: ChatError | None = None
        cancelled = False
        try:
            with self.tracer.span("history"):
                request = await self._build_request(turn, course) if turn.stop_reason is None else None
            # Checked again after the await: a cancel may have arrived while the history loaded.
            if request is not None and turn.stop_reason is None:
                turn.request = request
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
        except AnswerFencedError:
            pass  # taken over by another replica: the batcher keeps the error, handled below
        except AIError as exc:
            # An answer the model ended early after some text carries the provider's usage (thoughts included).
            usage = exc.usage
            failure, status = ai_failure(exc, str(turn.reply_id)), "failed"
            self.metrics.ai_errors.labels(kind=exc.kind).inc()
            log.warning("ai provider failed", extra={"kind": exc.kind, **turn.log_context})
        except Exception:
            # PostgreSQL gone while the answer's context was read, or a bug: the student is told, as for an
            # AI failure, rather than given a `done` that does not say why.
            log.exception("turn failed", extra=turn.log_context)
            failure, status = answer_failed(str(turn.reply_id)), "failed"
        # From here on the answer's length is what the batcher has handed out: a shutdown lets it finish.
        turn.ending = True
        try:
            await batcher.flush()
        except AnswerFencedError:
            pass
        except Exception:
            log.exception("token delivery failed", extra=turn.log_context)
            if status == "complete":
                status, failure = "failed", answer_failed(str(turn.reply_id))
        if isinstance(batcher.error, AnswerFencedError):
            await self._given_up(turn, usage)
        else:
            with self.tracer.span("done", status=status):
                await self._finish(turn, status, usage, batcher.offset, failure)
        if cancelled:
            raise asyncio.CancelledError

    async def _build_request(self, turn: Turn, course: Course | None) -> AIRequest:
        recent: Sequence[PastMessage | Message] | None = turn.history
        if recent is None or any(m.status == "streaming" for m in recent):
            # Not read with the question, or another answer was still being written then: read it now
            # (this turn holds the conversation's lock, so every earlier answer has its final text).
            recent = await self.db.recent_messages(
                turn.tenant_id, turn.conversation_id, self.settings.history_messages + 1, before=turn.reply_id
            )
        # The question goes last, separately; unfinished answers are left out of the context, and so are
        # blocked ones with their questions: the model must not read the text a filter stopped, and Gemini
        # judges a prompt as a whole, so a blocked question kept in it would block every later one.
        blocked = {m.reply_to for m in recent if m.blocked}
        history = tuple(
            HistoryTurn(m.role, _unlabelled(m.text) if m.role == "user" else m.text)
            for m in recent
            if m.id != turn.question_id
            and m.text
            and not m.blocked
            and m.id not in blocked
            and (m.role != "assistant" or m.status == "complete")
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
        await self.hub.emit(turn.conversation_id, [encode(flag)], floor=turn.seq_floor, course=turn.course_key)

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
        [(seq, _)] = await self.hub.emit(
            turn.conversation_id, [frame], floor=turn.seq_floor, course=turn.course_key,
            answer=(turn.reply_id, ANSWER_TOKEN + text),
        )
        turn.last_seq = seq

    async def _finish(
        self, turn: Turn, status: MessageStatus, usage: Usage | None, length: int, error: ChatError | None
    ) -> None:
        """Commit the answer's final state, then tell every joined socket (`done`)."""
        record = self._record(turn, usage)
        used = _used(record)
        reservation, turn.reservation = turn.reservation, None
        # The conversation's durable last seq becomes the `done`'s, which is emitted after the commit: the
        # next seq after every one seen here (exactly the done's unless another frame comes in between).
        done_seq = max(turn.seq_floor, self.hub.last_seq(turn.conversation_id)) + 1
        truncated = usage is not None and usage.truncated and status == "complete"
        blocked = usage is not None and usage.blocked and status == "complete"
        why = (error.code.value, bool(error.retryable)) if error else None
        try:
            committed = await self._commit(turn, status, done_seq, record, truncated, why, blocked)
        except BaseException:
            await self.budgets.settle(reservation, *used)
            raise
        turn.finished = True
        # Counted once, by the replica whose status is stored: here, or by the takeover that ended it first.
        self._observe(status if committed else None, record)
        if committed and self.settings.log_content:
            _log_content(turn, status)
        if not committed:
            await self.budgets.settle(reservation, *used)
            # Another replica already ended it (its lease had expired; the takeover has read its text), or the
            # conversation was deleted (`delete-user`, `purge`): what Redis keeps of it goes.
            with contextlib.suppress(Exception):  # else it expires an hour after its last token
                await self.hub.store.drop_answer(turn.conversation_id, turn.reply_id)
                if await self.db.tenant_conversation(turn.tenant_id, turn.conversation_id) is None:
                    # Deleted while this replica still generated the answer: the frames it logged after the command
                    # deleted the log (or the takeover's mark that would have refused them) go too.
                    await self.hub.store.forget_conversations([turn.conversation_id])
            return
        # The reservation is settled and the lease dropped in the `done`'s round trip. Until it is logged, a
        # takeover of the lease (once it expires) would have to send it: this replica stopped (the stop deadline),
        # or Redis failed.
        turn.done_pending = True
        tokens = (record.prompt_tokens, record.output_tokens) if record else (0, 0)
        try:
            await self._emit_done(
                turn.conversation_id, turn.reply_id, status, length, tokens, turn.course_key, done_seq - 1,
                release=_lease_member(turn), adjust=self.budgets.adjustment(reservation, *used),
                truncated=truncated, error=why, blocked=blocked, step=ANSWER_END,
            )
        except AnswerFencedError:
            # Taken over since its last token (this replica was slow): the takeover found it committed and sends
            # its `done`, with what was committed here.
            turn.leased = False
            return
        turn.done_pending, turn.leased = False, False
        if error is not None:
            await self.hub.deliver(turn.conversation_id, [(0, error_frame(error))])

    def _record(self, turn: Turn, usage: Usage | None) -> UsageRecord | None:
        """What the answer cost, for its usage row and the budgets (None when it never reached the provider)."""
        if not turn.started:
            return None
        # An answer that failed or was stopped after some text has no Usage, but the provider bills what it
        # read and wrote: estimated, so that the budgets count it.
        prompt_tokens = usage.prompt_tokens if usage else 0
        if usage is None and turn.request is not None and turn.parts:  # estimated only when needed
            prompt_tokens = estimate_prompt_tokens(turn.request)
        return UsageRecord(
            provider=self.provider.name,
            model=self.provider.model,
            prompt_tokens=prompt_tokens,
            output_tokens=usage.output_tokens if usage else estimate_tokens(turn.text),
            ttft_ms=(turn.first_token_at - turn.started) * 1000 if turn.first_token_at else None,
            duration_ms=(time.monotonic() - turn.started) * 1000,
            passage_ids=turn.passage_ids,
        )

    async def _given_up(self, turn: Turn, usage: Usage | None) -> None:
        """Another replica took the answer over while this one still generated it (slow, not dead): Redis
        refused its frames from then on. That replica commits and announces it; this one only settles what
        the provider was paid, and keeps away from the lease."""
        log.warning("answer taken over by another replica; stopped generating it", extra=turn.log_context)
        record = self._record(turn, usage)
        used = _used(record)
        reservation, turn.reservation = turn.reservation, None
        await self.budgets.settle(reservation, *used)
        turn.finished, turn.leased = True, False

    async def _commit(
        self,
        turn: Turn,
        status: MessageStatus,
        seq: int,
        record: UsageRecord | None,
        truncated: bool,
        error: tuple[str, bool] | None,
        blocked: bool = False,
    ) -> bool:
        """`finish_reply`, tried again while PostgreSQL restarts or fails over (for up to COMMIT_RETRY_S):
        the answer stays this replica's (its lease renewed) and gets its `done` once the database is back.
        Past that, the error is raised; the lease, no longer renewed, expires and a takeover ends the answer."""
        deadline = time.monotonic() + COMMIT_RETRY_S
        delay, attempt = COMMIT_RETRY_FIRST_S, 0
        while True:
            try:
                return await self.db.finish_reply(
                    turn.tenant_id, turn.user_id, turn.conversation_id, turn.reply_id, turn.text, status, seq,
                    record, question=(turn.question_id, turn.question_seq) if turn.question_seq else None,
                    truncated=truncated, error=error, blocked=blocked, again=attempt > 0,
                )
            except UNAVAILABLE_ERRORS as exc:
                if self._closing or time.monotonic() + delay > deadline:
                    raise
                attempt += 1
                self.metrics.commit_retries.inc()
                log.warning(
                    "database unavailable; answer commit will be retried",
                    extra={**turn.log_context, "attempt": attempt, "error": repr(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, COMMIT_RETRY_MAX_S)

    def _observe(self, status: str | None, record: UsageRecord | None) -> None:
        metrics = self.metrics
        if status is not None:
            metrics.turn_ended(status)
        if record is None:
            return
        ttft_s = record.ttft_ms / 1000 if record.ttft_ms is not None else None
        metrics.answer_timed(record.provider, record.model, ttft_s, record.duration_ms / 1000)
        metrics.tokens.inc(record.output_tokens)

    async def _emit_done(
        self,
        conversation_id: str,
        reply_id: int,
        status: str,
        length: int,
        tokens: tuple[int, int],
        course: tuple[str, str] | None,
        floor: int,
        release: str | None = None,
        adjust: TokenAdjustment | None = None,
        truncated: bool = False,
        error: tuple[str, bool] | None = None,
        blocked: bool = False,
        step: str = ANSWER_END,
    ) -> None:
        """The answer's `done` (`tokens`: prompt and output tokens; `error`: a failed answer's code and whether
        it is retryable), emitted as its owner's last frame (`step` ANSWER_END) or a takeover's."""
        done: dict[str, object] = {
            "type": "done",
            "reply_id": reply_id,
            "conversation_id": conversation_id,
            "status": status,
            "length": length,
            "truncated": truncated,
            "blocked": blocked,
            "usage": {"prompt_tokens": tokens[0], "output_tokens": tokens[1]},
        }
        if error is not None:
            # A failed answer: why, and whether asking again can help (the `error` that follows says more);
            # teachers watching get the `done` only.
            done["error"], done["retryable"] = error
        await self.hub.emit(
            conversation_id, [encode(done)], floor=floor, course=course, release=release, adjust=adjust,
            answer=(reply_id, step),
        )

    async def renew_leases(self) -> None:
        """Keep the leases of this process's answers alive (every 2 s; they last 6 s)."""
        members = [_lease_member(t) for t in self._turns.values() if not t.finished]
        await self.hub.store.renew_leases(members, LEASE_TTL_MS)

    async def take_over_expired(self) -> None:
        """Answers whose replica stopped renewing its lease end as interrupted, with the text logged so far."""
        renewed = time.monotonic()
        for member in await self.hub.store.claim_expired_leases():
            if time.monotonic() - renewed > LEASE_RENEW_S:
                # Many answers of a dead replica, each committed while PostgreSQL is busy, can take longer
                # than a lease lasts: this replica's own answers must not expire meanwhile and be taken
                # over in turn.
                with contextlib.suppress(Exception):
                    await self.renew_leases()
                renewed = time.monotonic()
            try:
                await self._take_over(member)
            except Exception:
                # Claimed, so no other replica will end it: an expired lease again, and the next tick retries.
                log.exception("could not take over an abandoned answer; retrying")
                with contextlib.suppress(Exception):
                    await self.hub.store.lease_unleased([member])

    async def _take_over(self, member: str) -> None:
        tenant_id, user_id, conversation_id, reply_id, course_id = orjson.loads(member)
        if reply_id in self._turns:
            return  # ours after all (a slow renewal); the next renewal restores the lease
        # Sealed first: from here on its former replica logs none of its frames, so the text read now is the
        # one its students were sent, and the log read after it holds the owner's `done` if there is one.
        sealed = await self.hub.store.seal_answer(conversation_id, reply_id)
        snapshot = await self.hub.store.snapshot(conversation_id)
        text = sealed if sealed is not None else _logged_text(snapshot.entries, reply_id, tenant_id, conversation_id)
        conversation = await self.db.tenant_conversation(tenant_id, conversation_id)
        floor = max(snapshot.seq, conversation.last_seq if conversation else 0)
        committed = await self.db.finish_reply(
            tenant_id, user_id, conversation_id, reply_id, text, "interrupted", floor + 1, None
        )
        course = (tenant_id, course_id) if course_id else None
        if not committed:
            await self._send_missing_done(tenant_id, conversation_id, reply_id, course, snapshot)
            # Ended (or deleted) all the same: its text goes; the mark stays until it expires, as the replica that
            # committed it may still send its `done`.
            await self.hub.store.drop_answer(conversation_id, reply_id, keep_owner=True)
            return
        # Its own replica never counts it (stopped, or gave up the commit): SmartEduTurnsInterrupted would
        # miss the answers a crashed replica leaves.
        self.metrics.turn_ended("interrupted")
        log.warning(
            "took over an abandoned answer",
            extra={"tenant": tenant_id, "conversation_id": conversation_id, "reply_id": reply_id},
        )
        # Its replica may be alive, only slow (a stalled event loop, a Redis hiccup): it stops generating
        # instead of streaming tokens after this `done` and spending the school's budget on them.
        await self.hub.store.publish_control(
            {"op": "cancel", "reply_id": reply_id, "tenant": tenant_id, "user": user_id}
        )
        await self._emit_done(
            conversation_id, reply_id, "interrupted", len(text), (0, 0), course, floor, step=ANSWER_END_TAKEN_OVER
        )

    async def _send_missing_done(
        self,
        tenant_id: str,
        conversation_id: str,
        reply_id: int,
        course: tuple[str, str] | None,
        snapshot: LogSnapshot,
    ) -> None:
        """A taken-over answer its replica had committed already: if that replica's `done` is not in the log
        (the stop deadline cut it off after the commit, or Redis failed), its students would wait for it
        forever; it is sent now, as committed."""
        if any(_is_done_of(frame, reply_id) for _, frame in snapshot.entries):
            return
        message = await self.db.get_message(tenant_id, conversation_id, reply_id)
        if message is None or message.role != "assistant" or message.status == "streaming":
            return
        log.warning(
            "sent the done of an answer its replica committed without one",
            extra={"tenant": tenant_id, "conversation_id": conversation_id, "reply_id": reply_id},
        )
        error = (message.error_code, bool(message.retryable)) if message.error_code else None
        await self._emit_done(
            conversation_id, reply_id, message.status, len(message.text),
            (message.prompt_tokens or 0, message.output_tokens or 0), course, max(snapshot.seq, message.seq - 1),
            truncated=message.truncated, error=error, blocked=message.blocked, step=ANSWER_END_TAKEN_OVER,
        )

    async def end_unstarted(self, older_than_s: float = UNSTARTED_AFTER_S) -> None:
        """Answers committed but never started (the replica stopped before the ack, or a commit whose reply
        was lost made the question look like a resend) hold no lease: they get an expired one, so that
        `take_over_expired` ends them as interrupted, which the student can regenerate."""
        found = await self.db.stale_placeholders(older_than_s)
        members = [lease_member(*answer) for answer in found if answer[3] not in self._turns]
        if given := await self.hub.store.lease_unleased(members):
            log.warning("answers that never started will be ended", extra={"answers": given})

    def running(self, reply_id: int) -> bool:
        """Whether this process generates (or has queued) the answer."""
        return reply_id in self._turns

    @property
    def active(self) -> int:
        return len(self._turns)

    async def wait_idle(self, deadline_s: float) -> None:
        """Wait until no answer runs, or the deadline passes."""
        deadline = time.monotonic() + deadline_s
        while self._turns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Interrupt every answer still running and wait until each is committed."""
        self._closing = True
        turns = list(self._turns.values())
        for turn in turns:
            turn.stop("interrupted")
            # One being ended is waited for: cancelled while its last frames or its commit are on their way,
            # it was committed again with a length of 0, or got no `done` at all.
            if turn.task is not None and not turn.ending:
                turn.task.cancel()
        tasks = [t.task for t in turns if t.task is not None]
        if tasks:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("turn ended with an error at shutdown", exc_info=result)


def _log_content(turn: Turn, status: str) -> None:
    """SMARTEDU_LOG_CONTENT: a turn's question and answer text, once the answer is committed (personal
    data: for debugging a school's tutor, never on by default)."""
    log.info(
        "turn content",
        extra={
            "tenant": turn.tenant_id, "conversation_id": turn.conversation_id, "question_id": turn.question_id,
            "reply_id": turn.reply_id, "status": status, "question": turn.question, "answer": turn.text,
        },
    )


def _unlabelled(text: str) -> str:
    """A student cannot pass their words off as the teacher's: the label the providers use is defused."""
    return text.replace("[Teacher message]", "[Teacher-message (typed by the student)]")


def _used(record: UsageRecord | None) -> tuple[int, int]:
    """What an answer takes from the budgets: (all its tokens, its output tokens)."""
    return (record.prompt_tokens + record.output_tokens, record.output_tokens) if record else (0, 0)


def _final(reason: str) -> MessageStatus:
    return "interrupted" if reason == "interrupted" else "stopped"


def _logged_text(entries: list[tuple[int, bytes]], reply_id: int, tenant_id: str, conversation_id: str) -> str:
    """An answer's text from its token frames still in the log: for an answer whose text Redis does not keep
    (generated by a replica of an older release). The log is capped: when its first frames are gone, the
    start of the text is lost, and the takeover says so in its log."""
    text, start = "", None
    for _, frame in entries:
        if frame.startswith(b'{"type":"token"'):
            data = orjson.loads(frame)
            if data.get("reply_id") == reply_id:
                start = data.get("offset", 0) if start is None else start
                text += str(data["text"])
    if start:
        log.warning(
            "took over an answer whose start the log no longer holds",
            extra={"tenant": tenant_id, "conversation_id": conversation_id, "reply_id": reply_id, "lost": start},
        )
    return text


def _is_done_of(frame: bytes, reply_id: int) -> bool:
    return frame.startswith(b'{"type":"done"') and orjson.loads(frame).get("reply_id") == reply_id


def course_key(conversation: Conversation) -> tuple[str, str] | None:
    """(tenant, course) of a conversation, for the course channel that teachers watch."""
    return (conversation.tenant_id, conversation.course_id) if conversation.course_id else None
