"""Rows as the rest of the code sees them: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

MessageRole = Literal["user", "assistant", "teacher"]
MessageStatus = Literal["streaming", "complete", "stopped", "interrupted", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"complete", "stopped", "interrupted", "failed"})


@dataclass(frozen=True, slots=True)
class User:
    id: str
    tenant_id: str
    external_id: str
    role: str
    display_name: str


@dataclass(frozen=True, slots=True)
class TenantSettings:
    id: str
    system_prompt: str | None = None
    daily_token_budget: int | None = None
    user_daily_token_budget: int | None = None
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Course:
    tenant_id: str
    id: str
    title: str
    description: str
    system_prompt: str | None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    tenant_id: str
    user_id: str
    course_id: str | None
    title: str
    last_seq: int
    created_at: datetime
    updated_at: datetime
    ai_paused: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    conversation_id: str
    role: MessageRole
    text: str
    status: MessageStatus
    client_id: str | None
    reply_to: int | None
    seq: int
    created_at: datetime
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    truncated: bool = False  # a complete answer the output limit cut short
    error_code: str | None = None  # a failed answer: the error its student was sent (None: not an AI failure)
    retryable: bool | None = None  # ... and whether asking again can help
    blocked: bool = False  # a complete answer a safety filter stopped (kept out of the model's context)

    def to_wire(self) -> dict[str, object]:
        """The protocol's history item: what `done` (and the `error` after it) said of an answer."""
        item: dict[str, object] = {
            "id": self.id,
            "role": self.role,
            "text": self.text,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
        }
        if self.truncated:
            item["truncated"] = True
        if self.blocked:
            item["blocked"] = True
        if self.error_code is not None:
            item["error"] = self.error_code
            item["retryable"] = bool(self.retryable)
        return item


class PastMessage(NamedTuple):
    """A message of the history read with a question: what the answer's prompt needs of it, no more."""

    id: int
    role: MessageRole
    text: str
    status: MessageStatus
    reply_to: int | None  # an answer's question
    blocked: bool  # an answer a safety filter stopped: it and its question stay out of the context


@dataclass(frozen=True, slots=True)
class SavedQuestion:
    """The result of committing a student's message: the row, its reply placeholder (None while the AI
    is paused), and whether it is new."""

    message: Message
    reply: Message | None
    created: bool
    # The messages before the question, oldest first, read in the same statement (None when not asked for):
    # the answer's history, if nothing else is answered in the conversation first.
    history: list[PastMessage] | None = None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    provider: str
    model: str
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float | None
    duration_ms: float
    passage_ids: tuple[int, ...] = ()
