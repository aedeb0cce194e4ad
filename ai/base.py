"""The provider interface: a request in, an async stream of text chunks out, ending with usage."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["user", "assistant", "teacher"]


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the conversation's recent history, oldest first."""

    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class CourseContext:
    """What the tutor knows of the course the conversation belongs to."""

    id: str
    title: str
    description: str
    system_prompt: str | None = None
    document_names: tuple[str, ...] = ()
    passages: tuple[tuple[int, str, str], ...] = ()  # (document id, document name, passage text)


@dataclass(frozen=True, slots=True)
class AIRequest:
    """Everything a provider needs for one answer."""

    question: str
    history: tuple[Turn, ...] = ()
    course: CourseContext | None = None
    system_instruction: str = ""
    tenant_id: str = ""
    user_id: str = ""
    conversation_id: str = ""
    request_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """The final item of every stream: token counts as the provider reported (or estimated) them."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"
    blocked: bool = False
    truncated: bool = False  # the output limit cut the answer short (it is kept, and the student told)


StreamItem = str | Usage


# Why a call failed, as far as the people involved are concerned:
#   transient: an outage, a rate limit, a timeout; asking again later may well work;
#   config: the deployment is wrong (API key, model, request shape); every question fails until staff fix it;
#   refused: the provider declined this question or its answer (a filter); asking it again will not help;
#   request: the provider could not process this request (a conversation longer than the model's context,
#            content it rejects); others' questions are unaffected, and this one fails the same way again.
Cause = Literal["transient", "config", "refused", "request"]


class AIError(Exception):
    """The provider failed; `retryable` says whether this call may be tried again at once, `retry_after`
    how long to wait, `cause` whether anyone asking again could ever succeed (see `Cause`), `usage` what
    the provider reported for an answer that ended abnormally after some text (None when it never said)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        cause: Cause = "transient",
        usage: Usage | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.cause = cause
        self.usage = usage


class Provider(Protocol):
    """A source of streamed answers. Stop a stream by cancelling the task that iterates it."""

    name: str
    model: str

    def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        """Yield text chunks as they arrive, then exactly one `Usage`."""
        ...

    async def close(self) -> None:
        """Release connections; called once at shutdown."""
        ...


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for providers that report none."""
    return max(1, (len(text) + 3) // 4) if text else 0


def estimate_prompt_tokens(request: AIRequest) -> int:
    """A rough count of what a request sends (instruction, history, question), for when none is reported."""
    return estimate_tokens(request.system_instruction + request.question) + sum(
        estimate_tokens(turn.text) for turn in request.history
    )
