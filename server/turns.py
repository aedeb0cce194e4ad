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

log = logging.getLogger(__name__)

EmitText = Callable[[str, int], Awaitable[None]]


class TokenBatcher:
    """Coalesces chunks that arrive while the previous frame is still being logged and sent.

    With a slow provider every chunk becomes its own frame at once; with a fast one, chunks that
    arrive during a Redis round trip share the next frame, so the hot path costs one round trip per
    frame rather than per token.
    """

    def __init__(self, emit: EmitText):
        self._emit = emit
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self.offset = 0  # code points already handed to `emit`
        self.error: BaseException | None = None

    def push(self, text: str) -> None:
        if not text:
            return
        self._pending.append(text)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                offset = self.offset
                self.offset += len(text)
                await self._emit(text, offset)
        except Exception as exc:
            # Kept for `flush`, which raises it in the turn that owns this batcher.
            self.error = exc
            self._pending.clear()
        finally:
            self._task = None

    async def flush(self) -> None:
        """Wait until every pushed chunk has been emitted; re-raise an emit failure."""
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
    parts: list[str] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    finished: bool = False
    course_id: str | None = None
    last_seq: int = 0
    tenant_prompt: str | None = None
    passage_ids: tuple[int, ...] = ()
    reservation: Any = None  # budgets.Reservation, settled when the answer is committed
    question_seq: int = 0  # the seq of the question's ack, stored with the answer
    leased: bool = False  # whether this answer's lease is (believed to be) held in Redis

    @property
    def course_key(self) -> tuple[str, str] | None:
        return (self.tenant_id, self.course_id) if self.course_id else None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stop(self, reason: str) -> None:
        """Ask the answer to end with `reason` ("stopped" or "interrupted")."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.stream_task is not None:
            self.stream_task.cancel()
        elif self.task is not None and reason == "interrupted":
            self.task.cancel()


async def stream_answer(provider: Provider, request: AIRequest, turn: Turn, batcher: TokenBatcher) -> Usage | None:
    """Consume the provider's stream, recording text and handing each chunk to the batcher."""
    turn.started = time.monotonic()
    usage: Usage | None = None
    async with contextlib.aclosing(provider.stream(request)) as stream:
        async for item in stream:
            if isinstance(item, Usage):
                usage = item
                continue
            if turn.first_token_at is None:
                turn.first_token_at = time.monotonic()
            turn.parts.append(item)
            batcher.push(item)
    return usage
