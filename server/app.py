"""The composition root: `create_app(settings)` wires every resource as a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import uuid
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp_cors
import asyncpg
from aiohttp import web

from ai.base import Provider
from ai.factory import create_provider
from ai.openai_compat import OpenAICompatProvider
from ai.resilience import ResilientProvider
from handlers import api, documents, health, lti, pages, sessions, teacher, ws
from storage.errors import StorageError
from storage.keys import Keys
from storage.postgres import Database, connect_pool, probe_connector
from storage.redis_store import RedisStore, connect_redis
from storage.schema_check import pending_migrations

from .auth import TokenVerifier
from .chat import ChatService
from .cors import TenantOrigins, tenant_cors_middleware
from .errors import ChatError, CloseCode, ConfigError, ErrorCode, from_storage
from .hub import Hub
from .keys import CHAT, DATABASE, LTI_KEYS, METRICS, PROVIDER, REDIS, SETTINGS, SOCKETS, STATE, VERIFIER, ProcessState
from .logs import request_id
from .lti import JwksCache
from .metrics import Metrics, measure_loop_lag, serve_metrics
from .peer import WebSocketPeer
from .settings import Settings
from .tasks import cancel_and_wait
from .tracing import create_tracer
from .websession import new_session_key, setup_sessions

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Storage calls timed by the metrics (the hot ones; the storage modules stay free of metrics code).
DB_TIMED = ("upsert_user", "save_question", "finish_reply", "recent_messages", "set_message_seq", "get_conversation")
REDIS_TIMED = ("emit", "admit", "snapshot", "adjust_tokens")

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.BAD_REQUEST, 413: ErrorCode.TOO_LARGE}

# The longest header value (or name) and request URL served: what aiohttp's HTTP parser allows by default.
# Its parser answers anything longer with a plain-text 400 of its own, before any middleware runs, so it is
# given PARSER_LIMIT_BYTES instead, and limit_middleware refuses what is over these with the API's JSON error.
MAX_HEADER_BYTES = 8190
MAX_URL_BYTES = 8190
PARSER_LIMIT_BYTES = 32 * 1024


@web.middleware
async def limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a request URL (414) or a header (431) over its limit, with `too_large`."""
    if len(request.raw_path.encode("utf-8", "surrogateescape")) > MAX_URL_BYTES:
        return _too_large(414, f"the request URL is longer than {MAX_URL_BYTES} bytes")
    for name, value in request.raw_headers:
        if len(value) > MAX_HEADER_BYTES or len(name) > MAX_HEADER_BYTES:
            shown = name[:64].decode("ascii", "replace")
            return _too_large(431, f"the request header {shown!r} is longer than {MAX_HEADER_BYTES} bytes")
    return await handler(request)


def _too_large(status: int, message: str) -> web.Response:
    return web.json_response({"error": ChatError(ErrorCode.TOO_LARGE, message).to_dict()}, status=status)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Accept a sane X-Request-ID (or make one), log under it, and echo it back."""
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    token = request_id.set(rid)
    try:
        response = await handler(request)
    finally:
        request_id.reset(token)
    if not response.prepared:
        response.headers["X-Request-ID"] = rid
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map domain errors (and aiohttp's own 4xx) to the JSON error body the protocol uses."""
    try:
        response = await handler(request)
    except (ChatError, StorageError) as caught:
        exc = caught if isinstance(caught, ChatError) else from_storage(caught)
        return web.json_response({"error": exc.to_dict()}, status=exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, ErrorCode.BAD_REQUEST if exc.status < 500 else ErrorCode.INTERNAL)
        return web.json_response({"error": {"code": code.value, "message": exc.reason}}, status=exc.status)
    except Exception:
        ref = uuid.uuid4().hex[:12]
        log.exception("request failed", extra={"ref": ref, "path": request.path})
        body = {"error": {"code": ErrorCode.INTERNAL.value, "message": "internal error", "ref": ref}}
        return web.json_response(body, status=500)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def create_app(
    settings: Settings, *, env: Mapping[str, str] | None = None, provider: Provider | None = None
) -> web.Application:
    """Build the application; every resource starts in a cleanup context and stops in reverse order."""
    database_url, redis_url = settings.require_services()
    # The inner error_middleware turns a handler's error into its JSON response before the schools' CORS
    # headers are added (else a school's page sees an opaque network error instead of, say, a 401); the
    # outer one answers for a failure of the CORS lookup itself.
    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            tenant_cors_middleware(TenantOrigins()),
            error_middleware,
            limit_middleware,  # inside the CORS middleware: a school's page can read why
        ],
        client_max_size=1024 * 1024,
        handler_args={"max_line_size": PARSER_LIMIT_BYTES, "max_field_size": PARSER_LIMIT_BYTES},
    )
    app[SETTINGS] = settings
    app[VERIFIER] = TokenVerifier(settings)
    app[SOCKETS] = weakref.WeakSet()
    app[STATE] = ProcessState()
    app[LTI_KEYS] = JwksCache()
    metrics = app[METRICS] = Metrics(settings.replica_id)

    async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await connect_pool(
            database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max,
            connect_timeout=settings.db_connect_timeout_s, keepalive_s=settings.db_keepalive_s,
        )
        probe = probe_connector(
            database_url, connect_timeout=settings.db_connect_timeout_s, keepalive_s=settings.db_keepalive_s
        )
        db = Database(pool, probe)
        try:
            if settings.migrate_on_start:
                await db.migrate()
            else:
                await _require_current_schema(pool)
            metrics.instrument(db, metrics.db_ops, DB_TIMED)
            metrics.watch_pool(lambda: (pool.get_size() - pool.get_idle_size(), pool.get_idle_size()))
            app[DATABASE] = db
            yield
        finally:
            with contextlib.suppress(Exception):
                await db.close_probe()
            await pool.close()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = await connect_redis(redis_url)
        try:
            store = RedisStore(
                client, Keys(settings.redis_prefix), log_maxlen=settings.stream_maxlen, log_ttl_s=settings.stream_ttl_s
            )
            metrics.instrument(store, metrics.redis_ops, REDIS_TIMED)
            app[REDIS] = store
            yield
            await store.close()
        finally:
            await client.aclose()

    async def provider_ctx(app: web.Application) -> AsyncIterator[None]:
        chosen = app[PROVIDER] = provider or create_provider(settings, os.environ if env is None else env)
        if isinstance(chosen, ResilientProvider):
            chosen.on_retry = lambda *_: metrics.ai_retries.inc()
            chosen.breaker.on_change = lambda _old, new: metrics.circuit_open.set(1 if new == "open" else 0)
        inner = chosen.inner if isinstance(chosen, ResilientProvider) else chosen
        if isinstance(inner, OpenAICompatProvider):
            inner.on_unknown_finish = lambda _reason: metrics.ai_unknown_finishes.inc()
        yield
        # ChatService.close() closes the provider after its last turn.

    async def chat_ctx(app: web.Application) -> AsyncIterator[None]:
        tracer = create_tracer(os.environ if env is None else env, settings.replica_id)
        chat = ChatService(
            settings, app[DATABASE], Hub(app[REDIS], settings.replica_id), app[PROVIDER], metrics, tracer
        )
        app[CHAT] = chat
        checks = {"postgres": app[DATABASE].ping, "redis": app[REDIS].ping}
        lag = asyncio.create_task(measure_loop_lag(metrics, checks), name="loop-lag")
        try:
            await chat.start()
            yield
        finally:
            await cancel_and_wait(lag)
            await chat.close()
            await tracer.close()

    async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
        if settings.metrics_port is None:
            yield
            return
        async with serve_metrics(metrics, settings.metrics_host or settings.host, settings.metrics_port) as port:
            app[STATE].metrics_port = port
            yield

    app.cleanup_ctx.extend([metrics_ctx, postgres_ctx, redis_ctx, provider_ctx, chat_ctx])
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(pages.protect_html)
    if settings.session_key is None:
        log.warning(
            "SMARTEDU_SESSION_KEY is not set: cookie sessions are signed with a key of this process only, so "
            "they end when it restarts and fail on other replicas (docs/deploy.md says how to make one)"
        )
    setup_sessions(app, settings.session_key or new_session_key(), settings.session_ttl_s)

    app.router.add_get("/health", health.health)
    app.router.add_get("/ready", health.ready)
    app.router.add_get("/ws", ws.websocket)
    app.router.add_get("/api/conversations", api.list_conversations)
    app.router.add_get("/api/conversations/{conversation_id}/messages", api.list_messages)
    app.router.add_get("/api/courses/{course_id}/live", api.live_course)
    app.router.add_post("/api/courses/{course_id}/documents", documents.add_document)
    app.router.add_get("/api/courses/{course_id}/documents", documents.list_documents)
    app.router.add_get("/api/courses/{course_id}/documents/{document_id}", documents.get_document)
    app.router.add_put("/api/courses/{course_id}/documents/{document_id}", documents.replace_document)
    app.router.add_delete("/api/courses/{course_id}/documents/{document_id}", documents.delete_document)
    app.router.add_get("/", pages.chat_page)
    app.router.add_get("/chat", pages.chat_page)
    app.router.add_get("/embed", pages.embed_page)
    app.router.add_get("/teacher", pages.teacher_page)
    app.router.add_get("/api/teacher/courses", teacher.teacher_courses)
    app.router.add_get("/api/teacher/conversations/{conversation_id}/messages", teacher.teacher_messages)
    app.router.add_post("/api/session", sessions.create_session)
    app.router.add_get("/api/session", sessions.current_session)
    app.router.add_delete("/api/session", sessions.delete_session)
    app.router.add_get("/lti/login", lti.login, allow_head=False)
    app.router.add_post("/lti/login", lti.login)
    app.router.add_post("/lti/launch", lti.launch)
    if settings.static_dir.is_dir():
        app.router.add_get("/static/{path:.+}", pages.static_file)
    _setup_cors(app, settings)
    return app


async def _require_current_schema(pool: asyncpg.Pool) -> None:
    """Refuse to start on a schema older than this build (SMARTEDU_MIGRATE_ON_START=false)."""
    pending = await pending_migrations(pool)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise ConfigError(
            f"the database lacks migrations {names}: run `smartedu migrate` (the migration Job) first; "
            "SMARTEDU_MIGRATE_ON_START=false keeps this replica from applying them itself"
        )


def _setup_cors(app: web.Application, settings: Settings) -> None:
    """Credentialed CORS for the REST API from the origins configured by name. `*` gets CORS without
    credentials from the tenant middleware (server/cors.py): a credentialed `*` lets any site call the API
    with the user's cookie session."""
    origins = [o for o in settings.allowed_origins if o != "*"]
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=True,
        expose_headers=("X-Request-ID",),
        allow_headers=("Authorization", "Content-Type", "X-CSRF-Token", "X-Request-ID"),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={o: options for o in origins})
    for route in list(app.router.routes()):
        if route.resource is not None and route.resource.canonical.startswith("/api/"):
            cors.add(route)


async def _close_sockets(app: web.Application) -> None:
    # 1012: the service is restarting, so clients reconnect (to another replica) at once.
    # All at once: each close waits for the client's reply, and one after the other a replica with 10,000
    # sockets took longer to stop than an orchestrator's grace period. A client that does not answer within
    # SHUTDOWN_CLOSE_TIMEOUT_S is dropped: aiohttp alone would wait its close timeout (10 s), past the stop
    # deadline, and the cleanup after this (interrupted answers, pools) would be given up on.
    sockets: weakref.WeakSet[WebSocketPeer] = app[SOCKETS]
    await asyncio.gather(
        *(
            peer.close(CloseCode.SERVICE_RESTART, "server restarting", timeout=SHUTDOWN_CLOSE_TIMEOUT_S)
            for peer in list(sockets)
        ),
        return_exceptions=True,
    )


# How long a client gets to answer the close at shutdown (healthy ones answer within milliseconds).
SHUTDOWN_CLOSE_TIMEOUT_S = 2.0

# How long stopping may take once it starts (closing sockets, committing interrupted answers, closing the
# pools): inside the margin compose (10 s) and the Kubernetes manifests (15 s) leave after the drain.
STOP_DEADLINE_S = 8.0


async def stop(runner: web.BaseRunner, deadline_s: float = STOP_DEADLINE_S) -> bool:
    """Clean up the app within `deadline_s`; True when it finished.

    Past the deadline, log what was still pending (for the next investigation) and give up so the process
    exits before the orchestrator's SIGKILL: acknowledged messages are committed already, and other
    replicas take over answers whose lease lapses.
    """
    cleanup = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=deadline_s)
    if done:
        cleanup.result()
        return True
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]  # the cleanup first of all
    log.error(
        "stopping took longer than its deadline; exiting with work pending",
        extra={"deadline_s": deadline_s, "pending_tasks": len(pending), "pending": _describe(pending)},
    )
    cleanup.cancel()
    await asyncio.wait({cleanup}, timeout=1.0)
    return False


def _describe(tasks: list[asyncio.Task[object]], most: int = 10) -> list[str]:
    """The most common places pending tasks wait at: "count x name at file:line function"."""
    places = Counter(f"{task.get_name().rstrip('0123456789-')} at {_innermost(task)}" for task in tasks)
    return [f"{n} x {place}" for place, n in places.most_common(most)]


def _innermost(task: asyncio.Task[object]) -> str:
    """Where a suspended task waits: the innermost coroutine of its await chain outside asyncio and
    contextlib, and the innermost of all (Task.get_stack shows only the outermost one)."""
    places: list[tuple[str, bool]] = []
    awaited: object = task.get_coro()
    for _ in range(100):
        if awaited is None:
            break
        if type(awaited).__name__ == "async_generator_asend":
            # `await anext(gen)` (contextlib, cleanup contexts): the generator is only reachable this way.
            awaited = next((o for o in gc.get_referents(awaited) if hasattr(o, "ag_frame")), None)
            continue
        frame = next((getattr(awaited, a) for a in ("cr_frame", "gi_frame", "ag_frame") if getattr(awaited, a, None)),
                     None)
        if frame is not None:
            path = frame.f_code.co_filename
            plumbing = f"{os.sep}asyncio{os.sep}" in path or path.endswith("contextlib.py")
            places.append((f"{frame.f_code.co_name} ({os.path.basename(path)}:{frame.f_lineno})", plumbing))
        awaited = next((getattr(awaited, a) for a in ("cr_await", "gi_yieldfrom", "ag_await")
                        if getattr(awaited, a, None) is not None), None)
    if not places:
        return "?"
    ours = [place for place, plumbing in places if not plumbing]
    innermost = places[-1][0]
    if ours and ours[-1] != innermost:
        return f"{ours[-1]} > {innermost}"
    return innermost


async def drain(app: web.Application, deadline_s: float) -> None:
    """Turn /ready to 503, refuse new sockets, tell clients to reconnect, let answers finish."""
    app[STATE].draining = True
    await app[CHAT].drain(deadline_s)
