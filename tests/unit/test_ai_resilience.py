"""ResilientProvider policy (timeouts, retries, breaker) with a scripted provider; AIConfig and the factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest

from ai.base import AIError, AIRequest, StreamItem, Usage
from ai.config import AIConfig
from ai.factory import create_provider
from ai.offline import OfflineProvider
from ai.resilience import (
    CircuitBreaker,
    ResiliencePolicy,
    ResilientProvider,
    http_status_error,
    map_transport_error,
    parse_retry_after,
)
from server.errors import ConfigError
from server.settings import Settings

REQUEST = AIRequest(question="Why is the sky blue?")
FOREVER = 3600.0


@dataclass
class Step:
    """One scripted attempt: chunks (with a delay before each), then an error or a Usage."""

    chunks: tuple[str, ...] = ("Light ", "scatters.")
    error: AIError | None = None
    error_after: int = 0  # raise `error` after this many chunks
    first_delay: float = 0.0
    delay: float = 0.0
    usage: bool = True
    finish: str = "stop"
    blocked: bool = False


@dataclass
class ScriptedProvider:
    """A Provider that plays one Step per call (the last step repeats) and records what happened."""

    steps: list[Step] = field(default_factory=lambda: [Step()])
    name: str = "scripted"
    model: str = "scripted-1"
    calls: int = 0
    finalized: int = 0
    closed: bool = False

    async def stream(self, request: AIRequest) -> AsyncIterator[StreamItem]:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        try:
            for index, chunk in enumerate(step.chunks):
                if step.error is not None and index == step.error_after:
                    raise step.error
                await asyncio.sleep(step.first_delay if index == 0 else step.delay)
                yield chunk
            if step.error is not None:
                raise step.error
            if step.usage:
                yield Usage(3, len(step.chunks), finish_reason=step.finish, blocked=step.blocked)
        finally:
            self.finalized += 1

    async def close(self) -> None:
        self.closed = True


def unavailable() -> AIError:
    return AIError("unavailable", "HTTP 503", retryable=True)


def policy(**overrides: float) -> ResiliencePolicy:
    settings: dict[str, float] = {
        "first_token_timeout": 0.2,
        "idle_timeout": 0.2,
        "total_timeout": 3.0,
        "max_retries": 2,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "breaker_failures": 3,
        "breaker_window": 10.0,
        "breaker_cooldown": 0.2,
        **overrides,
    }
    return ResiliencePolicy(**settings)  # type: ignore[arg-type]


def state_of(provider: ResilientProvider | CircuitBreaker) -> str:
    breaker = provider.breaker if isinstance(provider, ResilientProvider) else provider
    return breaker.state  # read through a call: mypy would keep an earlier narrowing of the attribute


async def collect(provider: ResilientProvider, texts: list[str] | None = None) -> Usage:
    texts = [] if texts is None else texts
    async for item in provider.stream(REQUEST):
        if isinstance(item, Usage):
            return item
        texts.append(item)
    raise AssertionError("no usage")


# --- retries ---


async def test_success_passes_through() -> None:
    inner = ScriptedProvider()
    provider = ResilientProvider(inner, policy())
    texts: list[str] = []
    usage = await collect(provider, texts)
    assert texts == ["Light ", "scatters."] and usage.output_tokens == 2
    assert (provider.calls, provider.attempts, provider.retries) == (1, 1, 0)
    assert (provider.name, provider.model) == ("scripted", "scripted-1")


@pytest.mark.parametrize(
    "error",
    [
        AIError("rate_limited", "429", retryable=True),
        AIError("unavailable", "500", retryable=True),
        AIError("timeout", "read timeout", retryable=True),
        AIError("connection", "reset", retryable=True),
    ],
)
async def test_retryable_errors_before_the_first_token_are_retried(error: AIError) -> None:
    inner = ScriptedProvider([Step(error=error), Step(error=error), Step()])
    seen: list[tuple[int, str, float]] = []
    provider = ResilientProvider(inner, policy(), on_retry=lambda n, e, d: seen.append((n, e.kind, d)))
    texts: list[str] = []
    await collect(provider, texts)
    assert texts == ["Light ", "scatters."]
    assert inner.calls == 3 and provider.retries == 2
    assert [(n, kind) for n, kind, _ in seen] == [(1, error.kind), (2, error.kind)]
    assert all(0 <= delay <= 0.02 for _, _, delay in seen)
    assert inner.finalized == 3, "every failed attempt's stream is closed"


async def test_first_token_timeout_is_retried() -> None:
    inner = ScriptedProvider([Step(first_delay=FOREVER), Step()])
    provider = ResilientProvider(inner, policy())
    await collect(provider)
    assert inner.calls == 2 and provider.errors["first_token_timeout"] == 1
    assert inner.finalized == 2


async def test_no_retry_after_the_first_token() -> None:
    inner = ScriptedProvider([Step(error=unavailable(), error_after=1), Step()])
    provider = ResilientProvider(inner, policy())
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(provider, texts)
    assert caught.value.kind == "unavailable"
    assert texts == ["Light "]
    assert inner.calls == 1 and provider.retries == 0


async def test_non_retryable_errors_are_raised_at_once() -> None:
    inner = ScriptedProvider([Step(error=AIError("bad_request", "400")), Step()])
    provider = ResilientProvider(inner, policy())
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind == "bad_request" and inner.calls == 1
    assert provider.breaker.state == "closed"


async def test_retries_stop_at_max_retries() -> None:
    inner = ScriptedProvider([Step(error=unavailable())])
    provider = ResilientProvider(inner, policy(max_retries=2, breaker_failures=0))
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind == "unavailable"
    assert inner.calls == 3 and provider.retries == 2 and provider.failures == 3


async def test_retry_waits_at_least_retry_after() -> None:
    limited = AIError("rate_limited", "429", retryable=True, retry_after=0.1)
    inner = ScriptedProvider([Step(error=limited), Step()])
    delays: list[float] = []
    provider = ResilientProvider(inner, policy(), on_retry=lambda n, e, d: delays.append(d), rng=lambda: 0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await collect(provider)
    assert delays == [0.1]
    assert loop.time() - started >= 0.1


async def test_long_retry_after_goes_to_the_caller() -> None:
    limited = AIError("rate_limited", "429", retryable=True, retry_after=120.0)
    inner = ScriptedProvider([Step(error=limited), Step()])
    provider = ResilientProvider(inner, policy(max_retry_after=20.0))
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.retry_after == 120.0 and inner.calls == 1


async def test_a_failing_callback_does_not_fail_the_answer() -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("metrics bug")

    inner = ScriptedProvider([Step(error=unavailable()), Step()])
    provider = ResilientProvider(inner, policy(), on_retry=broken, on_breaker_change=broken)
    texts: list[str] = []
    await collect(provider, texts)
    assert texts == ["Light ", "scatters."] and provider.retries == 1


def test_backoff_is_jittered_exponential_and_capped() -> None:
    provider = ResilientProvider(ScriptedProvider(), policy(backoff_initial=0.5, backoff_max=4.0), rng=lambda: 1.0)
    error = unavailable()
    assert [provider.backoff(n, error) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    provider.rng = lambda: 0.25
    assert provider.backoff(3, error) == 0.5


# --- timeouts ---


async def test_idle_timeout_after_first_token_is_raised_with_the_partial_text() -> None:
    inner = ScriptedProvider([Step(chunks=("a", "b", "c"), delay=FOREVER), Step()])
    provider = ResilientProvider(inner, policy())
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(provider, texts)
    assert caught.value.kind == "idle_timeout" and caught.value.retryable
    assert texts == ["a"] and inner.calls == 1 and inner.finalized == 1


async def test_total_timeout_bounds_a_slow_but_steady_stream() -> None:
    inner = ScriptedProvider([Step(chunks=tuple("abcdefghij"), delay=0.1)])
    provider = ResilientProvider(inner, policy(idle_timeout=0.5, total_timeout=0.35))
    texts: list[str] = []
    with pytest.raises(AIError) as caught:
        await collect(provider, texts)
    assert caught.value.kind == "total_timeout"
    assert 1 <= len(texts) <= 4 and inner.calls == 1


async def test_total_timeout_bounds_the_retries() -> None:
    inner = ScriptedProvider([Step(first_delay=FOREVER)])
    provider = ResilientProvider(
        inner, policy(first_token_timeout=0.15, total_timeout=0.4, max_retries=10, breaker_failures=0)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind in ("first_token_timeout", "total_timeout")
    assert loop.time() - started < 1.5
    assert inner.calls <= 3


async def test_stream_without_usage_is_a_bad_response() -> None:
    provider = ResilientProvider(ScriptedProvider([Step(usage=False)]), policy())
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind == "bad_response" and not caught.value.retryable


async def test_an_empty_answer_is_an_error_retried_only_when_it_ended_normally() -> None:
    inner = ScriptedProvider([Step(chunks=()), Step()])
    provider = ResilientProvider(inner, policy())
    texts: list[str] = []
    await collect(provider, texts)
    assert texts == ["Light ", "scatters."] and inner.calls == 2 and provider.errors["empty_answer"] == 1

    inner = ScriptedProvider([Step(chunks=(), finish="max_tokens"), Step()])
    provider = ResilientProvider(inner, policy())
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert (caught.value.kind, caught.value.retryable, inner.calls) == ("empty_answer", False, 1)

    # A stray tool call from a model given no tools, as after OTHER: another generation may well answer.
    inner = ScriptedProvider([Step(chunks=(), finish="malformed_function_call"), Step()])
    provider = ResilientProvider(inner, policy())
    texts = []
    await collect(provider, texts)
    assert texts == ["Light ", "scatters."] and inner.calls == 2


async def test_a_refused_question_is_not_retried_and_leaves_the_breaker_closed() -> None:
    # Nothing but an empty answer with a finish reason that would come again (max_tokens, recitation): the
    # provider declined this question; it is up for everyone else.
    inner = ScriptedProvider([Step(chunks=(), finish="recitation")])
    provider = ResilientProvider(inner, policy(max_retries=2, breaker_failures=2))
    for _ in range(3):
        with pytest.raises(AIError) as caught:
            await collect(provider)
        assert (caught.value.cause, caught.value.retryable, caught.value.retry_after) == ("refused", False, None)
    assert inner.calls == 3 and state_of(provider) == "closed" and provider.failures == 0


async def test_a_configuration_failure_is_not_retried_opens_the_breaker_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = ScriptedProvider([Step(error=http_status_error(403, "gemini answered HTTP 403 PERMISSION_DENIED"))])
    provider = ResilientProvider(inner, policy(max_retries=2, breaker_failures=2))
    with caplog.at_level("ERROR", logger="smartedu.ai.resilience"):
        for _ in range(2):
            with pytest.raises(AIError) as caught:
                await collect(provider)
            assert (caught.value.kind, caught.value.cause) == ("auth", "config")
        assert inner.calls == 2, "a bad key is not retried"
        assert state_of(provider) == "open", "a bad key is down for everyone, as an outage is"
        # Refused at once, and told as what it is: waiting out the cool-down will not fix a key.
        with pytest.raises(AIError) as caught:
            await collect(provider)
        assert (caught.value.kind, caught.value.cause, caught.value.retry_after) == ("auth", "config", None)
        assert inner.calls == 2
    alerts = [r for r in caplog.records if r.getMessage() == "ai_misconfigured"]
    assert len(alerts) == 1 and alerts[0].levelname == "ERROR" and alerts[0].__dict__["kind"] == "auth"

    await asyncio.sleep(0.25)  # staff fixed the key: the probe answers, and a later bad key is told again
    inner.steps = [Step()]
    await collect(provider)
    assert state_of(provider) == "closed"
    inner.steps = [Step(error=http_status_error(401, "HTTP 401"))]
    with caplog.at_level("ERROR", logger="smartedu.ai.resilience"), pytest.raises(AIError):
        await collect(provider)
    assert len([r for r in caplog.records if r.getMessage() == "ai_misconfigured"]) == 2


async def test_an_outage_opened_breaker_still_says_when_to_try_again() -> None:
    _, provider = await opened_breaker()
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert (caught.value.kind, caught.value.cause) == ("circuit_open", "transient")
    assert caught.value.retry_after is not None and caught.value.retry_after > 0


async def test_a_block_without_text_is_not_an_empty_answer() -> None:
    inner = ScriptedProvider([Step(chunks=(), finish="SAFETY", blocked=True)])
    usage = await collect(ResilientProvider(inner, policy()))
    assert usage.blocked and inner.calls == 1


async def test_cancel_closes_the_inner_stream() -> None:
    inner = ScriptedProvider([Step(chunks=("a", "b"), delay=FOREVER)])
    provider = ResilientProvider(inner, policy(idle_timeout=FOREVER))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _item in provider.stream(REQUEST):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inner.finalized == 1
    assert provider.breaker.state == "closed" and provider.failures == 0


# --- circuit breaker ---


async def test_breaker_opens_fails_fast_and_half_opens_after_cooldown() -> None:
    inner = ScriptedProvider([Step(error=unavailable())])
    changes: list[tuple[str, str]] = []
    provider = ResilientProvider(
        inner, policy(max_retries=0, breaker_failures=3), on_breaker_change=lambda old, new: changes.append((old, new))
    )
    for _ in range(3):
        with pytest.raises(AIError) as caught:
            await collect(provider)
        assert caught.value.kind == "unavailable", "circuit_open only for calls the breaker refuses"
    assert provider.breaker.state == "open" and inner.calls == 3

    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind == "circuit_open" and not caught.value.retryable
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 0.2
    assert inner.calls == 3, "an open breaker does not call the provider"

    await asyncio.sleep(0.25)
    inner.steps = [Step(first_delay=0.1)]
    probe = asyncio.create_task(collect(provider))
    await asyncio.sleep(0.02)
    assert state_of(provider) == "half_open"
    with pytest.raises(AIError) as caught:
        await collect(provider)  # only the probe goes through while half-open
    assert caught.value.kind == "circuit_open"
    await probe
    assert state_of(provider) == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert provider.breaker.times_opened == 1 and provider.breaker.rejected == 2


async def opened_breaker(**overrides: float) -> tuple[ScriptedProvider, ResilientProvider]:
    """A wrapper whose breaker two failures have just opened (cool-down 0.2 s)."""
    inner = ScriptedProvider([Step(error=unavailable())])
    provider = ResilientProvider(inner, policy(max_retries=0, breaker_failures=2, **overrides))
    for _ in range(2):
        with pytest.raises(AIError):
            await collect(provider)
    assert provider.breaker.state == "open"
    return inner, provider


async def test_a_probe_that_starts_answering_closes_the_breaker_at_once() -> None:
    # A whole answer can take a minute; the upstream has shown it is back with its first chunk, and other
    # students must not be refused for as long as the probe's answer lasts.
    inner, provider = await opened_breaker(idle_timeout=5.0)  # the chunk delay below must never trip it
    await asyncio.sleep(0.25)
    inner.steps = [Step(chunks=("Light ", "scatters."), delay=0.15)]
    texts: list[str] = []
    probe = asyncio.create_task(collect(provider, texts))
    while not texts:
        await asyncio.sleep(0.01)
    assert state_of(provider) == "closed"
    await collect(provider)  # not refused while the probe's answer goes on
    await probe
    assert state_of(provider) == "closed" and provider.breaker.rejected == 0


async def test_failed_probe_reopens_the_breaker() -> None:
    inner, provider = await opened_breaker()
    await asyncio.sleep(0.25)
    with pytest.raises(AIError):
        await collect(provider)
    assert state_of(provider) == "open" and provider.breaker.times_opened == 2
    assert inner.calls == 3


async def test_retries_count_towards_the_breaker_and_stop_when_it_opens() -> None:
    inner = ScriptedProvider([Step(error=unavailable())])
    provider = ResilientProvider(inner, policy(max_retries=5, breaker_failures=3))
    with pytest.raises(AIError) as caught:
        await collect(provider)
    assert caught.value.kind == "unavailable"
    assert inner.calls == 3 and provider.retries == 2 and provider.breaker.state == "open"


async def test_success_resets_the_failure_count() -> None:
    inner = ScriptedProvider([Step(error=unavailable()), Step(error=unavailable()), Step()])
    provider = ResilientProvider(inner, policy(max_retries=0, breaker_failures=3))
    for _ in range(2):
        with pytest.raises(AIError):
            await collect(provider)
    await collect(provider)
    inner.steps, inner.calls = [Step(error=unavailable())], 0
    for _ in range(2):
        with pytest.raises(AIError) as caught:
            await collect(provider)
        assert caught.value.kind == "unavailable"
    assert provider.breaker.state == "closed"


def test_failures_spread_beyond_the_window_do_not_open() -> None:
    now = [0.0]
    breaker = CircuitBreaker(3, window=10.0, cooldown=5.0, clock=lambda: now[0])
    for moment in (0.0, 6.0, 12.0, 18.0):
        now[0] = moment
        breaker.admit()
        breaker.record_failure(probe=False)
    assert breaker.state == "closed"
    now[0] = 19.0
    breaker.record_failure(probe=False)
    assert state_of(breaker) == "open"
    now[0] = 23.0
    assert breaker.remaining_cooldown() == pytest.approx(1.0)
    now[0] = 24.5
    assert breaker.admit() is True and state_of(breaker) == "half_open"
    breaker.release(probe=True)  # a cancelled probe lets the next call probe
    assert breaker.admit() is True


def test_breaker_can_be_switched_off() -> None:
    breaker = CircuitBreaker(0, window=1.0, cooldown=1.0)
    for _ in range(100):
        assert breaker.admit() is False
        breaker.record_failure(probe=False)
    assert breaker.state == "closed"


# --- error classification shared by the HTTP providers ---


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [(429, "rate_limited", True), (408, "timeout", True), (500, "unavailable", True), (502, "unavailable", True),
     (400, "invalid_request", False), (413, "invalid_request", False), (401, "auth", False),
     (404, "not_found", False), (422, "bad_request", False)],
)
def test_http_status_classification(status: int, kind: str, retryable: bool) -> None:
    error = http_status_error(status, f"HTTP {status}")
    assert (error.kind, error.retryable) == (kind, retryable)
    # 400 and 413 concern the request (too long, invalid content); other 4xx statuses are the deployment's
    # (key, model, permissions): no student can fix them by asking again.
    cause = "transient" if retryable else "request" if kind == "invalid_request" else "config"
    assert error.cause == cause


def test_transport_error_classification() -> None:
    import aiohttp

    assert map_transport_error(aiohttp.ConnectionTimeoutError("x"), "p").kind == "connect_timeout"
    assert map_transport_error(aiohttp.SocketTimeoutError("x"), "p").kind == "timeout"
    assert map_transport_error(TimeoutError(), "p").kind == "timeout"
    assert map_transport_error(aiohttp.ClientPayloadError("x"), "p").kind == "connection"
    assert map_transport_error(ConnectionResetError(), "p").kind == "connection"
    assert map_transport_error(RuntimeError("bug"), "p").retryable is False
    httpx2 = pytest.importorskip("httpx2")
    assert map_transport_error(httpx2.ReadTimeout("slow"), "p").kind == "timeout"
    assert map_transport_error(httpx2.ConnectError("refused"), "p").kind == "connection"


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    later = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")
    assert later is not None and later > 1e9


# --- configuration and wiring ---


def test_config_defaults() -> None:
    config = AIConfig.from_env({})
    assert config.gemini_api_key is None and config.gemini_model == "gemini-2.5-flash"
    assert config.max_retries == 2 and config.breaker_failures == 5
    assert config.first_token_timeout_s <= config.total_timeout_s


def test_config_reads_every_variable_and_hides_keys() -> None:
    env = {
        "GEMINI_API_KEY": "g-secret",
        "GEMINI_MODEL": "gemini-2.5-pro",
        "GEMINI_BASE_URL": "http://127.0.0.1:9999/",
        "OPENAI_BASE_URL": "http://localhost:8000/v1",
        "OPENAI_API_KEY": "o-secret",
        "OPENAI_MODEL": "qwen2.5-7b-instruct",
        "SMARTEDU_AI_CONNECT_TIMEOUT_S": "2",
        "SMARTEDU_AI_FIRST_TOKEN_TIMEOUT_S": "15",
        "SMARTEDU_AI_IDLE_TIMEOUT_S": "12.5",
        "SMARTEDU_AI_TOTAL_TIMEOUT_S": "90",
        "SMARTEDU_AI_MAX_RETRIES": "0",
        "SMARTEDU_AI_BREAKER_FAILURES": "8",
        "SMARTEDU_AI_BREAKER_COOLDOWN_S": "45",
    }
    config = AIConfig.from_env(env)
    assert config.gemini_base_url == "http://127.0.0.1:9999"
    assert (config.openai_model, config.openai_base_url) == ("qwen2.5-7b-instruct", "http://localhost:8000/v1")
    assert (config.connect_timeout_s, config.first_token_timeout_s, config.idle_timeout_s) == (2.0, 15.0, 12.5)
    assert (config.total_timeout_s, config.max_retries) == (90.0, 0)
    assert (config.breaker_failures, config.breaker_cooldown_s) == (8, 45.0)
    assert "secret" not in repr(config)
    policy_ = config.policy()
    assert (policy_.first_token_timeout, policy_.max_retries, policy_.breaker_cooldown) == (15.0, 0, 45.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMARTEDU_AI_CONNECT_TIMEOUT_S", "fast"),
        ("SMARTEDU_AI_FIRST_TOKEN_TIMEOUT_S", "0"),
        ("SMARTEDU_AI_IDLE_TIMEOUT_S", "-1"),
        ("SMARTEDU_AI_TOTAL_TIMEOUT_S", "inf"),
        ("SMARTEDU_AI_MAX_RETRIES", "two"),
        ("SMARTEDU_AI_MAX_RETRIES", "-1"),
        ("SMARTEDU_AI_BREAKER_FAILURES", "1.5"),
        ("SMARTEDU_AI_BREAKER_COOLDOWN_S", "nan"),
        ("GEMINI_BASE_URL", "localhost:1234"),
        ("OPENAI_BASE_URL", "ftp://example.org"),
        # the provider appends /chat/completions itself: this URL would 404 on every answer
        ("OPENAI_BASE_URL", "http://localhost:8000/v1/chat/completions/"),
    ],
)
def test_config_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        AIConfig.from_env({name: value})


async def test_factory_builds_wrapped_hosted_providers() -> None:
    gemini = create_provider(Settings(ai_provider="gemini"), {"GEMINI_API_KEY": "k"})
    openai = create_provider(
        Settings(ai_provider="openai"), {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_MODEL": "m"}
    )
    try:
        assert isinstance(gemini, ResilientProvider) and gemini.name == "gemini"
        assert gemini.model == "gemini-2.5-flash"
        assert isinstance(openai, ResilientProvider) and (openai.name, openai.model) == ("openai", "m")
    finally:
        await gemini.close()
        await openai.close()
    offline = create_provider(Settings(ai_provider="offline"), {})
    assert isinstance(offline, OfflineProvider)


async def test_factory_hands_the_output_limits_to_every_provider() -> None:
    from ai.gemini import GeminiProvider
    from ai.openai_compat import OpenAICompatProvider

    settings = Settings(max_output_tokens=300, ai_thinking_budget=200)
    gemini = create_provider(replace(settings, ai_provider="gemini"), {"GEMINI_API_KEY": "k"})
    openai = create_provider(
        replace(settings, ai_provider="openai"), {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_MODEL": "m"}
    )
    try:
        assert isinstance(gemini, ResilientProvider) and isinstance(gemini.inner, GeminiProvider)
        assert gemini.inner.output_limit() == 500 and gemini.inner.thinking_budget == 200
        assert isinstance(openai, ResilientProvider) and isinstance(openai.inner, OpenAICompatProvider)
        assert openai.inner.payload(REQUEST)["max_tokens"] == 300
    finally:
        await gemini.close()
        await openai.close()
    offline = create_provider(replace(settings, ai_provider="offline"), {})
    assert isinstance(offline, OfflineProvider) and offline.max_output_tokens == 300


@pytest.mark.parametrize(
    ("provider", "env", "missing"),
    [
        ("gemini", {}, "GEMINI_API_KEY"),
        ("openai", {"OPENAI_MODEL": "m"}, "OPENAI_BASE_URL"),
        ("openai", {"OPENAI_BASE_URL": "http://localhost:8000/v1"}, "OPENAI_MODEL"),
    ],
)
def test_factory_names_the_missing_variable(provider: str, env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        create_provider(Settings(ai_provider=provider), env)
