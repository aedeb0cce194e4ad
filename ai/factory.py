"""Choose and build the configured provider; the app factory owns its lifetime."""

from __future__ import annotations

from collections.abc import Mapping

from server.errors import ConfigError
from server.settings import Settings

from .base import Provider
from .config import AIConfig
from .offline import OfflineProvider
from .resilience import ResilientProvider

# The HTTP clients' own total timeout is a backstop behind the wrapper's, so it must never fire first.
_BACKSTOP_S = 5.0


def create_provider(settings: Settings, env: Mapping[str, str]) -> Provider:
    """Build the provider named by `settings.ai_provider`; errors name the missing variable."""
    if settings.ai_provider == "offline":
        return OfflineProvider(
            settings.offline_ttft_ms, settings.offline_tokens_per_s, settings.offline_reply_words,
            max_output_tokens=settings.max_output_tokens,
        )
    config = AIConfig.from_env(env)
    if settings.ai_provider == "gemini":
        if not config.gemini_api_key:
            raise ConfigError("GEMINI_API_KEY is required when SMARTEDU_AI=gemini")
        # Imported here: google-genai is heavy and only needed when Gemini is configured.
        from .gemini import GeminiProvider

        gemini = GeminiProvider(
            config.gemini_api_key,
            model=config.gemini_model,
            base_url=config.gemini_base_url,
            connect_timeout=config.connect_timeout_s,
            request_timeout=config.total_timeout_s + _BACKSTOP_S,
            max_output_tokens=settings.max_output_tokens,
            thinking_budget=settings.ai_thinking_budget,
        )
        return ResilientProvider(gemini, config.policy())
    if settings.ai_provider == "openai":
        if not config.openai_base_url:
            raise ConfigError("OPENAI_BASE_URL is required when SMARTEDU_AI=openai (e.g. http://localhost:8000/v1)")
        if not config.openai_model:
            raise ConfigError("OPENAI_MODEL is required when SMARTEDU_AI=openai")
        from .openai_compat import OpenAICompatProvider

        openai = OpenAICompatProvider(
            config.openai_base_url,
            config.openai_model,
            api_key=config.openai_api_key,
            connect_timeout=config.connect_timeout_s,
            request_timeout=config.total_timeout_s + _BACKSTOP_S,
            max_tokens=settings.max_output_tokens,
        )
        return ResilientProvider(openai, config.policy())
    raise ConfigError(f"SMARTEDU_AI={settings.ai_provider} is not available in this build")
