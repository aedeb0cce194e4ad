"""The OpenAI-compatible provider: streaming chat completions over aiohttp (vLLM, Ollama, llama.cpp, OpenAI)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from .base import AIError, AIRequest, StreamItem, Usage, estimate_tokens
from .prompt import conversation_turns
from .resilience import (
    PAGE_TYPES,
    ConnectTimeoutConnector,
    http_status_error,
    invalid_request,
    map_transport_error,
    not_an_event_stream,
    parse_retry_after,
    unfinished_answer_error,
)

log = logging.getLogger("smartedu.ai.openai")

_BLOCKING_FINISH = frozenset({"content_filter"})
# The output limit's end (OpenAI's `length`; Mistral's `model_length`, the model's context filled up): the text
# is kept as a cut answer.
_CUT = frozenset({"length", "model_length"})
# An answer's own end (OpenAI's `stop`, and the names other servers give it) or a cut one.
_FINISHED = frozenset({"stop", "eos", "eos_token", "stop_sequence"}) | _CUT
# Finish reasons after some text that mean the text is not the whole answer: `tool_calls` or `function_call`
# from a model given no tools, vLLM's `abort`, Mistral's `error`. A reason in none of these sets, after text
# that came as usual, is a server's own name for the answer's end (`end_turn` from a proxy, a newer reason):
# the answer is complete, and the reason logged and counted.
_UNFINISHED = frozenset({"tool_calls", "function_call", "abort", "error"})
_ERROR_BODY_LIMIT = 4096
# A 200 that is no answer (text/event-stream is expected; a missing type is let through): a page, or one
# JSON completion from a server that ignores `stream: true`.
_NOT_EVENT_STREAMS = PAGE_TYPES | {"application/json"}


def build_messages(request: AIRequest) -> list[dict[str, str]]:
    """System instruction, then history (teachers labelled, same roles merged), then the question."""
    messages: list[dict[str, str]] = []
    if request.system_instruction:
        messages.append({"role": "system", "content": request.system_instruction})
    for role, text in conversation_turns(request):
        # Many chat templates (Llama, Mistral) insist on alternating user/assistant turns.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


class SSEDecoder:
    """Turns lines of a text/event-stream into the data of each event (multi-line data joined by newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, raw: bytes) -> str | None:
        """Take one line; return an event's data when the line ends that event."""
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # a comment or keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event at the end of the stream, if any."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class _Thoughts:
    """Reasoning models served without a reasoning parser (DeepSeek-R1, QwQ or Qwen3 on vLLM, llama.cpp or an
    older Ollama) open the content itself with `<think>...</think>`: that part is held back, never shown."""

    def __init__(self) -> None:
        self._state: Literal["start", "thinking", "answer"] = "start"
        self._held = ""
        self._strip = False  # the answer after the thoughts: its leading blank lines go too

    def feed(self, text: str) -> str:
        """The part of this delta that is answer (the tags may be split between deltas)."""
        if self._state == "answer":
            if self._strip:
                text = text.lstrip()
                self._strip = not text
            return text
        self._held += text
        if self._state == "start":
            head = self._held.lstrip()
            if _THINK_OPEN.startswith(head):  # only blanks so far, or the tag's first characters
                return ""
            if not head.startswith(_THINK_OPEN):
                self._state = "answer"
                return self.flush()
            self._state, self._held = "thinking", head[len(_THINK_OPEN) :]
        end = self._held.find(_THINK_CLOSE)
        if end < 0:
            self._held = self._held[-len(_THINK_CLOSE) :]  # enough to find a closing tag cut in two
            return ""
        self._state, self._strip = "answer", True
        rest, self._held = self._held[end + len(_THINK_CLOSE) :], ""
        return self.feed(rest)

    def flush(self) -> str:
        """What is held back when no more text comes: text that only began like the tag; never thoughts."""
        held, self._held = ("" if self._state == "thinking" else self._held), ""
        return held


@dataclass(slots=True)
class _Progress:
    """What one stream has told us so far."""

    done: bool = False
    finish: str | None = None
    usage: dict[str, Any] | None = None
    output_chars: int = 0  # of the content, thoughts included: they are billed as output
    thoughts: _Thoughts = field(default_factory=_Thoughts)


def _error_object(detail: str) -> dict[str, Any]:
    """The `error` object of an error response's body (OpenAI's, or a look-alike's), else {}."""
    try:
        body = orjson.loads(detail)
    except orjson.JSONDecodeError:
        return {}
    # vLLM and some others put `message` and `code` at the top level instead.
    error = body.get("error", body) if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


# Parameters every request carries from the deployment's settings: a 400 naming one is the deployment's fault.
_SETTINGS_PARAMS = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "stream_options"})


def _bad_request(error: dict[str, Any]) -> AIError:
    """A 400: Azure's content filter (a safety block), a refused setting (the deployment's fault), or a
    problem of this request alone (e.g. context_length_exceeded)."""
    code = error["code"] if isinstance(error.get("code"), str) else ""  # vLLM's is the HTTP status
    param = str(error.get("param") or "")
    if code == "content_filter":
        return AIError("prompt_filtered", "openai: the prompt was refused by a content filter", cause="refused")
    message = f"openai answered HTTP 400 {code}".strip()
    if isinstance(error.get("message"), str):
        message = f"{message}: {error['message'][:200]}"
    if param in _SETTINGS_PARAMS or code.startswith("unsupported_") or code in ("model_not_found", "invalid_api_key"):
        return AIError("bad_request", message, cause="config")
    return invalid_request(message)


# String codes and types of an error event that say what an HTTP status would have said.
_RATE_LIMITED = frozenset({"rate_limit_exceeded", "rate_limit_error", "insufficient_quota"})
_THIS_REQUEST = frozenset({"context_length_exceeded", "invalid_request_error"})


def _stream_error(error: object) -> AIError:
    """An error event in the stream (vLLM and others report failures mid-generation so). A number in `code`
    is an HTTP status; a string `code` or `type` is OpenAI's: a refused request (a context too long) is this
    request's problem and a rate limit is one, not an outage to retry as a 500."""
    fields = error if isinstance(error, dict) else {}
    code = fields.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return http_status_error(code, f"openai: error event in stream ({code})")
    names = {value for value in (code, fields.get("type")) if isinstance(value, str)}
    if names & _RATE_LIMITED:
        return http_status_error(429, f"openai: error event in stream ({'/'.join(sorted(names))})")
    if names & _THIS_REQUEST:
        return _bad_request(fields if isinstance(code, str) else {**fields, "code": ""})
    return http_status_error(500, f"openai: error event in stream ({'/'.join(sorted(names)) or 500})")


def _wants_max_completion_tokens(status: int, detail: str) -> bool:
    """OpenAI's reasoning models refuse `max_tokens` and ask for `max_completion_tokens` instead."""
    error = _error_object(detail) if status == 400 else {}
    return error.get("param") == "max_tokens" and "max_completion_tokens" in str(error.get("message", ""))


async def _read_detail(response: aiohttp.ClientResponse) -> str:
    """The start of an error response's body (for its classification and the debug log)."""
    try:
        return (await response.content.read(_ERROR_BODY_LIMIT)).decode("utf-8", "replace")
    except aiohttp.ClientError:
        return ""


class OpenAICompatProvider:
    """Streams `POST {base_url}/chat/completions` answers; usage from the final chunk, else estimated."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        connect_timeout: float | None = 10.0,
        request_timeout: float | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_tokens = max_tokens
        # What the output limit is sent as: `max_tokens`, until the server asks for `max_completion_tokens`.
        self.limit_param = "max_tokens"
        self.temperature = temperature
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Told each finish reason after text that none of the sets above knows (the server counts them).
        self.on_unknown_finish: Callable[[str], None] | None = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        # Built on first use, inside the running loop: an aiohttp session belongs to one loop.
        if self._closed:
            raise AIError("closed", "openai-compatible provider is closed")
        if self._session is None:
            headers = {"Accept": "text/event-stream"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._session = aiohttp.ClientSession(
                connector=ConnectTimeoutConnector(self.connect_timeout, limit=0),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout),
                trust_env=True,
            )
        return self._session

    def payload(self, request: AIRequest) -> dict[str, Any]:
        """The chat-completions request body."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": build_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            body[self.limit_param] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    async def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        """Yield content deltas as they arrive, then one Usage (blocked=True on a content filter)."""
        session = self._ensure_session()
        response: aiohttp.ClientResponse | None = None
        progress = _Progress()
        started = time.monotonic()
        try:
            try:
                response = await self._post(session, request)
                if response.status != 200:
                    detail = await _read_detail(response)
                    if self.limit_param == "max_tokens" and _wants_max_completion_tokens(response.status, detail):
                        # Once per provider: every later request is sent the way this server wants.
                        self.limit_param = "max_completion_tokens"
                        log.warning("ai_limit_param_switched", extra={"provider": self.name, "model": self.model,
                                                                      "param": self.limit_param})
                        response.release()
                        response = await self._post(session, request)
                        detail = await _read_detail(response) if response.status != 200 else ""
                if response.status != 200:
                    error = self._status_error(response, detail)
                    if error.kind != "prompt_filtered":
                        raise error
                    progress.finish, progress.done = "content_filter", True  # told as a safety block
                elif response.content_type in _NOT_EVENT_STREAMS:
                    raise await self._not_an_event_stream(response)
                decoder = SSEDecoder()
                shown = False
                while not progress.done:
                    line = await response.content.readline()
                    data = decoder.feed(line) if line else decoder.flush()
                    if data is not None:
                        text = self._absorb(data, progress, at_end=not line)
                        if text:
                            shown = True
                            yield text
                    if not line and not progress.done:
                        if progress.finish is None:
                            raise AIError("connection", "openai: stream ended before the answer did", retryable=True)
                        progress.done = True  # a server that ends the body after the last choice, without [DONE]
                if tail := progress.thoughts.flush():
                    shown = True
                    yield tail
                finish = None if progress.finish is None else str(progress.finish)
                if shown and finish in _UNFINISHED:
                    # Text was shown, but the model did not finish it (an answer without any is an empty one).
                    raise unfinished_answer_error(self.name, finish, self._usage(request, progress))
                if shown and finish is not None and finish not in _FINISHED | _BLOCKING_FINISH | _UNFINISHED:
                    self._unknown_finish(request, finish)
            except AIError:
                raise
            except Exception as error:
                raise map_transport_error(error, self.name) from error
        except AIError as error:
            log.warning(
                "ai_upstream_error",
                extra={"provider": self.name, "model": self.model, "kind": error.kind,
                       "request_id": request.request_id, "error": str(error)},
            )
            raise
        finally:
            if response is not None:
                # close() drops an unfinished stream's connection so the server stops generating.
                if progress.done:
                    response.release()
                else:
                    response.close()
        log.debug(
            "ai_stream_done",
            extra={"provider": self.name, "model": self.model, "request_id": request.request_id,
                   "finish_reason": progress.finish, "elapsed_ms": round((time.monotonic() - started) * 1000)},
        )
        yield self._usage(request, progress)

    def _unknown_finish(self, request: AIRequest, finish: str) -> None:
        log.warning(
            "ai_unknown_finish_reason",
            extra={"provider": self.name, "model": self.model, "request_id": request.request_id,
                   "finish_reason": finish[:64]},
        )
        if self.on_unknown_finish is not None:
            try:
                self.on_unknown_finish(finish)
            except Exception:  # a metrics hook that fails must not fail the answer
                log.exception("ai_callback_failed", extra={"callback": "on_unknown_finish"})

    def _absorb(self, data: str, progress: _Progress, *, at_end: bool = False) -> str:
        """Take one event's data: note usage and finish reason, return the answer text it carries."""
        if data.strip() == "[DONE]":
            progress.done = True
            return ""
        chunk = self._parse(data, at_end)
        if isinstance(chunk.get("usage"), dict):
            progress.usage = chunk["usage"]
        texts: list[str] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            reason = choice.get("finish_reason")
            if reason and not isinstance(reason, str):  # malformed: kept as its JSON, an unknown reason
                reason = orjson.dumps(reason).decode()
            progress.finish = reason or progress.finish
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and progress.finish not in _BLOCKING_FINISH:
                texts.append(text)
        text = "".join(texts)
        progress.output_chars += len(text)
        return progress.thoughts.feed(text)

    def _parse(self, data: str, at_end: bool = False) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            if at_end:  # the body ended halfway through an event: a broken stream, not a garbled one
                raise AIError("connection", "openai: stream ended in the middle of an event", retryable=True) from None
            raise AIError("bad_response", "openai: unreadable stream event") from None
        if not isinstance(chunk, dict):
            raise AIError("bad_response", "openai: unexpected stream event")
        error = chunk.get("error")
        if error is not None:
            raise _stream_error(error)
        return chunk

    async def _post(self, session: aiohttp.ClientSession, request: AIRequest) -> aiohttp.ClientResponse:
        body = orjson.dumps(self.payload(request))
        return await session.post(
            f"{self.base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )

    async def _not_an_event_stream(self, response: aiohttp.ClientResponse) -> AIError:
        detail = await _read_detail(response)
        log.debug("ai_upstream_status", extra={"provider": self.name, "status": response.status, "body": detail})
        return not_an_event_stream(self.name, response.content_type)

    def _status_error(self, response: aiohttp.ClientResponse, detail: str) -> AIError:
        log.debug("ai_upstream_status", extra={"provider": self.name, "status": response.status, "body": detail})
        if response.status == 400:
            return _bad_request(_error_object(detail))
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return http_status_error(response.status, f"openai answered HTTP {response.status}", retry_after)

    def _usage(self, request: AIRequest, progress: _Progress) -> Usage:
        usage = progress.usage or {}
        prompt = usage.get("prompt_tokens")
        output = usage.get("completion_tokens")
        if not isinstance(prompt, int):
            prompt = sum(estimate_tokens(m["content"]) for m in build_messages(request))
        if not isinstance(output, int):
            output = (progress.output_chars + 3) // 4
        if progress.finish in _BLOCKING_FINISH:
            return Usage(prompt, output, finish_reason="SAFETY", blocked=True)
        reason = "stop" if progress.finish in (None, "stop") else str(progress.finish)
        return Usage(prompt, output, finish_reason=reason, truncated=progress.finish in _CUT)

    async def close(self) -> None:
        """Close the aiohttp session."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
