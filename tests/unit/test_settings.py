"""Configuration is validated at start, and every error names its variable."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from server.errors import ConfigError
from server.origins import origin_allowed
from server.settings import Settings
from storage.redis_store import cluster_options

SECRET = "s" * 40


def test_defaults_are_embedded_offline() -> None:
    settings = Settings.from_env({})
    assert settings.embedded and settings.ai_provider == "offline"
    assert settings.max_message_chars == 4000 and settings.messages_per_minute == 20
    assert settings.max_frame_bytes >= settings.max_message_chars * 6


def test_gemini_is_default_when_a_key_is_set() -> None:
    assert Settings.from_env({"GEMINI_API_KEY": "k"}).ai_provider == "gemini"
    assert Settings.from_env({"GEMINI_API_KEY": "k", "SMARTEDU_AI": "offline"}).ai_provider == "offline"


def test_full_configuration() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@db/smartedu",
            "REDIS_URL": "redis://cache:6379/0",
            "SMARTEDU_JWT_SECRET": SECRET,
            "SMARTEDU_JWT_ISSUER": "https://idp.example",
            "SMARTEDU_ALLOWED_ORIGINS": "https://a.example, https://b.example/",
            "SMARTEDU_MAX_MESSAGE_CHARS": "500",
            "SMARTEDU_MESSAGES_PER_MINUTE": "5",
        }
    )
    assert not settings.embedded
    assert settings.require_services() == ("postgresql://u@db/smartedu", "redis://cache:6379/0")
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.max_message_chars, settings.messages_per_minute, settings.jwt_algorithm) == (500, 5, "HS256")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"SMARTEDU_JWT_SECRET": "short"}, "SMARTEDU_JWT_SECRET"),
        ({"SMARTEDU_JWT_SECRET": SECRET, "SMARTEDU_JWT_PUBLIC_KEY": "-----BEGIN"}, "SMARTEDU_JWT_PUBLIC_KEY"),
        ({"SMARTEDU_JWT_PUBLIC_KEY": "not pem"}, "SMARTEDU_JWT_PUBLIC_KEY"),
        ({"SMARTEDU_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "SMARTEDU_JWT_ALGORITHM": "HS256"},
         "SMARTEDU_JWT_ALGORITHM"),
        ({"SMARTEDU_AI": "skynet"}, "SMARTEDU_AI"),
        ({"SMARTEDU_ALLOWED_ORIGINS": "lms.example"}, "SMARTEDU_ALLOWED_ORIGINS"),
        ({"SMARTEDU_PORT": "eighty"}, "SMARTEDU_PORT"),
        ({"SMARTEDU_MAX_MESSAGE_CHARS": "0"}, "SMARTEDU_MAX_MESSAGE_CHARS"),
        ({"SMARTEDU_MESSAGES_PER_MINUTE": "-1"}, "SMARTEDU_MESSAGES_PER_MINUTE"),
        ({"SMARTEDU_OFFLINE_TTFT_MS": "soon"}, "SMARTEDU_OFFLINE_TTFT_MS"),
        ({"SMARTEDU_LOG_LEVEL": "LOUD"}, "SMARTEDU_LOG_LEVEL"),
        ({"SMARTEDU_LOG_CONTENT": "maybe"}, "SMARTEDU_LOG_CONTENT"),
        ({"SMARTEDU_MIGRATE_ON_START": "sometimes"}, "SMARTEDU_MIGRATE_ON_START"),
        ({"SMARTEDU_PORT": "70000"}, "SMARTEDU_PORT"),
        ({"SMARTEDU_METRICS_PORT": "65536"}, "SMARTEDU_METRICS_PORT"),
        ({"SMARTEDU_HELLO_TIMEOUT": "nan"}, "SMARTEDU_HELLO_TIMEOUT"),
        ({"SMARTEDU_HELLO_DEADLINE": "0"}, "SMARTEDU_HELLO_DEADLINE"),
        ({"SMARTEDU_DRAIN_SECONDS": "inf"}, "SMARTEDU_DRAIN_SECONDS"),
        ({"SMARTEDU_DB_POOL_MIN": "20", "SMARTEDU_DB_POOL_MAX": "5"}, "SMARTEDU_DB_POOL_MIN"),
        ({"SMARTEDU_DB_KEEPALIVE_S": "2"}, "SMARTEDU_DB_KEEPALIVE_S"),
        ({"SMARTEDU_DB_KEEPALIVE_S": "-1"}, "SMARTEDU_DB_KEEPALIVE_S"),
        ({"SMARTEDU_PUBLIC_URL": "chat.example.edu"}, "SMARTEDU_PUBLIC_URL"),
        ({"SMARTEDU_STATIC_DIR": "/no/such/static/dir"}, "SMARTEDU_STATIC_DIR"),
        ({"DATABASE_URL": "postgresql://db:abc/smartedu"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://[db/smartedu"}, "DATABASE_URL"),
        ({"REDIS_URL": "redis://cache:abc/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:70000/0"}, "REDIS_URL"),
        ({"SMARTEDU_ALLOWED_ORIGINS": "https://lms.example.edu/moodle"}, "SMARTEDU_ALLOWED_ORIGINS"),
        ({"SMARTEDU_ALLOWED_ORIGINS": "https://lms.example.edu:99999"}, "SMARTEDU_ALLOWED_ORIGINS"),
        ({"SMARTEDU_ALLOWED_ORIGINS": "https://"}, "SMARTEDU_ALLOWED_ORIGINS"),
        ({"SMARTEDU_MAX_TOKEN_LIFETIME_S": "30"}, "SMARTEDU_MAX_TOKEN_LIFETIME_S"),
        ({"SMARTEDU_MAX_TOKEN_LIFETIME_S": "3600", "SMARTEDU_SESSION_TTL_S": "3601"},
         "SMARTEDU_SESSION_TTL_S .3601. must not exceed"),
        ({"SMARTEDU_AI_MAX_OUTPUT_TOKENS": "0"}, "SMARTEDU_AI_MAX_OUTPUT_TOKENS"),
        ({"SMARTEDU_AI_MAX_OUTPUT_TOKENS": "lots"}, "SMARTEDU_AI_MAX_OUTPUT_TOKENS"),
        ({"SMARTEDU_AI_THINKING_BUDGET": "-1"}, "SMARTEDU_AI_THINKING_BUDGET"),
        ({"SMARTEDU_AI_THINKING_BUDGET": "a little"}, "SMARTEDU_AI_THINKING_BUDGET"),
        ({"SMARTEDU_AI_THINKING_BUDGET": "100000"}, "SMARTEDU_AI_THINKING_BUDGET"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_token_lifetime_cap_defaults_to_a_day_and_bounds_the_session_default() -> None:
    assert Settings.from_env({}).max_token_lifetime_s == 86400
    assert Settings.from_env({}).session_ttl_s == 8 * 3600
    capped = Settings.from_env({"SMARTEDU_MAX_TOKEN_LIFETIME_S": "3600"})
    assert (capped.max_token_lifetime_s, capped.session_ttl_s) == (3600, 3600)


def test_missing_auth_and_services_are_named() -> None:
    settings = Settings.from_env({})
    with pytest.raises(ConfigError, match="SMARTEDU_JWT_SECRET"):
        settings.require_auth()
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        settings.require_services()


def test_frame_interval_defaults_to_100_ms_and_names_its_variable() -> None:
    assert Settings.from_env({}).frame_interval_ms == 100
    assert Settings.from_env({"SMARTEDU_FRAME_INTERVAL_MS": "40"}).frame_interval_ms == 40
    with pytest.raises(ConfigError, match="SMARTEDU_FRAME_INTERVAL_MS"):
        Settings.from_env({"SMARTEDU_FRAME_INTERVAL_MS": "soon"})


def test_replicas_migrate_on_start_unless_told_not_to() -> None:
    assert Settings.from_env({}).migrate_on_start is True
    assert Settings.from_env({"SMARTEDU_MIGRATE_ON_START": ""}).migrate_on_start is True
    assert Settings.from_env({"SMARTEDU_MIGRATE_ON_START": "false"}).migrate_on_start is False


def test_content_is_logged_only_when_switched_on() -> None:
    assert Settings.from_env({}).log_content is False
    assert Settings.from_env({"SMARTEDU_LOG_CONTENT": ""}).log_content is False
    assert Settings.from_env({"SMARTEDU_LOG_CONTENT": "true"}).log_content is True


def test_ports_span_the_whole_range_and_public_url_keeps_its_scheme() -> None:
    settings = Settings.from_env(
        {"SMARTEDU_PORT": "65535", "SMARTEDU_METRICS_PORT": "0", "SMARTEDU_PUBLIC_URL": "https://chat.example.edu/"}
    )
    assert (settings.port, settings.metrics_port, settings.public_url) == (65535, 0, "https://chat.example.edu")


def test_static_dir_is_taken_when_it_exists(tmp_path: Path) -> None:
    assert Settings.from_env({"SMARTEDU_STATIC_DIR": str(tmp_path)}).static_dir == tmp_path
    assert (Settings.from_env({}).static_dir / "chat.html").is_file()


def test_allowed_origins_are_written_as_browsers_send_them() -> None:
    # Origins are compared as strings: before, these entries were kept as written and never matched.
    settings = Settings.from_env(
        {"SMARTEDU_ALLOWED_ORIGINS": "HTTPS://LMS.Example.edu:443/, http://localhost:8000, http://[::1]:80, *"}
    )
    assert settings.allowed_origins == ("https://lms.example.edu", "http://localhost:8000", "http://[::1]", "*")
    assert origin_allowed("https://lms.example.edu", "chat.example.edu", settings.allowed_origins[:1])


def test_urls_without_a_single_port_are_still_taken() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql:///smartedu?host=/run/postgresql", "REDIS_URL": "redis+cluster://a:7000,b:7001"}
    )
    assert settings.require_services() == ("postgresql:///smartedu?host=/run/postgresql", "redis+cluster://a:7000,b:7001")
    assert Settings.from_env({"REDIS_CLUSTER_URLS": "a:7000, b:7001"}).redis_url == "redis+cluster://a:7000,b:7001"


def test_output_limits_and_what_an_answer_reserves() -> None:
    settings = Settings.from_env({})
    assert (settings.max_output_tokens, settings.ai_thinking_budget) == (1024, 1024)
    gemini = {"GEMINI_API_KEY": "k", "SMARTEDU_AI_MAX_OUTPUT_TOKENS": "800"}
    # Gemini bills its thoughts as output, so an answer can cost its limit plus the thinking budget.
    assert Settings.from_env({**gemini, "SMARTEDU_AI_THINKING_BUDGET": "300"}).output_reserve == 1100
    off = Settings.from_env({**gemini, "SMARTEDU_AI_THINKING_BUDGET": "0"})
    assert (off.ai_thinking_budget, off.output_reserve) == (0, 800)
    unset = Settings.from_env({**gemini, "SMARTEDU_AI_THINKING_BUDGET": "None"})  # no thinkingConfig at all
    assert (unset.ai_thinking_budget, unset.output_reserve) == (None, 800)
    assert Settings.from_env({**gemini, "SMARTEDU_AI": "offline"}).output_reserve == 800  # only Gemini thinks


def test_cluster_seeds_keep_tls_credentials_and_options() -> None:
    # Before, "rediss://" was left in the host list and credentials made the port unparsable.
    seeds = "rediss://app:p%40ss@10.0.0.1:7000/?ssl_ca_certs=/ca.pem, rediss://app:p%40ss@10.0.0.2:7001/?ssl_ca_certs=/ca.pem"
    url = Settings.from_env({"REDIS_CLUSTER_URLS": seeds}).redis_url
    assert url == "rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2:7001/?ssl_ca_certs=/ca.pem"
    assert cluster_options(url) == (
        [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
        {"username": "app", "password": "p@ss", "ssl": True, "ssl_ca_certs": "/ca.pem"},
    )
    assert cluster_options("redis+cluster://:pw@a:7000,[::1]:7001,b") == (
        [("a", 7000), ("::1", 7001), ("b", 6379)], {"password": "pw"}
    )
    assert Settings.from_env({"REDIS_URL": "rediss+cluster://:pw@a:7000,b:7001"}).redis_url is not None


@pytest.mark.parametrize(
    ("seeds", "differs"),
    [
        ("redis://:hunter2-secret@a:7000, redis://:other-secret@b:7001", "password"),
        ("rediss://:hunter2-secret@a:7000, b:7001", "scheme (redis:// or rediss://), password"),
        ("redis://ann:hunter2-secret@a:7000, redis://bob:hunter2-secret@b:7001", "user name"),
        ("rediss://a:7000/?ssl_ca_certs=/ca.pem, rediss://b:7001", "options"),
    ],
)
def test_cluster_seeds_that_disagree_are_refused_without_showing_the_password(seeds: str, differs: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_CLUSTER_URLS") as raised:
        Settings.from_env({"REDIS_CLUSTER_URLS": seeds})
    assert str(raised.value).endswith(f"b:7001 differs from a:7000 in its {differs}")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_CLUSTER_URLS": "a:7000, b:port"}, "REDIS_CLUSTER_URLS is not valid: 'b:port' is not host:port"),
        ({"REDIS_CLUSTER_URLS": "http://a:7000"}, "REDIS_CLUSTER_URLS entries must be host:port"),
        ({"REDIS_CLUSTER_URLS": "redis://a:7000/2"}, "REDIS_CLUSTER_URLS is not valid: .* only database 0"),
        ({"REDIS_CLUSTER_URLS": "redis://a:7000/?ssl_ca_certs=/ca.pem"}, "ssl_\\* options need rediss\\+cluster://"),
        ({"REDIS_URL": "rediss+cluster://:pw@a:7000?ssl_ca_cert=/ca.pem"}, "REDIS_URL .* option\\(s\\) ssl_ca_cert"),
        ({"REDIS_URL": "redis+cluster://a:7000,"}, "REDIS_URL .* '' is not host:port"),
    ],
)
def test_bad_cluster_urls_are_refused_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_settings_repr_hides_the_service_passwords() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://app:db-pw-9f3@db/smartedu", "REDIS_CLUSTER_URLS": "redis://:redis-pw-7c1@a:7000"}
    )
    assert "db-pw-9f3" not in repr(settings) and "redis-pw-7c1" not in repr(settings)


def test_settings_repr_hides_the_signing_secrets() -> None:
    key = base64.urlsafe_b64encode(b"k" * 32).decode()
    settings = Settings.from_env({"SMARTEDU_JWT_SECRET": "jwt-" + "s" * 60, "SMARTEDU_SESSION_KEY": key})
    assert settings.jwt_secret and "jwt-sss" not in repr(settings)
    assert settings.session_key == key and key not in repr(settings)
