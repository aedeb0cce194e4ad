"""One answer being generated: the provider stream in its own task, tokens batched into frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ai.base import AIRequest, Provider, Usage
from storage.models import PastMessage

log = logging.getLogger(__name__)

EmitText = Callable[[str, int], Awaitable[None]]


# After an answer's first frame, at most one frame per this interval (SMARTEDU_FRAME_INTERVAL_MS): a
# provider that streams token by token at 40 tokens/s then costs 10 frames/s instead of 40, each one a
# Redis script and a write to every socket and teacher watching (docs/benchmarks.md). Ten updates a
# second still read as a continuous stream; the first token is never held back.
FRAME_INTERVAL_S = 0.1


def _wake(nap: asyncio.Future[None]) -> None:
    if not nap.done():
        nap.set_result(None)


class TokenBatcher:
    """Coalesces chunks into frames: the first chunk goes at once, later ones are gathered for at least
    `min_interval` after the previous frame started (and while it is still being logged and sent).

    With a slow provider (chunks further apart than the interval) every chunk is still its own frame;
    with a fast one, the hot path costs one Redis round trip per interval rather than per token. `flush`
    sends what is left at once, so the end of an answer is not held back.
    """

    def __init__(self, emit: EmitText, min_interval: float = FRAME_INTERVAL_S):
        self._emit = emit
        self._min_interval = min_interval
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._next_at = 0.0  # loop time before which no frame starts (after the first)
        self._nap: asyncio.Future[None] | None = None
        self._flushing = False
        self.offset = 0  # code points already handed to `emit`
        self.error: BaseException | None = None

    def push(self, text: str) -> None:
        """Queue a chunk; after an emit failed, raise it instead: a later frame would leave a hole in the
        client's text, so the answer ends there (as failed, with its whole text committed)."""
        if self.error is not None:
            raise self.error
        if not text:
            return
        self._pending.append(text)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                wait = self._next_at - loop.time()
                if wait > 0 and not self._flushing:
                    # A bare future and a timer: cheaper than asyncio.sleep, and `flush` can cut it short.
                    self._nap = loop.create_future()
                    timer = loop.call_later(wait, _wake, self._nap)
                    try:
                        await self._nap
                    finally:
                        timer.cancel()
                        self._nap = None
                text = "".join(self._pending)
                self._pending.clear()
                offset = self.offset
                self.offset += len(text)
                self._next_at = loop.time() + self._min_interval
                await self._emit(text, offset)
        except Exception as exc:
            # Kept for `flush`, which raises it in the turn that owns this batcher.
            self.error = exc
            self._pending.clear()
        finally:
            self._task = None

    async def flush(self) -> None:
        """Emit what is pending now and wait until every pushed chunk is out; re-raise an emit failure."""
        self._flushing = True
        if self._nap is not None:
            _wake(self._nap)
        while self._task is not None:
            await asyncio.shield(self._task)
        if self.error is not None:
            raise self.error


@dataclass(eq=False)
class Turn:
    """The state of one answer, shared between the chat core and the task that generates it."""

    tenant_id: str
    user_id: str
    conversation_id: str
    question_id: int
    reply_id: int
    question: str
    task: asyncio.Task[None] | None = None
    stream_task: asyncio.Task[Usage | None] | None = None
    stop_reason: str | None = None
    # The provider's final Usage, once its stream handed it over: the answer ended there (its text is whole, or a
    # filter blocked it), and it is ended as the provider ended it; a stop that comes after it is too late.
    outcome: Usage | None = None
    parts: list[str] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    finished: bool = False
    # Its stream is over and it is being ended (last frames, commit, `done`): no longer cancelled, since a
    # cancel there would leave it half ended (a second commit, or none, and no `done` of the right length).
    ending: bool = False
    course_id: str | None = None
    last_seq: int = 0  # of this answer's last token
    floor: int = 0  # the conversation's last seq committed to PostgreSQL when the answer started
    tenant_prompt: str | None = None
    passage_ids: tuple[int, ...] = ()
    reservation: Any = None  # budgets.Reservation, settled when the answer is committed
    question_seq: int = 0  # the seq of the question's ack, stored with the answer
    leased: bool = False  # whether this answer's lease is (believed to be) held in Redis
    done_pending: bool = False  # committed, its `done` not yet logged: the lease stays for a takeover to send it
    history: list[PastMessage] | None = None  # read with the question; None: read when the answer starts
    request: AIRequest | None = None  # what the provider was sent: estimated if the answer ends without usage

    @property
    def log_context(self) -> dict[str, object]:
        """Whose answer a log line is about (ids only, never text): a WARNING must say so by itself, as the
        `hello` line that names the socket's tenant is not written below INFO."""
        return {"tenant": self.tenant_id, "conversation_id": self.conversation_id, "reply_id": self.reply_id}

    @property
    def course_key(self) -> tuple[str, str] | None:
        return (self.tenant_id, self.course_id) if self.course_id else None

    @property
    def seq_floor(self) -> int:
        """The highest seq this answer knows the conversation has reached: a floor for its emits."""
        return max(self.floor, self.question_seq, self.last_seq)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stop(self, reason: str) -> None:
        """Ask the answer to end with `reason` ("stopped" or "interrupted"), unless the provider already ended it."""
        if self.outcome is not None:
            return
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.stream_task is not None:
            self.stream_task.cancel()
        elif self.task is not None and reason == "interrupted" and not self.ending:
            self.task.cancel()


async def stream_answer(provider: Provider, request: AIRequest, turn: Turn, batcher: TokenBatcher) -> Usage | None:
    """Consume the provider's stream, recording text and handing each chunk to the batcher."""
    turn.started = time.monotonic()
    usage: Usage | None = None
    async with contextlib.aclosing(provider.stream(request)) as stream:
        async for item in stream:
            if isinstance(item, Usage):
                usage = turn.outcome = item
                continue
            if turn.first_token_at is None:
                turn.first_token_at = time.monotonic()
            turn.parts.append(item)
            batcher.push(item)
    return usage
