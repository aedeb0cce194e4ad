"""The error catalogue: one stable code per failure, mapped to HTTP statuses and WebSocket close codes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from ai.base import AIError
from storage.errors import ClientIdTakenError, DuplicateNameError, LimitReachedError, StorageError, UserErasedError


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    AI_UNAVAILABLE = "ai_unavailable"
    AI_DECLINED = "ai_declined"
    AI_REJECTED = "ai_rejected"
    BUSY = "busy"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.AI_UNAVAILABLE: 503,
    ErrorCode.AI_DECLINED: 422,
    ErrorCode.AI_REJECTED: 422,
    ErrorCode.BUSY: 503,
    ErrorCode.INTERNAL: 500,
}


class CloseCode:
    """WebSocket close codes the server uses deliberately (documented in docs/protocol.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    SERVICE_RESTART = 1012
    TOO_SLOW = 1013  # the client fell too far behind the frames sent to it: reconnect and resume
    TRY_AGAIN_LATER = 1013  # a hello the server could not finish in time: reconnect after a backoff
    CRASH = 1011
    BAD_TOKEN = 4401
    FORBIDDEN = 4403
    HELLO_TIMEOUT = 4408


ACCOUNT_DELETED = "account deleted"

# Errors that end the socket: the frame is sent, then the socket is closed with this code.
FATAL_CLOSE: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: CloseCode.BAD_TOKEN,
    ErrorCode.FORBIDDEN: CloseCode.FORBIDDEN,
    ErrorCode.BUSY: CloseCode.TRY_AGAIN_LATER,
}


@dataclass
class ChatError(Exception):
    """A failure the client is told about, with a stable code."""

    code: ErrorCode
    message: str
    ref: str | None = None
    retry_after: float | None = None
    retryable: bool | None = None  # said of AI failures: whether asking again can help
    document_id: int | None = None  # said of a conflict: the document already holding the name

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code.value, "message": self.message}
        if self.ref is not None:
            body["ref"] = self.ref
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after, 3)
        if self.retryable is not None:
            body["retryable"] = self.retryable
        if self.document_id is not None:
            body["document_id"] = self.document_id
        return body


def ai_failure(error: AIError, ref: str | None = None) -> ChatError:
    """What the student is told about a failed answer: whether asking again can help, and when."""
    if error.cause == "refused":
        return ChatError(ErrorCode.AI_DECLINED, "the tutor can't answer that question", ref, retryable=False)
    if error.cause == "request":
        message = "the tutor could not process this conversation"
        return ChatError(ErrorCode.AI_REJECTED, message, ref, retryable=False)
    if error.cause == "config":
        message = "the tutor is unavailable; the school's staff have been told"
        return ChatError(ErrorCode.AI_UNAVAILABLE, message, ref, retryable=False)
    message = "the tutor is unavailable right now; please try again"
    return ChatError(ErrorCode.AI_UNAVAILABLE, message, ref, retry_after=error.retry_after, retryable=True)


# What a regenerate of an answer that ended for good is told: the answer's own code (a safety-blocked answer is
# declined), since asking the same again would end the same way.
_ENDED_FOR_GOOD = {
    ErrorCode.AI_DECLINED: "the tutor can't answer that question; asking it again would end the same way",
    ErrorCode.AI_REJECTED: "the tutor could not process this conversation; asking again would end the same way",
}


def regenerate_refused(blocked: bool, error_code: str | None, ref: str) -> ChatError | None:
    """Why an answer may not be regenerated though it ended (None: it may): a safety filter blocked it, or
    the provider declined its question or rejected its conversation. Nothing is asked of the provider."""
    code = ErrorCode.AI_DECLINED if blocked else next((c for c in _ENDED_FOR_GOOD if c.value == error_code), None)
    return None if code is None else ChatError(code, _ENDED_FOR_GOOD[code], ref, retryable=False)


def answer_failed(ref: str | None = None) -> ChatError:
    """An answer that failed otherwise than at the AI provider (its context could not be read): asking again
    can help."""
    return ChatError(ErrorCode.INTERNAL, "the tutor could not answer; please try again", ref, retryable=True)


def restarting(message: str, ref: str | None = None) -> ChatError:
    """This replica is shutting down: the same request succeeds on another in a moment."""
    return ChatError(ErrorCode.AI_UNAVAILABLE, message, ref, retry_after=1.0, retryable=True)


def busy(message: str) -> ChatError:
    """The server could not get to this request in time (its database is saturated): try again later,
    spread out (each client is told a different `retry_after`)."""
    return ChatError(ErrorCode.BUSY, message, retry_after=random.uniform(1.0, 3.0))


def bad_request(message: str, ref: str | None = None) -> ChatError:
    return ChatError(ErrorCode.BAD_REQUEST, message, ref)


def not_found(what: str, ref: str | None = None) -> ChatError:
    return ChatError(ErrorCode.NOT_FOUND, f"{what} not found", ref)


def forbidden(message: str, ref: str | None = None) -> ChatError:
    return ChatError(ErrorCode.FORBIDDEN, message, ref)


def account_deleted() -> ChatError:
    """The user was erased (`smartedu delete-user`) after their token was issued: 403, and at hello the socket
    is closed with 4403 and this reason, as the sockets open at the erasure were."""
    return ChatError(ErrorCode.FORBIDDEN, ACCOUNT_DELETED)


def unauthorized(message: str) -> ChatError:
    return ChatError(ErrorCode.UNAUTHORIZED, message)


def from_storage(error: StorageError, ref: str | None = None) -> ChatError:
    """What the client is told about a request the data cannot satisfy. Callers check first, so this is
    for the races they cannot see (a conversation deleted between the check and the write)."""
    if isinstance(error, ClientIdTakenError):
        return bad_request(str(error), ref)
    if isinstance(error, LimitReachedError):
        return ChatError(ErrorCode.TOO_LARGE, str(error), ref)
    if isinstance(error, DuplicateNameError):
        return ChatError(ErrorCode.CONFLICT, str(error), ref, document_id=error.document_id)
    if isinstance(error, UserErasedError):
        return account_deleted()
    return not_found(str(error), ref)


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the environment variable."""
