"""Protocol v1 frames: strict parsing of client frames and cheap encoding of server frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import ChatError, ErrorCode, bad_request

MAX_CLIENT_ID = 64


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None
    conversation_id: str | None
    course_id: str | None
    resume_from: int | None
    new_conversation: bool = False


@dataclass(frozen=True, slots=True)
class SendMessage:
    id: str
    text: str
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Cancel:
    reply_id: int


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    conversation_id: str | None
    before: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Regenerate:
    reply_id: int


@dataclass(frozen=True, slots=True)
class Watch:
    course_id: str
    watch: bool = True


@dataclass(frozen=True, slots=True)
class Intervene:
    conversation_id: str
    text: str
    id: str | None


@dataclass(frozen=True, slots=True)
class SetAI:
    conversation_id: str
    paused: bool


ClientFrame = Hello | SendMessage | Cancel | HistoryRequest | Ping | Regenerate | Watch | Intervene | SetAI


def _required_str(obj: dict[str, Any], name: str, max_len: int = 200) -> str:
    value = _optional_str(obj, name, max_len)
    if value is None:
        raise bad_request(f"'{name}' is required")
    return value


def _optional_str(obj: dict[str, Any], name: str, max_len: int = 200) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise bad_request(f"'{name}' must be a non-empty string of at most {max_len} characters")
    return value


def _optional_int(obj: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python; true/false are not ids.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value > 2**62:
        raise bad_request(f"'{name}' must be an integer >= {minimum}")
    return value


def _optional_bool(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false")
    return value


def parse_client_frame(data: str, *, max_message_chars: int, history_page_max: int = 100) -> ClientFrame:
    """Decode and validate one text frame; raise ChatError(bad_request | too_large) on anything else."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise bad_request("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise bad_request("frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise bad_request("frame needs a string 'type'")
    ref = obj.get("id") if isinstance(obj.get("id"), str) else None
    # PostgreSQL cannot store NUL in text; only the escape can put one in a string (JSON has no raw NUL).
    if "\\u0000" in data and _has_nul(obj):
        raise bad_request("text and ids must not contain NUL (\\u0000)", ref)
    if kind == "message":
        client_id = obj.get("id")
        if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID:
            raise bad_request(f"'id' must be a non-empty string of at most {MAX_CLIENT_ID} characters")
        text = obj.get("text")
        if not isinstance(text, str):
            raise bad_request("'text' must be a string", ref)
        if len(text) > max_message_chars:
            raise ChatError(ErrorCode.TOO_LARGE, f"message longer than {max_message_chars} characters", ref)
        if not text.strip():
            raise bad_request("'text' must not be empty", ref)
        try:
            conversation_id = _optional_str(obj, "conversation_id", 64)
        except ChatError as exc:
            exc.ref = ref
            raise
        return SendMessage(client_id, text, conversation_id)
    if kind == "hello":
        token = obj.get("token")
        if token is not None and not isinstance(token, str):
            raise bad_request("'token' must be a string")
        hello = Hello(
            token=token,
            conversation_id=_optional_str(obj, "conversation_id", 64),
            course_id=_optional_str(obj, "course_id", 200),
            resume_from=_optional_int(obj, "resume_from"),
            new_conversation=_optional_bool(obj, "new_conversation"),
        )
        if hello.new_conversation and (hello.conversation_id is not None or hello.resume_from is not None):
            raise bad_request("'new_conversation' cannot be combined with 'conversation_id' or 'resume_from'")
        return hello
    if kind == "cancel":
        reply_id = _optional_int(obj, "reply_id", 1)
        if reply_id is None:
            raise bad_request("'reply_id' is required")
        return Cancel(reply_id)
    if kind == "history":
        limit = _optional_int(obj, "limit", 1)
        if limit is not None and limit > history_page_max:
            raise bad_request(f"'limit' must be at most {history_page_max}")
        return HistoryRequest(
            conversation_id=_optional_str(obj, "conversation_id", 64),
            before=_optional_int(obj, "before", 1),
            limit=limit or 20,
        )
    if kind == "ping":
        return Ping()
    if kind == "regenerate":
        reply_id = _optional_int(obj, "reply_id", 1)
        if reply_id is None:
            raise bad_request("'reply_id' is required")
        return Regenerate(reply_id)
    if kind in ("watch", "unwatch"):
        return Watch(_required_str(obj, "course_id"), kind == "watch")
    if kind == "intervene":
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("'text' must be a non-empty string", ref)
        if len(text) > max_message_chars:
            raise ChatError(ErrorCode.TOO_LARGE, f"message longer than {max_message_chars} characters", ref)
        client_id = _optional_str(obj, "id", MAX_CLIENT_ID)
        return Intervene(_required_str(obj, "conversation_id", 64), text, client_id)
    if kind == "ai":
        paused = obj.get("paused")
        if not isinstance(paused, bool):
            raise bad_request("'paused' must be true or false")
        return SetAI(_required_str(obj, "conversation_id", 64), paused)
    raise bad_request(f"unknown frame type {kind[:40]!r}")


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def ref_of(frame: ClientFrame | None) -> str | None:
    """What an error about this frame names: the client id of a message (or a teacher's message), the
    reply of a cancel or regenerate, the conversation of a teacher's action, the course of a watch."""
    if isinstance(frame, SendMessage):
        return frame.id
    if isinstance(frame, Cancel | Regenerate):
        return str(frame.reply_id)
    if isinstance(frame, Intervene):
        return frame.id or frame.conversation_id
    if isinstance(frame, SetAI):
        return frame.conversation_id
    if isinstance(frame, Watch):
        return frame.course_id
    return None


def encode(frame: dict[str, Any]) -> bytes:
    """One server frame as JSON bytes."""
    return orjson.dumps(frame)


def error_frame(error: ChatError, log_ref: str | None = None) -> bytes:
    """An `error` frame; `log_ref` names an unexpected failure in the server's logs."""
    body: dict[str, object] = {"type": "error", **error.to_dict()}
    if log_ref is not None:
        body["log_ref"] = log_ref
    return orjson.dumps(body)


PONG = orjson.dumps({"type": "pong"})
