"""OpenAICompatProvider against the local fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
import pytest

from ai.base import AIError, AIRequest, StreamItem, Turn, Usage
from ai.openai_compat import OpenAICompatProvider, SSEDecoder, build_messages
from ai.resilience import ResiliencePolicy, ResilientProvider
from tests.fakes import closed_port, unresponsive_port
from tests.fakes.fake_openai import FakeOpenAI, start_fake_openai

QUESTION = AIRequest(question="What is photosynthesis?", system_instruction="You are a tutor.")


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with start_fake_openai() as running:
        yield running


@pytest.fixture
async def openai(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    provider = OpenAICompatProvider(fake.base_url, "tutor-7b", api_key="sk-test", connect_timeout=1.0)
    yield provider
    await provider.close()


async def collect(stream: AsyncIterator[StreamItem], texts: list[str] | None = None) -> Usage | None:
    texts = [] if texts is None else texts
    usage = None
    async for item in stream:
        if isinstance(item, Usage):
            usage = item
        else:
            texts.append(item)
    return usage


async def test_tokens_and_usage(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.chunk_delay = 0.05
    texts: list[str] = []
    first_before_end: list[bool] = []
    usage = None
    async for item in openai.stream(QUESTION):
        if isinstance(item, Usage):
            usage = item
        else:
            texts.append(item)
            first_before_end.append(fake.completed == 0)
    assert texts == fake.chunks and first_before_end[0]
    assert usage == Usage(prompt_tokens=42, output_tokens=len(fake.chunks), finish_reason="stop")


async def test_request_body_and_headers(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    request = AIRequest(
        question="Why green?",
        system_instruction="You are a tutor. Course: Biology.",
        history=(
            Turn("user", "What is chlorophyll?"),
            Turn("assistant", "A pigment."),
            Turn("teacher", "See page 12."),
        ),
    )
    await collect(openai.stream(request))
    received = fake.requests[0]
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == "Bearer sk-test"
    body = received.body
    assert body["model"] == "tutor-7b" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "You are a tutor. Course: Biology."},
        {"role": "user", "content": "What is chlorophyll?"},
        {"role": "assistant", "content": "A pigment."},
        {"role": "user", "content": "[Teacher message] See page 12.\n\n[Student message] Why green?"},
    ]


def test_messages_without_system_instruction() -> None:
    messages = build_messages(AIRequest(question="Hi", history=(Turn("user", "Hello?"), Turn("assistant", "Hello!"))))
    assert messages == [
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Hi"},
    ]


async def test_a_history_cut_after_a_question_still_alternates(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    # The core passes the conversation's last messages only; that window can open with an answer, which
    # strict chat templates (Mistral's on vLLM) refuse with HTTP 400 for every later question.
    fake.strict_roles = True
    request = AIRequest(
        question="And then?", system_instruction="You are a tutor.", history=(Turn("assistant", "Earlier answer."),)
    )
    texts: list[str] = []
    usage = await collect(openai.stream(request), texts)
    assert usage is not None and texts == fake.chunks
    messages = fake.last_body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "omitted" in messages[1]["content"]


async def test_usage_is_estimated_when_the_server_sends_none(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.send_usage = False
    usage = await collect(openai.stream(QUESTION))
    assert usage is not None and usage.prompt_tokens > 0 and usage.output_tokens > 0
    assert usage.prompt_tokens != 42


async def test_content_filter_is_a_block(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.finish_reason = "content_filter"
    usage = await collect(openai.stream(QUESTION))
    assert usage is not None and usage.blocked and usage.finish_reason == "SAFETY"


async def test_length_finish_reason_is_reported(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.finish_reason = "length"
    usage = await collect(openai.stream(QUESTION))
    assert usage is not None and usage.finish_reason == "length" and not usage.blocked


@pytest.mark.parametrize(
    ("status", "kind", "retryable", "retry_after"),
    [(429, "rate_limited", True, 3.0), (500, "unavailable", True, None), (503, "unavailable", True, None),
     (401, "auth", False, None), (400, "invalid_request", False, None), (404, "not_found", False, None)],
)
async def test_http_errors(
    fake: FakeOpenAI, openai: OpenAICompatProvider, status: int, kind: str, retryable: bool, retry_after: float | None
) -> None:
    fake.fail_next(status, retry_after="3" if retry_after else None)
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION))
    assert (caught.value.kind, caught.value.retryable, caught.value.retry_after) == (kind, retryable, retry_after)


async def test_error_event_mid_stream(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.error_event_after = 2
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks[:2]
    assert caught.value.kind == "unavailable" and caught.value.retryable


@pytest.mark.parametrize(
    ("error", "kind", "retryable"),
    [
        (
            {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"},
            "invalid_request",
            False,
        ),
        ({"message": "slow down", "type": "rate_limit_error", "code": None}, "rate_limited", True),
        ({"message": "slow down", "code": "rate_limit_exceeded"}, "rate_limited", True),
        ({"message": "The server had an error", "type": "server_error", "code": None}, "unavailable", True),
        ({"message": "overloaded", "code": 503}, "unavailable", True),
        ("a plain string", "unavailable", True),
    ],
    ids=["context-too-long", "rate-limit-type", "rate-limit-code", "server-error", "numeric", "string"],
)
async def test_an_error_event_is_classified_by_its_code_or_type(
    fake: FakeOpenAI, openai: OpenAICompatProvider, error: Any, kind: str, retryable: bool
) -> None:
    """A string code or type in an error event says what the HTTP status would have: a context too long is this
    request's problem (ai_rejected, not retried), not an outage."""
    fake.error_event_after = 1
    fake.error_event = error
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION))
    assert (caught.value.kind, caught.value.retryable) == (kind, retryable)
    if kind == "invalid_request":
        assert caught.value.cause == "request"


async def test_dropped_connection_mid_stream(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.drop_after = 1
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks[:1]
    assert caught.value.kind == "connection" and caught.value.retryable


async def test_a_body_ending_after_the_finish_without_done_is_complete(
    fake: FakeOpenAI, openai: OpenAICompatProvider
) -> None:
    fake.send_done = False
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks and usage is not None and usage.prompt_tokens == 42


# The body ends cleanly after two events, or halfway through the third.
@pytest.mark.parametrize("cut", ["end_cleanly_after", "end_mid_event_after"])
async def test_a_body_ending_before_the_finish_is_a_broken_stream(
    fake: FakeOpenAI, openai: OpenAICompatProvider, cut: str
) -> None:
    setattr(fake, cut, 2)
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks[:2]
    assert caught.value.kind == "connection" and caught.value.retryable


@pytest.mark.parametrize(
    "page",
    [
        ("text/html", "<html>\n<body>Please sign in to continue</body>\n</html>\n"),
        # A server that ignores `stream: true` and sends the whole completion at once.
        ("application/json", '{"choices": [{"index": 0, "message": {"content": "Hi"}, "finish_reason": "stop"}]}'),
    ],
)
async def test_a_200_that_is_not_an_event_stream_is_a_configuration_failure_not_retried(
    fake: FakeOpenAI, openai: OpenAICompatProvider, page: tuple[str, str]
) -> None:
    fake.page = page
    provider = ResilientProvider(openai, ResiliencePolicy(max_retries=2, backoff_initial=0.01, backoff_max=0.02))
    with pytest.raises(AIError) as caught:
        await collect(provider.stream(QUESTION))
    assert caught.value.kind == "bad_response" and caught.value.cause == "config"
    assert page[0] in str(caught.value)
    assert provider.failures == 1  # counts toward the breaker
    assert fake.calls == 1, "every request gets the same page: trying again cannot help"


async def test_thoughts_and_odd_chunks_are_skipped(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.odd_shapes = True
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks and "never shown" not in "".join(texts)
    assert usage is not None and (usage.prompt_tokens, usage.finish_reason) == (42, "stop")


async def test_thoughts_inside_the_content_are_never_shown(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.thoughts, fake.send_usage = "The student wants the formula; [never shown]", False
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert "".join(texts) == "".join(fake.chunks)
    # Estimated, the output counts the thoughts too: they are billed.
    assert usage is not None and usage.output_tokens > len("".join(fake.chunks)) // 4 + 5
    # A tag later in an answer is the answer's own (a lesson on HTML, say).
    fake.thoughts, fake.chunks = None, ["Write ", "<think>", " in the page."]
    texts.clear()
    await collect(openai.stream(QUESTION), texts)
    assert "".join(texts) == "Write <think> in the page."


async def test_cancel_closes_the_upstream_connection(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.chunk_delay = 30.0
    got_first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(openai.stream(QUESTION)) as stream:
            async for _item in stream:
                got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_disconnect(within=1.0)
    assert fake.completed == 0


async def test_cancel_while_the_consumer_is_busy_closes_the_upstream(
    fake: FakeOpenAI, openai: OpenAICompatProvider
) -> None:
    fake.chunk_delay = 30.0
    got_first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(openai.stream(QUESTION)) as stream:
            async for _item in stream:
                got_first.set()
                await asyncio.sleep(60)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_disconnect(within=1.0)


async def test_refused_connection() -> None:
    provider = OpenAICompatProvider(f"http://127.0.0.1:{closed_port()}/v1", "m")
    try:
        with pytest.raises(AIError) as caught:
            await collect(provider.stream(QUESTION))
    finally:
        await provider.close()
    assert caught.value.kind == "connection" and caught.value.retryable


async def test_connect_timeout() -> None:
    with unresponsive_port() as port:
        provider = OpenAICompatProvider(f"http://127.0.0.1:{port}/v1", "m", connect_timeout=0.2)
        try:
            with pytest.raises(AIError) as caught:
                await collect(provider.stream(QUESTION))
        finally:
            await provider.close()
    assert caught.value.kind == "connect_timeout"


async def test_wrapped_provider_retries_then_streams(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.fail_next(500, times=2)
    policy = ResiliencePolicy(first_token_timeout=2.0, idle_timeout=2.0, total_timeout=5.0, backoff_initial=0.01)
    provider = ResilientProvider(openai, policy)
    texts: list[str] = []
    usage = await collect(provider.stream(QUESTION), texts)
    assert texts == fake.chunks and usage is not None
    assert fake.calls == 3 and provider.retries == 2


async def test_wrapped_provider_first_token_timeout_closes_the_hung_request(
    fake: FakeOpenAI, openai: OpenAICompatProvider
) -> None:
    await collect(openai.stream(QUESTION))  # set-up cost stays out of the timed attempt
    fake.hang_before_first_chunk = True
    policy = ResiliencePolicy(first_token_timeout=0.5, max_retries=0)
    provider = ResilientProvider(openai, policy)
    with pytest.raises(AIError) as caught:
        await collect(provider.stream(QUESTION))
    assert caught.value.kind == "first_token_timeout"
    assert await fake.wait_disconnect(within=1.0)


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [b": keep-alive\n", b"event: message\n", b"data: {\"a\":\n", b"data:1}\r\n", b"\r\n", b"data: [DONE]\n"]
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert events == ['{"a":\n1}']
    assert decoder.flush() == "[DONE]"
    assert decoder.flush() is None


async def test_the_output_limit_is_sent_and_a_cut_answer_reported_truncated(fake: FakeOpenAI) -> None:
    from ai.factory import create_provider
    from server.settings import Settings

    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_MODEL": "tutor-7b"}
    provider = create_provider(Settings(ai_provider="openai", max_output_tokens=77, ai_thinking_budget=500), env)
    try:
        fake.finish_reason = "length"
        texts: list[str] = []
        usage = await collect(provider.stream(QUESTION), texts)
    finally:
        await provider.close()
    assert fake.last_body["max_tokens"] == 77  # the thinking budget is Gemini's alone
    assert texts == fake.chunks and usage is not None and usage.truncated and usage.finish_reason == "length"


async def test_a_prompt_refused_by_a_content_filter_is_a_block_not_a_failure(
    fake: FakeOpenAI, openai: OpenAICompatProvider
) -> None:
    fake.filter_prompt = True
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert texts == [] and usage is not None and usage.blocked and usage.finish_reason == "SAFETY"
    fake.filter_prompt = False
    # Another 400 concerns this request (e.g. over the model's context), unless it names a setting.
    too_long = {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error",
                "param": "messages", "code": "context_length_exceeded"}
    fake.fail_next(400, body={"error": too_long})
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION))
    assert (caught.value.kind, caught.value.cause) == ("invalid_request", "request")
    assert "maximum context length" in str(caught.value)
    bad_temperature = {"message": "Unsupported value: 'temperature' does not support 0.2 with this model.",
                       "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}
    fake.fail_next(400, body={"error": bad_temperature})
    with pytest.raises(AIError) as caught:
        await collect(openai.stream(QUESTION))
    assert (caught.value.kind, caught.value.cause) == ("bad_request", "config")


async def test_a_server_refusing_max_tokens_gets_max_completion_tokens_from_then_on(fake: FakeOpenAI) -> None:
    fake.reasoning_model = True
    provider = OpenAICompatProvider(fake.base_url, "o3-mini", max_tokens=300)
    try:
        texts: list[str] = []
        usage = await collect(provider.stream(QUESTION), texts)
        assert texts == fake.chunks and usage is not None
        await collect(provider.stream(QUESTION))
    finally:
        await provider.close()
    sent = [{k: v for k, v in r.body.items() if k.startswith("max_")} for r in fake.requests]
    # Refused once, sent again at once, and remembered for the next question.
    assert sent == [{"max_tokens": 300}, {"max_completion_tokens": 300}, {"max_completion_tokens": 300}]


@pytest.mark.parametrize("finish", ["tool_calls", "function_call", "abort", "error"])
async def test_an_answer_the_model_ended_early_is_an_error_after_its_text(fake: FakeOpenAI, finish: str) -> None:
    # A model given no tools that calls one, or a server that aborted the generation: the text so far is not
    # the whole answer. Through the wrapper: not retried (text was shown), no outage for the breaker.
    fake.finish_reason = finish
    provider = ResilientProvider(OpenAICompatProvider(fake.base_url, "tutor-7b"), ResiliencePolicy(breaker_failures=1))
    texts: list[str] = []
    try:
        with pytest.raises(AIError) as caught:
            await collect(provider.stream(QUESTION), texts)
    finally:
        await provider.close()
    error = caught.value
    assert texts == fake.chunks and fake.calls == 1
    assert (error.kind, error.cause, error.retryable) == ("unfinished_answer", "transient", False)
    assert error.usage == Usage(42, len(fake.chunks), finish_reason=finish)
    assert provider.breaker.state == "closed"


@pytest.mark.parametrize("finish", ["eos_token", "stop_sequence"])
async def test_other_servers_names_for_a_natural_end_are_complete(
    fake: FakeOpenAI, openai: OpenAICompatProvider, finish: str
) -> None:
    fake.finish_reason = finish
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks and usage is not None and not usage.truncated and not usage.blocked


@pytest.mark.parametrize("finish", ["end_turn", "some_future_reason"])
async def test_an_unknown_finish_reason_after_text_completes_the_answer_with_a_warning(
    fake: FakeOpenAI, openai: OpenAICompatProvider, caplog: pytest.LogCaptureFixture, finish: str
) -> None:
    """A server's own name for an end this client does not know (a proxy's `end_turn`, a newer reason): the
    text came as usual and ended, so it is the answer; the reason is logged and counted for staff."""
    fake.finish_reason = finish
    counted: list[str] = []
    openai.on_unknown_finish = counted.append
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    assert texts == fake.chunks
    assert usage == Usage(42, len(fake.chunks), finish_reason=finish)
    assert counted == [finish]
    [record] = [r for r in caplog.records if r.getMessage() == "ai_unknown_finish_reason"]
    assert (record.levelname, record.__dict__["finish_reason"]) == ("WARNING", finish)


@pytest.mark.parametrize("finish", [{"type": "end"}, ["stop"], 7])
async def test_a_finish_reason_that_is_not_a_string_is_an_unknown_one(
    fake: FakeOpenAI, openai: OpenAICompatProvider, finish: object
) -> None:
    fake.finish_reason = finish  # type: ignore[assignment]
    counted: list[str] = []
    openai.on_unknown_finish = counted.append
    texts: list[str] = []
    usage = await collect(openai.stream(QUESTION), texts)
    reason = orjson.dumps(finish).decode()
    assert texts == fake.chunks and usage == Usage(42, len(fake.chunks), finish_reason=reason)
    assert counted == [reason]


async def test_an_unknown_finish_reason_before_any_text_is_still_an_empty_answer(fake: FakeOpenAI) -> None:
    fake.finish_reason, fake.chunks = "end_turn", []
    provider = ResilientProvider(OpenAICompatProvider(fake.base_url, "tutor-7b"), ResiliencePolicy(max_retries=0))
    try:
        with pytest.raises(AIError) as caught:
            await collect(provider.stream(QUESTION))
    finally:
        await provider.close()
    assert (caught.value.kind, caught.value.retryable) == ("empty_answer", True)


async def test_mistrals_model_length_is_a_cut_answer(fake: FakeOpenAI, openai: OpenAICompatProvider) -> None:
    fake.finish_reason = "model_length"  # the model's context filled up: the answer is kept, marked cut short
    usage = await collect(openai.stream(QUESTION))
    assert usage is not None and usage.truncated and not usage.blocked and usage.finish_reason == "model_length"
