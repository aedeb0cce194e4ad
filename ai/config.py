"""AI settings from the environment: hosted-model credentials, endpoints, timeouts, retries, breaker."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.errors import ConfigError

from .resilience import ResiliencePolicy

DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"


@dataclass(frozen=True, slots=True)
class AIConfig:
    """Validated AI settings; API keys are kept out of repr so they never reach a log line."""

    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_model: str = DEFAULT_GEMINI_MODEL
    gemini_base_url: str | None = None
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_model: str | None = None
    connect_timeout_s: float = 10.0
    first_token_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    total_timeout_s: float = 180.0
    max_retries: int = 2
    breaker_failures: int = 5
    breaker_window_s: float = 60.0
    breaker_cooldown_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AIConfig:
        """Read GEMINI_*, OPENAI_* and SMARTEDU_AI_* variables; ConfigError names the bad one."""
        defaults = cls()
        return cls(
            gemini_api_key=_text(env, "GEMINI_API_KEY"),
            gemini_model=_text(env, "GEMINI_MODEL") or defaults.gemini_model,
            gemini_base_url=_url(env, "GEMINI_BASE_URL"),
            openai_base_url=_openai_base_url(env),
            openai_api_key=_text(env, "OPENAI_API_KEY"),
            openai_model=_text(env, "OPENAI_MODEL"),
            connect_timeout_s=_seconds(env, "SMARTEDU_AI_CONNECT_TIMEOUT_S", defaults.connect_timeout_s),
            first_token_timeout_s=_seconds(env, "SMARTEDU_AI_FIRST_TOKEN_TIMEOUT_S", defaults.first_token_timeout_s),
            idle_timeout_s=_seconds(env, "SMARTEDU_AI_IDLE_TIMEOUT_S", defaults.idle_timeout_s),
            total_timeout_s=_seconds(env, "SMARTEDU_AI_TOTAL_TIMEOUT_S", defaults.total_timeout_s),
            max_retries=_count(env, "SMARTEDU_AI_MAX_RETRIES", defaults.max_retries, maximum=10),
            breaker_failures=_count(env, "SMARTEDU_AI_BREAKER_FAILURES", defaults.breaker_failures, maximum=1000),
            breaker_window_s=_seconds(env, "SMARTEDU_AI_BREAKER_WINDOW_S", defaults.breaker_window_s),
            breaker_cooldown_s=_seconds(env, "SMARTEDU_AI_BREAKER_COOLDOWN_S", defaults.breaker_cooldown_s),
        )

    def policy(self) -> ResiliencePolicy:
        """The resilience policy these settings describe."""
        return ResiliencePolicy(
            first_token_timeout=self.first_token_timeout_s,
            idle_timeout=self.idle_timeout_s,
            total_timeout=self.total_timeout_s,
            max_retries=self.max_retries,
            breaker_failures=self.breaker_failures,
            breaker_window=self.breaker_window_s,
            breaker_cooldown=self.breaker_cooldown_s,
        )


def _text(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = _text(env, name)
    if raw is None:
        return None
    if not raw.startswith(("http://", "https://")) or len(raw) <= len("https://"):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    return raw.rstrip("/")


def _openai_base_url(env: Mapping[str, str]) -> str | None:
    url = _url(env, "OPENAI_BASE_URL")
    if url is not None and url.endswith("/chat/completions"):
        raise ConfigError(
            f"OPENAI_BASE_URL must end before /chat/completions (the provider adds it), e.g. "
            f"{url.removesuffix('/chat/completions')}"
        )
    return url


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _count(env: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not 0 <= value <= maximum:
        raise ConfigError(f"{name} must be between 0 and {maximum}, got {value}")
    return value
