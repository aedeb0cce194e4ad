"""The Gemini provider: google-genai's async streaming over an aiohttp session this module owns."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pydantic
from google import genai
from google.genai import errors, types

from .base import AIError, AIRequest, StreamItem, Usage, estimate_prompt_tokens
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

log = logging.getLogger("smartedu.ai.gemini")

DEFAULT_MODEL = "gemini-2.5-flash"

# Finish reasons that mean a filter stopped the answer: no more of its text is shown (and the answer is kept
# out of the model's later context).
BLOCKING_FINISH_REASONS = frozenset(
    {"SAFETY", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "ESCALATION",
     "MODEL_ARMOR"}
)
# The API key's account is limited or disabled for Prohibited Use Policy violations: every question ends so
# until staff act, as with a refused key.
ACCOUNT_FINISH_REASONS = frozenset({"PUP_LIMITED_DISABLED"})
# The model cannot take this request as it is (a thought signature missing from its history): asking the
# same again ends the same way, other conversations are unaffected.
REQUEST_FINISH_REASONS = frozenset({"MISSING_THOUGHT_SIGNATURE"})
# An answer's own end, or the output limit's (kept as a cut answer). Any other finish reason after some text
# (OTHER, RECITATION, MALFORMED_FUNCTION_CALL, ...) means the text is not the whole answer.
FINISHED = frozenset({"STOP"})
CUT = frozenset({"MAX_TOKENS", "CONTINUATION"})

# The responses opened by the stream currently pulling from the SDK, so that its `finally` can close them:
# google-genai keeps the aiohttp response inside async generators that closing its iterator does not finalize.
_open_responses: ContextVar[list[aiohttp.ClientResponse] | None] = ContextVar("gemini_open_responses", default=None)


async def _remember_response(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    sink = _open_responses.get()
    if sink is not None:
        sink.append(params.response)


# SSE fields other than `data` (an `event:` name, an `id:`, a `retry:` delay), and comments (`: keep-alive`).
_IGNORED_SSE_LINE = re.compile(rb"^(?::|(?:event|id|retry)(?::|\r?\n?$))")


def _sse_line(line: bytes) -> bytes:
    """A line of an SSE body as google-genai can read it: it takes only `data: ` lines and blank ones, and
    fails the whole answer on a comment or another field, which the format allows and proxies send."""
    if _IGNORED_SSE_LINE.match(line):
        return b""
    if line.startswith(b"data:") and not line.startswith(b"data: "):
        return b"data: " + line[5:]
    return line


class _SSELines:
    """A response body (aiohttp.StreamReader) that google-genai reads through `iter_any`, cut at line ends and
    given to it as `_sse_line` makes them; everything else is the body's own."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)

    async def iter_any(self) -> AsyncIterator[bytes]:
        pending = b""
        async for data in self._content.iter_any():
            buffer = pending + data
            end = buffer.rfind(b"\n") + 1
            lines, pending = buffer[:end], buffer[end:]
            if cleaned := b"".join(_sse_line(line) for line in lines.splitlines(keepends=True)):
                yield cleaned
        if pending.strip():
            # Every event ends with a blank line: this body was cut (cleanly, by a proxy) inside one.
            raise aiohttp.ClientPayloadError("the event stream ended halfway through an event")


class _SSEResponse(aiohttp.ClientResponse):
    """The responses of the provider's session: an event stream's body is read through `_SSELines`."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        response = await super().start(connection)
        if self.status == 200 and self.content_type in PAGE_TYPES:
            # The SDK would fail on the page as an unreadable answer, one student at a time; closed by aiohttp.
            raise not_an_event_stream("gemini", self.content_type)
        if self.content_type == "text/event-stream":
            self.content = cast(aiohttp.StreamReader, _SSELines(self.content))
        return response


def build_contents(request: AIRequest) -> list[types.Content]:
    """Map history and question to Gemini contents: user/model turns, teachers labelled, same roles merged."""
    contents: list[types.Content] = []
    for speaker, text in conversation_turns(request):
        role = "model" if speaker == "assistant" else "user"
        if contents and contents[-1].role == role and contents[-1].parts is not None:
            contents[-1].parts.append(types.Part(text=text))
        else:
            contents.append(types.Content(role=role, parts=[types.Part(text=text)]))
    return contents


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def _detail_items(details: Any, kind: str) -> list[dict[str, Any]]:
    """The items of type google.rpc.`kind` in an error body's `details` (as the SDK's APIError keeps it)."""
    error = details.get("error", details) if isinstance(details, dict) else None
    items = error.get("details") if isinstance(error, dict) else None
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and str(item.get("@type", "")).endswith(kind)]


def _retry_delay_from_details(details: Any) -> float | None:
    """Gemini puts a google.rpc.RetryInfo (`retryDelay: "17s"`) in the details of a 429."""
    for item in _detail_items(details, "RetryInfo"):
        match = _DURATION.match(str(item.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


# Gemini refuses a bad, expired or restricted API key with HTTP 400 INVALID_ARGUMENT, not 401/403: the
# ErrorInfo reason tells it from a 400 about one request (a conversation over the model's context).
_KEY_OR_PERMISSION = re.compile(r"API_KEY|ACCESS_TOKEN|PERMISSION|SERVICE_DISABLED|BILLING|CONSUMER")
# A 400 about what the deployment's settings put in every request (the thinking budget, the output limit).
_SETTINGS = re.compile(r"thinking|budget|generation_?config|max_?output_?tokens", re.IGNORECASE)


def _bad_request(error: errors.APIError, message: str) -> AIError:
    """A 400: the deployment's fault (key, permissions, region, settings) or this request's alone."""
    reasons = [str(item.get("reason", "")) for item in _detail_items(error.details, "ErrorInfo")]
    if reasons:
        message = f"{message} [{', '.join(reasons)}]"
    if any(_KEY_OR_PERMISSION.search(reason) for reason in reasons):
        return AIError("auth", message, cause="config")
    if error.status == "FAILED_PRECONDITION" or _SETTINGS.search(error.message or ""):
        return AIError("bad_request", message, cause="config")  # e.g. a region Gemini is not offered in
    return invalid_request(message)


def _headers_of(response: Any) -> Mapping[str, str]:
    headers = getattr(response, "headers", None)
    return headers if isinstance(headers, Mapping) else {}


def map_api_error(error: errors.APIError, provider: str = "gemini") -> AIError:
    """Translate an SDK APIError (HTTP status) into our AIError."""
    code = int(error.code or 0)
    retry_after = parse_retry_after(_headers_of(error.response).get("Retry-After"))
    if retry_after is None and code == 429:
        retry_after = _retry_delay_from_details(error.details)
    message = f"{provider} answered HTTP {code} {error.status or ''}".strip()
    if 400 <= code <= 499 and code not in (408, 429) and error.message:
        # What is wrong with the key, model or settings ("thinking_config is not supported."), for staff.
        message = f"{message}: {error.message[:200]}"
    if code == 400:
        return _bad_request(error, message)
    return http_status_error(code, message, retry_after)


def _map_error(error: Exception) -> AIError:
    if isinstance(error, AIError):
        return error
    if isinstance(error, errors.APIError):
        return map_api_error(error)
    if isinstance(error, errors.UnknownApiResponseError | pydantic.ValidationError | ValueError):
        return AIError("bad_response", f"gemini: unreadable response ({type(error).__name__})")
    return map_transport_error(error, "gemini")


def _texts(parts: Iterable[types.Part] | None) -> str:
    return "".join(part.text for part in parts or () if part.text and not part.thought)


def _finish_name(reason: types.FinishReason | str | None) -> str | None:
    if reason is None:
        return None
    return reason.value if isinstance(reason, types.FinishReason) else str(reason)


def _refused_finish(finish: str, usage: Usage) -> AIError:
    """An answer ended for a reason that is no fluke of one generation: the account's, or this request's."""
    if finish in ACCOUNT_FINISH_REASONS:
        message = f"gemini: the API key's account is limited or disabled (finish reason {finish})"
        return AIError("auth", message, cause="config", usage=usage)
    return AIError("invalid_request", f"gemini: the model cannot take this request (finish reason {finish})",
                   cause="request", usage=usage)


class GeminiProvider:
    """Streams Gemini answers with google-genai; SDK retries are off so the resilience wrapper decides."""

    name = "gemini"

    def __init__(
        self,
        api_key: str,
        *,
        model: str = DEFAULT_MODEL,
        base_url: str | None = None,
        connect_timeout: float | None = 10.0,
        request_timeout: float | None = None,
        max_output_tokens: int | None = None,
        thinking_budget: int | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("GeminiProvider needs an API key")
        self.model = model
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_output_tokens = max_output_tokens
        self.thinking_budget = thinking_budget
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self._client: genai.Client | None = None
        self._closed = False

    def _ensure_client(self) -> genai.Client:
        # Built on first use, inside the running loop: an aiohttp session belongs to one loop.
        if self._closed:
            raise AIError("closed", "gemini provider is closed")
        if self._client is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(_remember_response)
            self._session = aiohttp.ClientSession(
                connector=ConnectTimeoutConnector(self.connect_timeout, limit=0),
                trace_configs=[trace],
                response_class=_SSEResponse,
                trust_env=True,
            )
            options = types.HttpOptions(
                base_url=self.base_url,
                timeout=int(self.request_timeout * 1000) if self.request_timeout else None,
                # attempts=1: google-genai must not retry behind our back (it also disables its implicit
                # reconnect on aiohttp connection errors).
                retry_options=types.HttpRetryOptions(attempts=1),
                aiohttp_client=self._session,
            )
            self._client = genai.Client(api_key=self._api_key, vertexai=False, http_options=options)
        return self._client

    def output_limit(self) -> int | None:
        """maxOutputTokens: a thinking model's thoughts count against it, so the answer's limit gets the
        thinking budget on top, and a long think can never leave the answer empty."""
        if self.max_output_tokens is None:
            return None
        return self.max_output_tokens + (self.thinking_budget or 0)

    def _config(self, request: AIRequest) -> types.GenerateContentConfig:
        return types.GenerateContentConfig(
            system_instruction=request.system_instruction or None,
            max_output_tokens=self.output_limit(),
            # Resuming a broken stream is the SDK re-sending the request: our retry policy owns that.
            automatic_continuation=False,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            thinking_config=(
                types.ThinkingConfig(thinking_budget=self.thinking_budget)
                if self.thinking_budget is not None
                else None
            ),
        )

    async def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        """Yield Gemini's text as it arrives, then one Usage (blocked=True when a safety filter stopped it)."""
        client = self._ensure_client()
        opened: list[aiohttp.ClientResponse] = []
        chunks: AsyncIterator[types.GenerateContentResponse] | None = None
        usage: types.GenerateContentResponseUsageMetadata | None = None
        finish: str | None = None
        blocked = False
        output_chars = 0
        started = time.monotonic()
        try:
            try:
                chunks = await client.aio.models.generate_content_stream(
                    model=self.model, contents=build_contents(request), config=self._config(request)
                )
                while True:
                    chunk = await self._pull(chunks, opened)
                    if chunk is None:
                        break
                    if chunk.usage_metadata is not None:
                        usage = chunk.usage_metadata
                    feedback = chunk.prompt_feedback
                    if feedback is not None and feedback.block_reason is not None:
                        blocked, finish = True, _finish_name(feedback.block_reason)
                        break
                    candidate = chunk.candidates[0] if chunk.candidates else None
                    if candidate is None:
                        continue
                    finish = _finish_name(candidate.finish_reason) or finish
                    if finish in BLOCKING_FINISH_REASONS:
                        blocked = True
                        break
                    text = _texts(candidate.content.parts if candidate.content else None)
                    if text:
                        output_chars += len(text)
                        yield text
                if not blocked and finish is None:
                    # Gemini ends every answer with a finish reason: a body that ends without one was cut
                    # (a proxy or load balancer closing it cleanly), and its text is not the whole answer.
                    raise AIError("connection", "gemini: stream ended before the answer did", retryable=True)
                if finish in ACCOUNT_FINISH_REASONS | REQUEST_FINISH_REASONS:
                    final = self._usage(request, usage, finish, blocked, output_chars)
                    raise _refused_finish(finish, final)
                if output_chars and not blocked and finish not in FINISHED | CUT:
                    # Text was shown, but the model did not finish it (an answer without any is an empty one).
                    final = self._usage(request, usage, finish, blocked, output_chars)
                    raise unfinished_answer_error(self.name, final.finish_reason, final)
            except Exception as error:
                mapped = _map_error(error)
                log.warning(
                    "ai_upstream_error",
                    extra={"provider": self.name, "model": self.model, "kind": mapped.kind,
                           "request_id": request.request_id, "error": str(mapped)},
                )
                raise mapped from error
        finally:
            await self._release(opened, chunks)
        log.debug(
            "ai_stream_done",
            extra={"provider": self.name, "model": self.model, "request_id": request.request_id,
                   "finish_reason": finish, "blocked": blocked,
                   "elapsed_ms": round((time.monotonic() - started) * 1000)},
        )
        yield self._usage(request, usage, finish, blocked, output_chars)

    @staticmethod
    async def _pull(
        chunks: AsyncIterator[types.GenerateContentResponse], opened: list[aiohttp.ClientResponse]
    ) -> types.GenerateContentResponse | None:
        # The SDK sends its request lazily, inside this anext(); the trace hook files the response under
        # `opened` because it runs in this task's context while the variable is set.
        token = _open_responses.set(opened)
        try:
            return await anext(chunks, None)
        finally:
            _open_responses.reset(token)

    @staticmethod
    async def _release(
        opened: list[aiohttp.ClientResponse], chunks: AsyncIterator[types.GenerateContentResponse] | None
    ) -> None:
        # Closing (not releasing) drops the connection of an unfinished stream at once, so the upstream
        # stops generating; a response read to its end was already returned to the pool and is untouched.
        for response in opened:
            response.close()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # the connection is already closed; nothing is left to report
                log.debug("gemini_stream_close_failed", exc_info=True)

    @staticmethod
    def _usage(
        request: AIRequest,
        usage: types.GenerateContentResponseUsageMetadata | None,
        finish: str | None,
        blocked: bool,
        output_chars: int,
    ) -> Usage:
        prompt_tokens = usage.prompt_token_count if usage is not None else None
        output_tokens = usage.candidates_token_count if usage is not None else None
        if prompt_tokens is None:
            prompt_tokens = estimate_prompt_tokens(request)
        if output_tokens is None:
            output_tokens = (output_chars + 3) // 4
        # A thinking model's thoughts are not in candidates_token_count but are billed as output.
        output_tokens += (usage.thoughts_token_count or 0) if usage is not None else 0
        if blocked:
            return Usage(prompt_tokens, output_tokens, finish_reason="SAFETY", blocked=True)
        reason = "stop" if finish in (None, "STOP") else finish.lower()
        return Usage(prompt_tokens, output_tokens, finish_reason=reason, truncated=finish in CUT)

    async def close(self) -> None:
        """Close the genai client and the aiohttp session behind it."""
        self._closed = True
        client, session = self._client, self._session
        self._client = self._session = None
        if client is not None:
            client.close()
            await client.aio.aclose()
        if session is not None:
            await session.close()

