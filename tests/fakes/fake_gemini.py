"""A fake Gemini API: `POST /{version}/models/{model}:streamGenerateContent?alt=sse` answered with SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import FakeUpstream, RecordedRequest, serve, sse

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


# Two HTTP 400 bodies as the Gemini API sends them: a refused API key (google.rpc.ErrorInfo in the
# details), and a request longer than the model's context (no details).
API_KEY_INVALID: dict[str, Any] = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": "API key not valid. Please pass a valid API key.",
            },
        ],
    }
}
CONTEXT_TOO_LONG: dict[str, Any] = {
    "error": {
        "code": 400,
        "message": "The input token count (1048600) exceeds the maximum number of tokens allowed (1048576).",
        "status": "INVALID_ARGUMENT",
    }
}


@dataclass
class FakeGemini(FakeUpstream):
    """Streams `chunks` as candidates with running `usageMetadata`; scripted per test."""

    finish_reason: str = "STOP"  # "SAFETY" ends the stream with a safety block
    block_reason: str | None = None  # e.g. "SAFETY": the prompt is blocked, no candidates at all
    model_version: str = "gemini-2.5-flash"
    thoughts_tokens: int = 0  # a thinking model's hidden reasoning, billed as output
    send_finish: bool = True  # False: end the body after the last text chunk, without a finishReason
    # Frame events as proxies may: `: keep-alive` comments, `event:` fields, `data:` without its space; each
    # event is written in two pieces, cut inside its first multi-byte character.
    proxy_framing: bool = False
    # Odd but valid chunks: each text part between a thought part (to be hidden) and a functionCall part,
    # and before each of those chunks one without candidates and one with only usage.
    odd_shapes: bool = False

    @property
    def last_body(self) -> dict[str, Any]:
        return self.requests[-1].body

    def error_body(self, status: int) -> dict[str, Any]:
        name = _STATUS_NAMES.get(status, "UNKNOWN")
        return {"error": {"code": status, "message": f"scripted failure {status}", "status": name}}

    def usage(self, output_tokens: int) -> dict[str, int]:
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": self.prompt_tokens + self.thoughts_tokens + output_tokens,
        }
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return usage

    def events(self, request: RecordedRequest) -> list[bytes]:
        events = self.gemini_events()
        if not self.proxy_framing:
            return events
        framed = [b": keep-alive\r\n\r\n"]
        for event in events:
            event = b"event: message\r\n" + event.replace(b"data: ", b"data:", 1)
            cut = next((i + 1 for i, byte in enumerate(event) if byte >= 0xC0), len(event) // 2)
            framed += [event[:cut], event[cut:], b":\n\n"]
        return framed

    def gemini_events(self) -> list[bytes]:
        if self.block_reason is not None:
            feedback = {"blockReason": self.block_reason, "safetyRatings": []}
            return [sse({"promptFeedback": feedback, "usageMetadata": self.usage(0)})]
        events = []
        for index, text in enumerate(self.chunks):
            parts: list[dict[str, Any]] = [{"text": text}]
            if self.odd_shapes:
                thought = {"text": "[a thought: never shown]", "thought": True}
                parts = [thought, *parts, {"functionCall": {"name": "lookup", "args": {"q": text}}}]
                events += [sse({"candidates": []}), sse({"usageMetadata": self.usage(index)})]
            candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
            chunk = {"candidates": [candidate], "usageMetadata": self.usage(index + 1)}
            events.append(sse({**chunk, "modelVersion": self.model_version}))
        if not self.send_finish:
            return events
        final: dict[str, Any] = {"finishReason": self.finish_reason, "index": 0}
        if self.finish_reason == "SAFETY":
            final["content"] = {"role": "model", "parts": [{"text": "[this text must never be shown]"}]}
            final["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
        usage = self.usage(len(self.chunks))
        events.append(sse({"candidates": [final], "usageMetadata": usage, "modelVersion": self.model_version}))
        return events


@asynccontextmanager
async def start_fake_gemini(**script: Any) -> AsyncIterator[FakeGemini]:
    """Start a fake Gemini on 127.0.0.1:0; pass its `base_url` as GEMINI_BASE_URL."""
    fake = FakeGemini(**script)

    async def stream_generate(request: web.Request) -> web.StreamResponse:
        target = request.match_info["target"]
        if not target.endswith(":streamGenerateContent") or request.query.get("alt") != "sse":
            raise web.HTTPNotFound(text=f"the fake only streams, got {target}")
        return await fake.handle(request)

    async with serve(fake, [web.post("/{version}/models/{target}", stream_generate)]) as running:
        yield running
