"""The offline tutor is deterministic; the token batcher keeps order and coalesces under load."""

from __future__ import annotations

import asyncio

import pytest

from ai.base import AIRequest, CourseContext, Turn, Usage
from ai.offline import OfflineProvider, compose_reply
from server.turns import TokenBatcher


async def collect(provider: OfflineProvider, request: AIRequest) -> tuple[str, Usage]:
    text, usage = "", None
    async for item in provider.stream(request):
        if isinstance(item, Usage):
            usage = item
        else:
            text += item
    assert usage is not None
    return text, usage


async def test_offline_reply_is_deterministic_and_grounded() -> None:
    request = AIRequest(
        question="What is a slope?",
        course=CourseContext("alg", "Algebra I", "Lines and their graphs."),
        history=(Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "ok")),
    )
    provider = OfflineProvider(ttft_ms=0, tokens_per_s=0)
    first, usage = await collect(provider, request)
    second, _ = await collect(provider, request)
    assert first == second == compose_reply(request)
    assert "Offline tutor mode" in first and "What is a slope?" in first and "Algebra I" in first
    assert usage.output_tokens == len(first.split()) and usage.prompt_tokens > 0


def test_offline_reply_refers_to_the_previous_question_truthfully() -> None:
    # Three earlier questions: the reply used to call this one "question 3" (it is the fourth), and with
    # the history cut to its last messages the count could not be right anyway.
    history = tuple(
        turn
        for question in ("What is x?", "And y?", "Why   is\nthe sky blue?")
        for turn in (Turn("user", question), Turn("assistant", "Let's see."))
    )
    reply = compose_reply(AIRequest(question="And z?", history=history))
    assert "question 3" not in reply
    assert "Earlier you asked: \u201cWhy is the sky blue?\u201d" in reply
    assert "Earlier you asked" not in compose_reply(AIRequest(question="First one"))


async def test_offline_pacing_and_exact_length() -> None:
    provider = OfflineProvider(ttft_ms=50, tokens_per_s=200, reply_words=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    text, usage = await collect(provider, AIRequest(question="q"))
    elapsed = loop.time() - started
    assert usage.output_tokens == 10 and len(text.split()) == 10
    assert elapsed >= 0.05 + 9 / 200 * 0.9


async def test_offline_answers_stop_at_the_output_limit_and_say_so() -> None:
    question = AIRequest(question="q")
    text, usage = await collect(OfflineProvider(ttft_ms=0, tokens_per_s=0, max_output_tokens=5), question)
    assert len(text.split()) == 5 and usage == Usage(usage.prompt_tokens, 5, "max_tokens", truncated=True)
    whole, usage = await collect(OfflineProvider(ttft_ms=0, tokens_per_s=0, max_output_tokens=500), question)
    assert whole.startswith(text) and not usage.truncated and usage.finish_reason == "stop"


async def test_batcher_keeps_order_and_offsets_and_coalesces() -> None:
    sent: list[tuple[str, int]] = []

    async def emit(text: str, offset: int) -> None:
        await asyncio.sleep(0.01)
        sent.append((text, offset))

    batcher = TokenBatcher(emit)
    batcher.push("a ")
    await asyncio.sleep(0)  # the first frame is now in flight
    for word in ["b ", "c ", "d ", "e "]:
        batcher.push(word)
    await batcher.flush()
    assert "".join(t for t, _ in sent) == "a b c d e "
    assert [o for _, o in sent] == [0, 2]  # the first chunk alone, the rest in one frame
    assert batcher.offset == 10


async def test_batcher_reports_emit_failures() -> None:
    async def emit(text: str, offset: int) -> None:
        raise ConnectionError("redis went away")

    batcher = TokenBatcher(emit)
    batcher.push("x")
    try:
        await batcher.flush()
    except ConnectionError as exc:
        assert "redis" in str(exc)
    else:
        raise AssertionError("flush should re-raise the emit failure")


async def test_after_an_emit_failure_nothing_more_is_emitted() -> None:
    # Frames after a lost one would leave a hole in the client's text (Redis restarted mid-answer): the
    # answer stops there instead, and `push` tells the stream, which ends the turn as failed.
    sent: list[tuple[str, int]] = []

    async def emit(text: str, offset: int) -> None:
        if len(sent) == 1:
            sent.append(("lost", offset))
            raise ConnectionError("redis went away")
        sent.append((text, offset))

    batcher = TokenBatcher(emit, min_interval=0.0)
    batcher.push("one ")
    await asyncio.sleep(0.01)
    batcher.push("two ")
    await asyncio.sleep(0.01)
    with pytest.raises(ConnectionError):
        batcher.push("three ")
    with pytest.raises(ConnectionError):
        await batcher.flush()
    assert sent == [("one ", 0), ("lost", 4)]
