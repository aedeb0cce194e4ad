"""A fake OpenAI-compatible server: `POST /v1/chat/completions` with `stream: true`, answered with SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import FakeUpstream, RecordedRequest, serve, sse


@dataclass
class FakeOpenAI(FakeUpstream):
    """Streams `chunks` as chat.completion.chunk deltas, then usage (when asked for) and `[DONE]`."""

    finish_reason: str = "stop"  # "content_filter" ends the answer as filtered
    send_usage: bool = True  # False: behave like a server that ignores stream_options.include_usage
    error_event_after: int | None = None  # send an in-stream error event after this many chunks
    error_event: object = None  # that event's error object (default: code 500)
    send_done: bool = True  # False: end the body after the last event without `data: [DONE]`
    end_cleanly_after: int | None = None  # end the body normally after this many events (a truncated answer)
    # Odd but valid chunks: a role-only first delta, `reasoning_content` deltas (to be hidden) and chunks with
    # no choices between the text.
    odd_shapes: bool = False
    # A reasoning model served without a reasoning parser: the content opens with `<think>thoughts</think>`,
    # its tags split between deltas.
    thoughts: str | None = None
    strict_roles: bool = False  # refuse, like Mistral's chat template on vLLM, turns that do not alternate
    filter_prompt: bool = False  # refuse the prompt as Azure OpenAI's content filter does (HTTP 400)
    reasoning_model: bool = False  # refuse `max_tokens` as OpenAI's reasoning models (o1, o3, ...) do

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.reasoning_model and "max_tokens" in (await request.json()):
            await self.record(request)
            error = {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model."
                " Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
            }
            return web.json_response({"error": error}, status=400)
        if self.filter_prompt:
            await self.record(request)
            error = {"code": "content_filter", "status": 400, "message": "The response was filtered due to the "
                     "prompt triggering Azure OpenAI's content management policy."}
            return web.json_response({"error": error}, status=400)
        if self.strict_roles:
            roles = [m.get("role") for m in (await request.json()).get("messages", ())]
            turns = roles[1:] if roles[:1] == ["system"] else roles
            if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)):
                await self.record(request)
                message = "Conversation roles must alternate user/assistant/user/assistant/..."
                return web.json_response({"object": "error", "message": message, "code": 400}, status=400)
        return await super().handle(request)

    @property
    def last_body(self) -> dict[str, Any]:
        return self.requests[-1].body

    def events(self, request: RecordedRequest) -> list[bytes]:
        model = request.body.get("model", "fake-model")
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
        events = []
        chunks = self.chunks
        if self.thoughts is not None:
            chunks = ["<thi", f"nk>{self.thoughts}</th", "ink>\n\n", *chunks]
        for index, text in enumerate(chunks):
            if index == self.error_event_after:
                error = self.error_event or {"message": "scripted mid-stream failure", "code": 500}
                events.append(sse({"error": error}))
                return events
            delta = {"role": "assistant", "content": text} if index == 0 else {"content": text}
            if self.odd_shapes:
                hidden = {"role": "assistant"} if index == 0 else {"reasoning_content": "[a thought: never shown]"}
                events.append(sse({**base, "choices": [{"index": 0, "delta": hidden, "finish_reason": None}]}))
                events.append(sse({**base, "choices": []}))
                delta = {"content": text, "reasoning_content": None}
            events.append(sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        events.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]}))
        options = request.body.get("stream_options") or {}
        if self.send_usage and options.get("include_usage"):
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.chunks),
                "total_tokens": self.prompt_tokens + len(self.chunks),
            }
            events.append(sse({**base, "choices": [], "usage": usage}))
        if self.send_done:
            events.append(sse("[DONE]"))
        return events if self.end_cleanly_after is None else events[: self.end_cleanly_after]


@asynccontextmanager
async def start_fake_openai(**script: Any) -> AsyncIterator[FakeOpenAI]:
    """Start a fake OpenAI-compatible server on 127.0.0.1:0; its `base_url` ends in /v1."""
    fake = FakeOpenAI(**script)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await fake.handle(request)

    async with serve(fake, [web.post("/v1/chat/completions", chat_completions)], base_path="/v1") as running:
        yield running
