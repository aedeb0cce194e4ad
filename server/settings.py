"""Configuration from the environment, validated once at start; errors name the variable."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from .errors import ConfigError

AI_PROVIDERS = ("offline", "gemini", "openai")
JWT_PUBLIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")


def _default_static_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "static"


MAX_PORT = 65535


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    # A port above 65535 is not refused by the event loop: it binds the number modulo 65536.
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):  # nan passes every comparison below; inf never elapses
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.startswith(tuple(f"{s}://" for s in schemes)):
        raise ConfigError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")
    # A malformed host or port otherwise surfaces at the first connection, as the driver's traceback.
    try:
        if "+cluster://" in raw:  # host:port,host:port has no single port
            _check_cluster_url(raw)
        else:
            _ = urlsplit(raw).port
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL: {exc}") from None
    return raw


MAX_THINKING_BUDGET = 32768  # Gemini 2.5 Pro's ceiling; Flash's is lower, and Gemini says so with a 400


def _db_keepalive(env: Mapping[str, str], default: int) -> int:
    value = _int(env, "SMARTEDU_DB_KEEPALIVE_S", default)
    if 0 < value < 4:  # an idle second, then three probes a second apart
        raise ConfigError(f"SMARTEDU_DB_KEEPALIVE_S must be 0 (off) or at least 4, got {value}")
    return value


def _thinking_budget(env: Mapping[str, str], default: int | None) -> int | None:
    """Tokens a thinking model may think before answering; `none` sends no thinking settings at all (models
    that do not think, such as gemini-2.0-flash, refuse them)."""
    name = "SMARTEDU_AI_THINKING_BUDGET"
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    return None if raw == "none" else _int({name: raw}, name, 0, 0, MAX_THINKING_BUDGET)


def _check_cluster_url(url: str) -> None:
    from storage.redis_store import cluster_options

    cluster_options(url)


def _cluster_url(raw: str) -> str:
    """REDIS_CLUSTER_URLS, `[redis[s]://][user:password@]host:port,...` (some of the cluster's masters; the
    client discovers the rest), as one `redis[s]+cluster://` URL. The seeds are one cluster: they must agree
    on TLS, credentials and options, or some connections would fail, or silently go in plain text."""
    try:
        seeds = [urlsplit(s if "://" in s else f"redis://{s}") for s in (s.strip() for s in raw.split(",")) if s]
        for seed in seeds:
            if seed.scheme not in ("redis", "rediss"):
                raise ConfigError(
                    f"REDIS_CLUSTER_URLS entries must be host:port, redis://... or rediss://..., got {seed.scheme}://"
                )
        first = seeds[0]
        for seed in seeds[1:]:
            differs = [
                what for what, mine, theirs in zip(_SEED_PARTS, _seed_shape(seed), _seed_shape(first), strict=True)
                if mine != theirs
            ]
            if differs:
                raise ConfigError(
                    f"REDIS_CLUSTER_URLS: the seeds of one cluster must agree on scheme, credentials and options; "
                    f"{_seed_host(seed)} differs from {_seed_host(first)} in its {', '.join(differs)}"
                )
        userinfo, at, _ = first.netloc.rpartition("@")
        hosts = ",".join(_seed_host(seed) for seed in seeds)
        url = f"{first.scheme}+cluster://{userinfo}{at}{hosts}{first.path}" + (f"?{first.query}" if first.query else "")
        _check_cluster_url(url)
    except ValueError as exc:
        raise ConfigError(f"REDIS_CLUSTER_URLS is not valid: {exc}") from None
    return url


_SEED_PARTS = ("scheme (redis:// or rediss://)", "user name", "password", "database", "options")


def _seed_shape(seed: SplitResult) -> tuple[str, ...]:
    return (
        seed.scheme, unquote(seed.username or ""), unquote(seed.password or ""), seed.path.strip("/") or "0",
        seed.query,
    )


def _seed_host(seed: SplitResult) -> str:
    return seed.netloc.rpartition("@")[2]


def _session_key(env: Mapping[str, str]) -> str | None:
    raw = env.get("SMARTEDU_SESSION_KEY", "").strip()
    if not raw:
        return None
    from .websession import session_key

    try:
        session_key(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return raw


def _origin(entry: str) -> str:
    """An allowed origin as browsers send it (lower case, no default port), or *; anything else is refused:
    origins are compared as strings, so `https://lms.example.edu/moodle` or `...:443` would never match."""
    if entry == "*":
        return entry
    parts = urlsplit(entry)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or port == -1
        or parts.path.strip("/") or parts.query or parts.fragment
    ):
        raise ConfigError(
            f"SMARTEDU_ALLOWED_ORIGINS entries must be origins (http(s)://host[:port], no path) or *, got {entry!r}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


DEFAULT_MAX_TOKEN_LIFETIME_S = 24 * 3600


def max_token_lifetime(env: Mapping[str, str]) -> int:
    """SMARTEDU_MAX_TOKEN_LIFETIME_S (also read by the load tester, which mints tokens the server must accept)."""
    return _int(env, "SMARTEDU_MAX_TOKEN_LIFETIME_S", DEFAULT_MAX_TOKEN_LIFETIME_S, 60)


def _static_dir(env: Mapping[str, str]) -> Path:
    raw = env.get("SMARTEDU_STATIC_DIR", "").strip()
    if not raw:
        return _default_static_dir()
    # A typo here otherwise shows only as 404s for the pages and 500s for /embed and LTI launches.
    if not Path(raw).is_dir():
        raise ConfigError(f"SMARTEDU_STATIC_DIR must be an existing directory, got {raw!r}")
    return Path(raw)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to run; built by `from_env` or directly in tests."""

    # Out of the repr: the URLs carry passwords.
    database_url: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    ai_provider: str = "offline"
    data_dir: Path = Path(".smartedu")
    static_dir: Path = field(default_factory=_default_static_dir)
    allowed_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    max_message_chars: int = 4000
    max_frame_bytes: int = 64 * 1024
    messages_per_minute: int = 20
    hello_timeout: float = 10.0
    # Seconds the server may spend on one `hello` (a database connection's wait included) before it answers
    # `busy` and closes with 1013: below the clients' own limits (loadtest 10 s, the widget 15 s).
    hello_deadline: float = 8.0
    history_messages: int = 20
    history_page_max: int = 100
    frame_interval_ms: float = 100.0
    offline_ttft_ms: float = 300.0
    offline_tokens_per_s: float = 40.0
    offline_reply_words: int | None = None
    redis_prefix: str = "smartedu:"
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    stream_maxlen: int = 2000
    stream_ttl_s: int = 3600
    log_level: str = "INFO"
    log_content: bool = False
    db_pool_min: int = 2
    db_pool_max: int = 10
    # How long opening a PostgreSQL connection may take: an unreachable host (a fail-over under way) then
    # costs a request this long, not asyncpg's default of a minute.
    db_connect_timeout_s: float = 5.0
    # TCP keepalive on PostgreSQL connections: one whose server vanished without a word (a fail-over) is
    # given up after about this many seconds; 0 switches keepalive off.
    db_keepalive_s: int = 12  # as storage.postgres.DB_KEEPALIVE_S, for pools made without settings
    drain_seconds: float = 20.0
    tenant_daily_tokens: int = 5_000_000
    user_daily_tokens: int = 100_000
    max_output_tokens: int = 1024
    # Gemini only (sent as thinkingConfig.thinkingBudget): 0 turns thinking off where the model allows it.
    ai_thinking_budget: int | None = 1024
    grounding_chars: int = 6000
    grounding_passages: int = 4
    max_course_documents: int = 1000
    metrics_port: int | None = None
    session_key: str | None = field(default=None, repr=False)
    session_ttl_s: int = 8 * 3600
    # The longest lifetime (exp - iat, or exp - now without iat) a token may have: a leaked token with exp
    # a year away would otherwise work for a year.
    max_token_lifetime_s: int = DEFAULT_MAX_TOKEN_LIFETIME_S
    metrics_host: str | None = None
    # False where a separate, more privileged step (the Kubernetes Job, `smartedu migrate`) migrates: the
    # app then only checks, read-only, that no migration is pending, and refuses to start otherwise.
    migrate_on_start: bool = True

    @property
    def output_reserve(self) -> int:
        """The most output one answer can be billed for: Gemini's thoughts come on top of the answer."""
        thinking = (self.ai_thinking_budget or 0) if self.ai_provider == "gemini" else 0
        return self.max_output_tokens + thinking

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the SMARTEDU_* (and DATABASE_URL, REDIS_URL, GEMINI_*) variables."""
        env = os.environ if env is None else env
        secret = env.get("SMARTEDU_JWT_SECRET") or None
        public_key = env.get("SMARTEDU_JWT_PUBLIC_KEY") or None
        if secret and public_key:
            raise ConfigError("set only one of SMARTEDU_JWT_SECRET and SMARTEDU_JWT_PUBLIC_KEY")
        if secret is not None and len(secret) < 32:
            raise ConfigError("SMARTEDU_JWT_SECRET must be at least 32 characters")
        algorithm = env.get("SMARTEDU_JWT_ALGORITHM", "").strip() or ("RS256" if public_key else "HS256")
        if public_key and algorithm not in JWT_PUBLIC_ALGORITHMS:
            raise ConfigError(f"SMARTEDU_JWT_ALGORITHM must be one of {', '.join(JWT_PUBLIC_ALGORITHMS)}")
        if secret and algorithm != "HS256":
            raise ConfigError("SMARTEDU_JWT_ALGORITHM must be HS256 with SMARTEDU_JWT_SECRET")
        if public_key and "BEGIN" not in public_key:
            raise ConfigError("SMARTEDU_JWT_PUBLIC_KEY must be a PEM public key")

        default_ai = "gemini" if env.get("GEMINI_API_KEY") else "offline"
        ai = (env.get("SMARTEDU_AI") or default_ai).strip().lower()
        if ai not in AI_PROVIDERS:
            raise ConfigError(f"SMARTEDU_AI must be one of {', '.join(AI_PROVIDERS)}, got {ai!r}")

        origins = tuple(_origin(o.strip()) for o in env.get("SMARTEDU_ALLOWED_ORIGINS", "").split(",") if o.strip())

        level = env.get("SMARTEDU_LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"SMARTEDU_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")

        redis_url = _url(env, "REDIS_URL", ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"))
        if redis_url is None and env.get("REDIS_CLUSTER_URLS", "").strip():
            redis_url = _cluster_url(env["REDIS_CLUSTER_URLS"])
        defaults = cls()
        lifetime = max_token_lifetime(env)
        settings = cls(
            database_url=_url(env, "DATABASE_URL", ("postgres", "postgresql")),
            redis_url=redis_url,
            jwt_secret=secret,
            jwt_public_key=public_key,
            jwt_algorithm=algorithm,
            jwt_issuer=env.get("SMARTEDU_JWT_ISSUER") or None,
            jwt_audience=env.get("SMARTEDU_JWT_AUDIENCE") or None,
            ai_provider=ai,
            data_dir=Path(env.get("SMARTEDU_DATA_DIR") or ".smartedu"),
            static_dir=_static_dir(env),
            allowed_origins=origins,
            host=env.get("SMARTEDU_HOST") or defaults.host,
            port=_int(env, "SMARTEDU_PORT", defaults.port, 0, MAX_PORT),
            public_url=(_url(env, "SMARTEDU_PUBLIC_URL", ("http", "https")) or "").rstrip("/") or None,
            max_message_chars=_int(env, "SMARTEDU_MAX_MESSAGE_CHARS", defaults.max_message_chars, 1),
            messages_per_minute=_int(env, "SMARTEDU_MESSAGES_PER_MINUTE", defaults.messages_per_minute, 1),
            hello_timeout=_float(env, "SMARTEDU_HELLO_TIMEOUT", defaults.hello_timeout, 0.1),
            hello_deadline=_float(env, "SMARTEDU_HELLO_DEADLINE", defaults.hello_deadline, 0.1),
            frame_interval_ms=_float(env, "SMARTEDU_FRAME_INTERVAL_MS", defaults.frame_interval_ms),
            offline_ttft_ms=_float(env, "SMARTEDU_OFFLINE_TTFT_MS", defaults.offline_ttft_ms),
            offline_tokens_per_s=_float(env, "SMARTEDU_OFFLINE_TOKENS_PER_S", defaults.offline_tokens_per_s),
            offline_reply_words=_int(env, "SMARTEDU_OFFLINE_REPLY_WORDS", 0) or None,
            redis_prefix=env.get("SMARTEDU_REDIS_PREFIX", defaults.redis_prefix),
            replica_id=env.get("SMARTEDU_REPLICA_ID") or defaults.replica_id,
            log_level=level,
            log_content=_bool(env, "SMARTEDU_LOG_CONTENT", False),
            db_pool_min=_int(env, "SMARTEDU_DB_POOL_MIN", defaults.db_pool_min, 1),
            db_pool_max=_int(env, "SMARTEDU_DB_POOL_MAX", defaults.db_pool_max, 1),
            db_connect_timeout_s=_float(env, "SMARTEDU_DB_CONNECT_TIMEOUT_S", defaults.db_connect_timeout_s, 0.1),
            db_keepalive_s=_db_keepalive(env, defaults.db_keepalive_s),
            drain_seconds=_float(env, "SMARTEDU_DRAIN_SECONDS", defaults.drain_seconds),
            tenant_daily_tokens=_int(env, "SMARTEDU_TENANT_DAILY_TOKENS", defaults.tenant_daily_tokens),
            user_daily_tokens=_int(env, "SMARTEDU_USER_DAILY_TOKENS", defaults.user_daily_tokens),
            max_output_tokens=_int(env, "SMARTEDU_AI_MAX_OUTPUT_TOKENS", defaults.max_output_tokens, 1),
            ai_thinking_budget=_thinking_budget(env, defaults.ai_thinking_budget),
            grounding_chars=_int(env, "SMARTEDU_GROUNDING_CHARS", defaults.grounding_chars),
            grounding_passages=_int(env, "SMARTEDU_GROUNDING_PASSAGES", defaults.grounding_passages),
            max_course_documents=_int(env, "SMARTEDU_MAX_COURSE_DOCUMENTS", defaults.max_course_documents, 1),
            # Off unless set (the container images set 9100), so several local replicas never clash.
            metrics_port=(
                _int(env, "SMARTEDU_METRICS_PORT", -1, 0, MAX_PORT) if env.get("SMARTEDU_METRICS_PORT") else None
            ),
            metrics_host=env.get("SMARTEDU_METRICS_HOST") or None,
            session_key=_session_key(env),
            # A cookie session is a credential too: by default it lasts no longer than a token may.
            session_ttl_s=_int(env, "SMARTEDU_SESSION_TTL_S", min(defaults.session_ttl_s, lifetime), 60),
            max_token_lifetime_s=lifetime,
            migrate_on_start=_bool(env, "SMARTEDU_MIGRATE_ON_START", defaults.migrate_on_start),
        )
        if settings.db_pool_min > settings.db_pool_max:
            raise ConfigError(
                f"SMARTEDU_DB_POOL_MIN ({settings.db_pool_min}) must not exceed SMARTEDU_DB_POOL_MAX "
                f"({settings.db_pool_max})"
            )
        if settings.session_ttl_s > settings.max_token_lifetime_s:
            raise ConfigError(
                f"SMARTEDU_SESSION_TTL_S ({settings.session_ttl_s}) must not exceed SMARTEDU_MAX_TOKEN_LIFETIME_S "
                f"({settings.max_token_lifetime_s})"
            )
        # The frame limit leaves room for JSON escaping of a maximal message (up to 6 bytes a char).
        return replace(settings, max_frame_bytes=max(64 * 1024, settings.max_message_chars * 6 + 1024))

    def require_auth(self) -> None:
        if not self.jwt_secret and not self.jwt_public_key:
            raise ConfigError("set SMARTEDU_JWT_SECRET (HS256) or SMARTEDU_JWT_PUBLIC_KEY (RS256/ES256)")

    def require_services(self) -> tuple[str, str]:
        if self.database_url is None:
            raise ConfigError("DATABASE_URL is not set")
        if self.redis_url is None:
            raise ConfigError("REDIS_URL is not set")
        return self.database_url, self.redis_url
