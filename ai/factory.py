"""Choose and build the configured provider; the app factory owns its lifetime."""

from __future__ import annotations

from collections.abc import Mapping

from server.errors import ConfigError
from server.settings import Settings

from .base import Provider
from .offline import OfflineProvider


def create_provider(settings: Settings, env: Mapping[str, str]) -> Provider:
    """Build the provider named by `settings.ai_provider`; errors name the missing variable."""
    if settings.ai_provider == "offline":
        return OfflineProvider(settings.offline_ttft_ms, settings.offline_tokens_per_s)
    raise ConfigError(f"SMARTEDU_AI={settings.ai_provider} is not available in this build")
