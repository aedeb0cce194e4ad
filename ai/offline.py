"""The offline tutor: a deterministic reply streamed word by word, for demos and load tests."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from .base import AIRequest, StreamItem, Usage, estimate_tokens

_WORD = re.compile(r"\S+\s*")


def compose_reply(request: AIRequest) -> str:
    """Build the offline answer from the question and the course (clearly marked as offline)."""
    question = _quoted(request.question, 200)
    course = request.course
    if course is not None:
        topic = f"**{course.title}**"
        context = course.description.strip() or "this course"
        grounding = f" In {topic} we look at it this way: {context}"
    else:
        grounding = ""
    # The history is only the conversation's last messages, so it cannot tell how many questions came before.
    previous = next((turn.text for turn in reversed(request.history) if turn.role == "user"), "")
    follow_up = f" (Earlier you asked: \u201c{_quoted(previous, 100)}\u201d.)" if previous.strip() else ""
    return (
        f"(Offline tutor mode: no AI model is connected.) You asked: \u201c{question}\u201d.{grounding}"
        " Let's work through it together. First, restate the question in your own words."
        " Next, list what you already know and what you need to find out."
        " Then try one small step and check it against an example."
        f" Tell me where you get stuck and we will take the next step from there.{follow_up}"
    )


def _quoted(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OfflineProvider:
    """Streams `compose_reply` with a configurable time to first token and token rate."""

    name = "offline"
    model = "offline-tutor"

    def __init__(
        self,
        ttft_ms: float = 300.0,
        tokens_per_s: float = 40.0,
        reply_words: int | None = None,
        max_output_tokens: int | None = None,
    ):
        self.ttft = ttft_ms / 1000.0
        self.interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.reply_words = reply_words
        self.max_output_tokens = max_output_tokens

    def split(self, text: str) -> list[str]:
        words = _WORD.findall(text)
        if self.reply_words is not None:
            # Load tests ask for answers of an exact length: repeat the reply's words as needed.
            words = [words[i % len(words)] for i in range(self.reply_words)]
            words[-1] = words[-1].rstrip() + " "
        return words

    async def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        """Yield the reply a word (a token) at a time, cut at `max_output_tokens` as a hosted model would."""
        words = self.split(compose_reply(request))
        truncated = self.max_output_tokens is not None and len(words) > self.max_output_tokens
        if truncated:
            words = words[: self.max_output_tokens]
        if self.ttft:
            await asyncio.sleep(self.ttft)
        for index, word in enumerate(words):
            if index and self.interval:
                await asyncio.sleep(self.interval)
            yield word
        prompt = estimate_tokens(request.question) + sum(estimate_tokens(t.text) for t in request.history)
        if truncated:
            yield Usage(prompt, len(words), finish_reason="max_tokens", truncated=True)
        else:
            yield Usage(prompt_tokens=prompt, output_tokens=len(words))

    async def close(self) -> None:
        return None
