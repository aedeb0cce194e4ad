"""The `smartedu` command: serve, migrate, token, seed-demo, tenant, lti, the data lifecycle, cluster, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace

import asyncpg
import redis.exceptions
from aiohttp import web

from . import __version__, lifecycle_cli, lti_cli, tenant_cli
from .auth import ROLES, mint_token
from .embedded import EmbeddedError, EmbeddedServices, dev_session_key, jwt_secret
from .errors import ConfigError
from .logs import configure_logging
from .settings import MAX_PORT, Settings

# Allocations between young-generation collections (CPython's default is 700): a streaming frame allocates
# a few dozen objects, so the default collects hundreds of times a second under load.
GC_YOUNG_THRESHOLD = 20_000

log = logging.getLogger("smartedu")


def _port(text: str) -> int:
    # Checked here as SMARTEDU_PORT is: the event loop would bind 70000 as 4464 without a word.
    if not text.isdigit() or int(text) > MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to {MAX_PORT}, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartedu",
        description="SmartEdu Tutor Chat: a real-time AI tutor chat server. Configuration comes from the "
        "environment (see README.md); without DATABASE_URL/REDIS_URL it runs embedded PostgreSQL and Redis "
        "under SMARTEDU_DATA_DIR (default ./.smartedu).",
    )
    parser.add_argument("--version", action="version", version=f"smartedu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the chat server", description="Run the chat server.")
    serve.add_argument("--host", help="interface to listen on (default SMARTEDU_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default SMARTEDU_PORT or 8080)")
    serve.add_argument("--no-seed", action="store_true", help="do not create the demo school in embedded mode")

    commands.add_parser(
        "migrate", help="apply database migrations and exit", description="Apply pending database migrations."
    )

    token = commands.add_parser(
        "token",
        help="mint a development token",
        description="Mint a JWT signed with SMARTEDU_JWT_SECRET (or the embedded development secret).",
    )
    token.add_argument("--user", required=True, help="the user's id (claim sub)")
    token.add_argument("--role", required=True, choices=ROLES, help="the user's role")
    token.add_argument("--tenant", required=True, help="the tenant (school) id (claim tid)")
    token.add_argument("--course", action="append", help="a course the token may use (repeatable; claim courses)")
    token.add_argument("--name", help="display name (claim name)")
    token.add_argument(
        "--ttl", type=lifecycle_cli.positive_int, default=3600, help="lifetime in seconds (default 3600)"
    )

    commands.add_parser(
        "seed-demo",
        help="create the demo school (tenant, course, student, teacher)",
        description="Create or refresh the demo tenant 'demo', course 'algebra-1' and its two users.",
    )

    lifecycle_cli.add_commands(commands)
    tenant_cli.add_commands(commands)
    lti_cli.add_commands(commands)
    commands.add_parser(
        "cluster",
        help="run N replicas behind NGINX on this machine (see `smartedu cluster --help`)",
        add_help=False,
        description="Run a local cluster.",
    )
    commands.add_parser(
        "loadtest",
        help="simulate students against a server (see `smartedu loadtest --help`)",
        add_help=False,
        description="Simulate concurrent students.",
    )
    return parser


@contextlib.contextmanager
def _services(settings: Settings, *, need_redis: bool = True) -> Iterator[Settings]:
    """Fill in embedded servers and the development secret for whatever the environment leaves out.

    `need_redis=False` for the commands that use only PostgreSQL (migrate, seed-demo, backup, ...): run against
    a DATABASE_URL they start nothing, so a cron job or a migration step needs no REDIS_URL."""
    embedded = EmbeddedServices(settings.data_dir)
    postgres, redis_ = settings.database_url is None, need_redis and settings.redis_url is None
    if postgres or redis_:
        embedded.start(postgres=postgres, redis=redis_)
        settings = replace(
            settings,
            database_url=settings.database_url or embedded.database_url,
            redis_url=settings.redis_url or embedded.redis_url or None,
        )
        if not settings.jwt_secret and not settings.jwt_public_key:
            settings = replace(settings, jwt_secret=jwt_secret(settings.data_dir))
        if not settings.session_key:
            settings = replace(settings, session_key=dev_session_key(settings.data_dir))
    try:
        yield settings
    finally:
        embedded.stop()


async def _prepare(settings: Settings, *, seed: bool) -> list[int]:
    """Migrate (and seed the demo school); the versions of the migrations applied."""
    from storage.postgres import Database, connect_pool
    from storage.seed import seed_demo

    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set")
    pool = await connect_pool(settings.database_url, min_size=1, max_size=2)
    try:
        db = Database(pool)
        applied = await db.migrate()
        if applied:
            log.info("migrations applied", extra={"versions": applied})
        if seed:
            await seed_demo(db)
        return applied
    finally:
        await pool.close()


def _print_demo(settings: Settings, host: str, port: int) -> None:
    from storage.seed import DEMO_COURSE, DEMO_STUDENT, DEMO_TEACHER, DEMO_TENANT

    assert settings.jwt_secret is not None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host  # IPv6 in brackets
    base = settings.public_url or f"http://{shown}:{port}"
    student = mint_token(
        settings.jwt_secret, user=DEMO_STUDENT, tenant=DEMO_TENANT, role="student", name="Demo Student",
        ttl_s=settings.max_token_lifetime_s,
    )
    teacher = mint_token(
        settings.jwt_secret, user=DEMO_TEACHER, tenant=DEMO_TENANT, role="teacher", name="Demo Teacher",
        courses=[DEMO_COURSE], ttl_s=settings.max_token_lifetime_s,
    )
    print(
        "\nSmartEdu Tutor Chat is running (embedded PostgreSQL and Redis, "
        f"{settings.ai_provider} tutor).\n\n"
        f"  Student chat:       {base}/chat#course={DEMO_COURSE}&token={student}\n\n"
        f"  Teacher dashboard:  {base}/teacher#token={teacher}\n\n"
        f"Tokens last {settings.max_token_lifetime_s / 3600:g} h (SMARTEDU_MAX_TOKEN_LIFETIME_S); "
        "`smartedu token --help` mints others. Press Ctrl-C to stop.\n",
        flush=True,
    )


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvloop

    from .app import create_app

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    embedded_mode = settings.embedded
    with _services(settings) as settings:
        settings = replace(settings, host=host, port=port)
        if settings.migrate_on_start:
            # Otherwise a separate step migrates (and seeds); create_app only checks the schema, read-only.
            asyncio.run(_prepare(settings, seed=embedded_mode and not args.no_seed))
        app = create_app(settings)
        announce = embedded_mode and settings.jwt_secret is not None and not args.no_seed
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run_until_signal(app, settings, announce))
    return 0


async def _run_until_signal(app: web.Application, settings: Settings, announce: bool) -> None:
    """Serve until a signal: SIGTERM drains first (rolling restarts), SIGINT and SIGHUP stop at once."""
    from .app import drain, stop

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    # Before the server is announced: a signal right after the announcement must find its handler.
    received: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # SIGHUP (the terminal closed) stops like SIGINT; by default it killed the process on the spot, leaving
    # the embedded servers running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, received.put_nowait, signum)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        _settle_heap()
        # Port 0 asks the system for a free port: say which one it gave, in the log and the demo links.
        port = int(runner.addresses[0][1]) if settings.port == 0 else settings.port
        log.info("serving", extra={"host": settings.host, "port": port, "ai": settings.ai_provider})
        if announce:
            _print_demo(settings, settings.host, port)
        if await received.get() == signal.SIGTERM:
            log.info("draining", extra={"deadline_s": settings.drain_seconds})
            await drain(app, settings.drain_seconds)
        log.info("stopping")
    finally:
        await stop(runner)


def _settle_heap() -> None:
    """After start-up: the modules, the app and the pools are long-lived, so move them out of the garbage
    collector's sight (gc.freeze) and collect the young generation less often. Full collections then walk
    only what sockets and answers allocate, instead of pausing every socket for the whole heap
    (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


def _token(settings: Settings, args: argparse.Namespace) -> int:
    secret = settings.jwt_secret
    if secret is None:
        if settings.jwt_public_key:
            raise ConfigError("token needs SMARTEDU_JWT_SECRET; with a public key your identity provider signs tokens")
        secret = jwt_secret(settings.data_dir)
    if args.ttl > settings.max_token_lifetime_s:
        raise ConfigError(
            f"--ttl {args.ttl} exceeds SMARTEDU_MAX_TOKEN_LIFETIME_S ({settings.max_token_lifetime_s} s): "
            "the server would refuse the token"
        )
    print(
        mint_token(
            secret, user=args.user, tenant=args.tenant, role=args.role, name=args.name, courses=args.course,
            ttl_s=args.ttl, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loadtest":
        from .loadtest.cli import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv and argv[0] == "cluster":
        from .cluster import main as cluster_main

        return cluster_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        configure_logging(settings.log_level, settings.replica_id)
        if args.command == "token":
            return _token(settings, args)
        if args.command == "serve":
            return _serve(settings, args)
        # In embedded mode the servers' Redis is the embedded one (shared with a running server, else started
        # for the command): purge and delete-user clean it too. With a DATABASE_URL they use REDIS_URL or none.
        embedded_redis = args.command in lifecycle_cli.REDIS_COMMANDS and settings.database_url is None
        with _services(settings, need_redis=embedded_redis) as ready:
            # Before _prepare: restore must find an empty database, not a freshly migrated one.
            if args.command in lifecycle_cli.LIFECYCLE_COMMANDS:
                return lifecycle_cli.run(args, ready)
            if args.command == "lti":
                return lti_cli.run(args, ready)
            if args.command == "tenant":
                return tenant_cli.run(args, ready)
            applied = asyncio.run(_prepare(ready, seed=args.command == "seed-demo"))
        if args.command == "migrate":
            print(f"migrations applied: {', '.join(map(str, applied))}" if applied else "no migrations pending")
        else:
            print("demo school ready: tenant 'demo', course 'algebra-1'")
        return 0
    except (ConfigError, EmbeddedError) as exc:
        print(f"smartedu: configuration error: {exc}", file=sys.stderr)
        return 2
    # What the machine or the database refuses (a port in use, an unreachable or missing database) is the
    # operator's to fix: one line naming it, not a traceback.
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # also a DATABASE_URL option asyncpg refuses
        print(f"smartedu {args.command}: database error: {exc}", file=sys.stderr)
        return 1
    except redis.exceptions.RedisError as exc:  # unreachable after the retries, a wrong password
        print(f"smartedu {args.command}: redis error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"smartedu {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"smartedu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
