"""Frame parsing is strict; encoding is what the protocol documents."""

from __future__ import annotations

import orjson
import pytest

from server.errors import ChatError, ErrorCode
from server.protocol import Cancel, Hello, HistoryRequest, Ping, SendMessage, error_frame, parse_client_frame
from storage.redis_store import splice_seq


def parse(frame: object, max_chars: int = 100) -> object:
    return parse_client_frame(orjson.dumps(frame).decode(), max_message_chars=max_chars)


def test_valid_frames() -> None:
    assert parse({"type": "hello", "token": "t", "course_id": "c", "resume_from": 4}) == Hello("t", None, "c", 4)
    assert parse({"type": "message", "id": "m", "text": "hi"}) == SendMessage("m", "hi", None)
    assert parse({"type": "cancel", "reply_id": 9}) == Cancel(9)
    assert parse({"type": "history"}) == HistoryRequest(None, None, 20)
    assert parse({"type": "ping"}) == Ping()


def test_message_longer_than_the_limit_is_too_large_with_ref() -> None:
    with pytest.raises(ChatError) as info:
        parse({"type": "message", "id": "m1", "text": "x" * 101})
    assert info.value.code is ErrorCode.TOO_LARGE and info.value.ref == "m1"


def test_unicode_is_counted_in_characters() -> None:
    assert parse({"type": "message", "id": "m", "text": "é" * 100}) == SendMessage("m", "é" * 100, None)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "hello", "resume_from": -1},
        {"type": "hello", "resume_from": True},
        {"type": "hello", "token": 5},
        {"type": "hello", "conversation_id": ""},
        {"type": "message", "id": "", "text": "x"},
        {"type": "cancel", "reply_id": 0},
        {"type": "history", "before": 1.5},
    ],
)
def test_invalid_fields(frame: dict[str, object]) -> None:
    with pytest.raises(ChatError) as info:
        parse(frame)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_error_frame_shape() -> None:
    error = ChatError(ErrorCode.RATE_LIMITED, "slow down", ref="m1", retry_after=12.3456)
    assert orjson.loads(error_frame(error)) == {
        "type": "error", "code": "rate_limited", "message": "slow down", "ref": "m1", "retry_after": 12.346
    }
    assert error.http_status == 429


def test_seq_splice_matches_json() -> None:
    frame = orjson.dumps({"type": "token", "text": 'a "quoted" }'})
    assert orjson.loads(splice_seq(frame, 42)) == {"type": "token", "text": 'a "quoted" }', "seq": 42}
