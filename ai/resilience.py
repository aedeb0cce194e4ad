"""Resilience for hosted models: error classification, timeouts, retries before the first token, a breaker."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

import aiohttp
import attr

from .base import AIError, AIRequest, Cause, Provider, StreamItem, Usage

log = logging.getLogger("smartedu.ai.resilience")

BreakerState = Literal["closed", "open", "half_open"]
RetryCallback = Callable[[int, AIError, float], None]  # (attempt about to start, its cause, delay in seconds)
BreakerCallback = Callable[[BreakerState, BreakerState], None]  # (old state, new state)

_END: Final = object()
_HTTPX_PACKAGES = frozenset({"httpx", "httpx2", "httpcore", "httpcore2"})


# --- classifying upstream failures (shared by the HTTP providers) ---


class ConnectTimeoutConnector(aiohttp.TCPConnector):
    """A TCP connector that bounds the TCP/TLS connect even when the caller's timeout has no connect part."""

    def __init__(self, connect_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connect_timeout = connect_timeout

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.connector.Connection:
        # google-genai passes ClientTimeout(total=...) only, which would leave the connect unbounded.
        if self.connect_timeout is not None and timeout.sock_connect is None:
            timeout = attr.evolve(timeout, sock_connect=self.connect_timeout)
        return await super().connect(req, traces, timeout)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def http_status_error(code: int, message: str, retry_after: float | None = None) -> AIError:
    """The AIError for an upstream HTTP status: 408/429/5xx are retryable; 400 and 413 concern this request
    (too long, content refused); other 4xx are the deployment's fault (key, model, permissions) and fail
    every question alike until staff fix them. Providers tell a 400 that is the deployment's (a refused
    key or setting) by its body before falling back on this."""
    if code == 429:
        return AIError("rate_limited", message, retryable=True, retry_after=retry_after)
    if code == 408:
        return AIError("timeout", message, retryable=True, retry_after=retry_after)
    if 500 <= code <= 599:
        return AIError("unavailable", message, retryable=True, retry_after=retry_after)
    if code in (401, 403):
        return AIError("auth", message, cause="config")
    if code == 404:
        return AIError("not_found", message, cause="config")
    if code in (400, 413):
        return invalid_request(message)
    if 400 <= code <= 499:
        return AIError("bad_request", message, cause="config")
    return AIError("api_error", message)


# What an HTTP 200 that is no answer comes as: a proxy's sign-in or error page instead of the model's events.
PAGE_TYPES = frozenset({"text/html", "text/xml", "application/xml"})


def not_an_event_stream(provider: str, content_type: str) -> AIError:
    """An HTTP 200 whose body is a page, not events: every request gets the same, so it is the deployment's."""
    message = f"{provider} answered HTTP 200 with {content_type}, not an event stream"
    return AIError("bad_response", message, cause="config")


def invalid_request(message: str) -> AIError:
    """The provider could not process this one request; the deployment is fine (see `Cause`)."""
    return AIError("invalid_request", message, cause="request")


def map_transport_error(error: BaseException, provider: str) -> AIError:
    """Translate a client-side failure (timeouts, refused or dropped connections) into our AIError."""
    name = type(error).__name__
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return AIError("connect_timeout", f"{provider}: connect timed out", retryable=True)
    if isinstance(error, TimeoutError):  # aiohttp's ServerTimeoutError and the request's total timeout
        return AIError("timeout", f"{provider}: request timed out ({name})", retryable=True)
    if isinstance(error, aiohttp.ClientPayloadError):
        return AIError("connection", f"{provider}: stream broke off ({name})", retryable=True)
    if isinstance(error, aiohttp.ClientError | OSError):
        return AIError("connection", f"{provider}: connection failed ({name})", retryable=True)
    if type(error).__module__.partition(".")[0] in _HTTPX_PACKAGES:
        # google-genai falls back to httpx/httpx2 when not given an aiohttp session; their errors are not
        # TimeoutError/OSError subclasses, and importing them just to classify would be a hard dependency.
        kind = "timeout" if "Timeout" in name else "connection"
        return AIError(kind, f"{provider}: request failed ({name})", retryable=True)
    return AIError("bad_response", f"{provider}: unexpected failure ({name})")


# Finish reasons (lower-case) after which the same request would end the same way again: the model's own
# verdict on the question (it would recite a source, the language is not supported) or the output limit, not
# a hiccup of one generation.
SAME_AGAIN_FINISH_REASONS = frozenset({"max_tokens", "length", "continuation", "recitation", "image_recitation",
                                       "language"})


def empty_answer_error(provider: str, finish_reason: str) -> AIError:
    """A stream that ended with no text and no block: an error, never a blank answer shown as complete.

    Gemini now and then ends a stream normally with empty candidates; trying again may well answer, as after
    `other` or a stray tool call. An end for a reason in SAME_AGAIN_FINISH_REASONS (max_tokens spent on
    thinking, recitation, language) would end the same way again.
    """
    message = f"{provider}: the answer was empty (finish reason {finish_reason})"
    if finish_reason in SAME_AGAIN_FINISH_REASONS:
        return AIError("empty_answer", message, cause="refused")
    return AIError("empty_answer", message, retryable=True)


def unfinished_answer_error(provider: str, finish_reason: str, usage: Usage) -> AIError:
    """A stream that ended after some text for a reason other than its natural end, the output limit or a
    safety block (Gemini's OTHER, RECITATION, a stray tool call...): the text is not the whole answer.

    Never retried by the wrapper (text was shown) and no sign of an outage (the upstream answered), so not
    `retryable`; the cause tells the student whether asking again can help.
    """
    message = f"{provider}: the answer ended early (finish reason {finish_reason})"
    cause: Cause = "refused" if finish_reason in SAME_AGAIN_FINISH_REASONS else "transient"
    return AIError("unfinished_answer", message, cause=cause, usage=usage)


# --- the policy, the breaker and the wrapper ---


@dataclass(frozen=True, slots=True)
class ResiliencePolicy:
    """Every limit the wrapper enforces; seconds unless named otherwise."""

    first_token_timeout: float = 30.0
    idle_timeout: float = 30.0
    total_timeout: float = 180.0
    max_retries: int = 2
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 20.0  # a longer Retry-After is handed to the caller instead of slept through
    breaker_failures: int = 5  # 0 turns the breaker off
    breaker_window: float = 60.0
    breaker_cooldown: float = 30.0


class CircuitBreaker:
    """Opens after `failures` consecutive failures within `window`; one probe goes through after `cooldown`."""

    def __init__(
        self,
        failures: int,
        window: float,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: BreakerCallback | None = None,
    ) -> None:
        self.failures = failures
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self.on_change = on_change
        self.state: BreakerState = "closed"
        self.opened_at: float | None = None
        self.times_opened = 0
        self.rejected = 0
        self._recent: deque[float] = deque(maxlen=max(1, failures))
        self._probing = False
        self._last: AIError | None = None
        self.opened_by: AIError | None = None  # the failure that opened the breaker

    def remaining_cooldown(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state != "open" or self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def admit(self) -> bool:
        """Let a call through (returns True when it is the half-open probe) or raise `circuit_open`."""
        if self.failures <= 0:
            return False
        if self.state == "open" and self.remaining_cooldown() <= 0:
            self._move("half_open")
        if self.state == "closed":
            return False
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        self.rejected += 1
        cause = self.opened_by
        if cause is not None and cause.cause == "config":
            # Opened by a bad key or model: waiting out the cooldown will not help the student either.
            raise AIError(cause.kind, f"calls are paused after: {cause}", cause="config")
        retry_after = self.remaining_cooldown() if self.state == "open" else min(1.0, self.cooldown)
        raise AIError("circuit_open", "the AI provider is failing; calls are paused", retry_after=retry_after)

    def record_success(self, probe: bool) -> None:
        """The upstream answered: forget past failures and close a half-open breaker."""
        self._recent.clear()
        if probe:
            self._probing = False
        if self.state == "half_open":
            self._move("closed")

    def record_failure(self, probe: bool, error: AIError | None = None) -> None:
        """The upstream failed (an outage, or a configuration every call fails on): count it, and open when
        the threshold is reached."""
        if self.failures <= 0:
            return
        now = self.clock()
        self._last = error
        if probe:
            self._probing = False
        if self.state == "half_open":
            self._open(now)
            return
        self._recent.append(now)
        if self.state == "closed" and len(self._recent) >= self.failures and now - self._recent[0] <= self.window:
            self._open(now)

    def release(self, probe: bool) -> None:
        """The call ended without a verdict (cancelled): let another probe through."""
        if probe:
            self._probing = False

    def _open(self, now: float) -> None:
        self.opened_at = now
        self.opened_by = self._last
        self.times_opened += 1
        self._recent.clear()
        self._move("open")

    def _move(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        if new == "closed":
            self.opened_at = self.opened_by = None
        log.warning("ai_breaker_state", extra={"old": old, "new": new, "cooldown_s": self.cooldown})
        if self.on_change is not None:
            _notify(self.on_change, old, new)


class ResilientProvider:
    """Wraps a Provider with the policy's timeouts, retries (only before the first chunk) and breaker."""

    def __init__(
        self,
        inner: Provider,
        policy: ResiliencePolicy | None = None,
        *,
        on_retry: RetryCallback | None = None,
        on_breaker_change: BreakerCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.inner = inner
        self.policy = policy or ResiliencePolicy()
        self.name = inner.name
        self.model = inner.model
        self.on_retry = on_retry
        self.rng = rng
        self.breaker = CircuitBreaker(
            self.policy.breaker_failures,
            self.policy.breaker_window,
            self.policy.breaker_cooldown,
            clock=clock,
            on_change=on_breaker_change,
        )
        # Plain counters for the metrics module to read.
        self.calls = 0
        self.attempts = 0
        self.retries = 0
        self.failures = 0
        self.errors: Counter[str] = Counter()
        self._misconfigured: str | None = None  # the kind of configuration failure already logged

    def backoff(self, retry: int, error: AIError) -> float:
        """Full-jitter exponential delay before retry number `retry` (1-based), at least any Retry-After."""
        ceiling = min(self.policy.backoff_max, self.policy.backoff_initial * 2.0 ** (retry - 1))
        delay = ceiling * self.rng()
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    async def stream(self, request: AIRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream from the inner provider under the policy; AIError after a partial answer is not retried."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.total_timeout
        self.calls += 1
        retry = 0
        while True:
            probe = self.breaker.admit()
            self.attempts += 1
            inner = self.inner.stream(request)
            started = False
            verdict: Literal["success", "failure", "none"] = "none"
            failure: AIError | None = None
            final: Usage | None = None
            try:
                while True:
                    item = await self._next(inner, started, deadline)
                    if item is _END:
                        raise AIError("bad_response", f"{self.name}: stream ended without usage")
                    if isinstance(item, Usage):
                        if not started and not item.blocked:
                            raise empty_answer_error(self.name, item.finish_reason)
                        final, verdict = item, "success"
                        break
                    if isinstance(item, str):
                        if not started:
                            # The upstream answers: a half-open breaker closes now, not when this (maybe
                            # minute-long) answer ends, during which every other call would be refused.
                            self.breaker.record_success(probe)
                            started, probe = True, False
                            self._misconfigured = None
                        yield item
            except AIError as error:
                self.errors[error.kind] += 1
                if error.cause == "config":
                    # A bad key or model fails every call alike: the provider is down for everyone, as in an
                    # outage, but trying again cannot help.
                    verdict, failure = "failure", error
                    self.failures += 1
                    self._alert(error)
                    raise
                if not error.retryable:
                    verdict = "success"  # the upstream answered; it just refused this request
                    if error.cause == "request":
                        # Not an alert (the tutor works for everyone else), but staff may want the reason.
                        log.warning(
                            "ai_request_rejected",
                            extra={"provider": self.name, "model": self.model, "kind": error.kind,
                                   "error": str(error)},
                        )
                    raise
                verdict, failure = "failure", error
                self.failures += 1
                delay = self.backoff(retry + 1, error)
                if started or not self._may_retry(retry, error, delay, deadline):
                    raise
            finally:
                await _close(inner)
                if verdict == "success":
                    self.breaker.record_success(probe)
                elif verdict == "failure":
                    self.breaker.record_failure(probe, failure)
                else:
                    self.breaker.release(probe)
            if final is not None:
                # Yielded only after the inner stream is closed: a caller may stop iterating at the Usage.
                yield final
                return
            assert failure is not None  # an attempt that neither finished nor raised failed retryably
            if self.breaker.state == "open":
                # This failure opened the breaker: a retry would be refused, so report the failure itself.
                raise failure
            retry += 1
            self.retries += 1
            log.warning(
                "ai_retry",
                extra={"provider": self.name, "request_id": request.request_id, "retry": retry,
                       "kind": failure.kind, "delay_s": round(delay, 3)},
            )
            if self.on_retry is not None:
                _notify(self.on_retry, retry, failure, delay)
            await asyncio.sleep(delay)

    def _alert(self, error: AIError) -> None:
        # Staff must hear of a bad key or model at once, but once, not for every student's question.
        if self._misconfigured == error.kind:
            return
        self._misconfigured = error.kind
        log.error(
            "ai_misconfigured",
            extra={"provider": self.name, "model": self.model, "kind": error.kind, "error": str(error)},
        )

    def _may_retry(self, retry: int, error: AIError, delay: float, deadline: float) -> bool:
        if retry >= self.policy.max_retries:
            return False
        if error.retry_after is not None and error.retry_after > self.policy.max_retry_after:
            return False
        return asyncio.get_running_loop().time() + delay < deadline

    async def _next(self, inner: AsyncIterator[StreamItem], started: bool, deadline: float) -> object:
        loop = asyncio.get_running_loop()
        phase = self.policy.idle_timeout if started else self.policy.first_token_timeout
        phase_deadline = loop.time() + phase
        timer = asyncio.timeout_at(min(phase_deadline, deadline))
        try:
            async with timer:
                return await anext(inner, _END)
        except TimeoutError:
            if not timer.expired():  # a provider let a raw timeout escape: still a timeout to our callers
                raise AIError("timeout", f"{self.name}: request timed out", retryable=True) from None
        if deadline <= phase_deadline:
            kind, limit = "total_timeout", self.policy.total_timeout
        elif started:
            kind, limit = "idle_timeout", self.policy.idle_timeout
        else:
            kind, limit = "first_token_timeout", self.policy.first_token_timeout
        raise AIError(kind, f"{self.name}: {kind.replace('_', ' ')} after {limit:g}s", retryable=True)

    async def close(self) -> None:
        """Close the wrapped provider."""
        await self.inner.close()


def _notify(callback: Callable[..., None], *args: object) -> None:
    # A metrics hook that fails must not fail a student's answer.
    try:
        callback(*args)
    except Exception:
        log.exception("ai_callback_failed", extra={"callback": getattr(callback, "__qualname__", repr(callback))})


async def _close(stream: AsyncIterator[StreamItem]) -> None:
    # Finalizes the inner generator now (its `finally` closes the HTTP response) rather than at GC time.
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()
