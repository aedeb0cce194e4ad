"""`smartedu backup | restore | purge | export-user | delete-user`: backups and the data lifecycle.

Wiring into server/__main__.py (the commands need only `settings.database_url`, which `_services` fills in
with the embedded server's in embedded mode; purge and delete-user also clean Redis when REDIS_URL is set,
and say what they left there when it is not):

    from . import lifecycle_cli

    # in _parser(), after the other commands:
    lifecycle_cli.add_commands(commands)

    # in main(), first thing inside `with _services(settings) as ready:`
    if args.command in lifecycle_cli.LIFECYCLE_COMMANDS:
        return lifecycle_cli.run(args, ready)

Exit status: 0 done, 1 refused or failed (the message on stderr says why), 130 interrupted. Results go to
stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import orjson
import redis.exceptions

from storage.errors import StorageError
from storage.keys import Keys
from storage.lifecycle import (
    DEFAULT_BATCH_SIZE,
    DataCounts,
    Lifecycle,
    LifecycleError,
    UserData,
    backup_database,
    restore_database,
    retention_rules,
)
from storage.postgres import connect_pool
from storage.redis_store import RedisStore, connect_redis
from storage.schema_check import pending_migrations

from .auth import LEEWAY_S
from .budgets import budget_day
from .errors import ConfigError
from .settings import Settings

T = TypeVar("T")

LIFECYCLE_COMMANDS = frozenset({"backup", "restore", "purge", "export-user", "delete-user"})
# Those that also delete the copies the servers keep in Redis.
REDIS_COMMANDS = frozenset({"purge", "delete-user"})

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `52w` (also `s`, `m`) as a positive timedelta."""
    match = _DURATION.match(text.lower())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a positive number and a unit, like 365d, 12h or 52w"
        )
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:  # argparse reports only ValueError and TypeError: this was a traceback
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: too long, use 365d, 12h or 52w") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add backup, restore, purge, export-user and delete-user to the `smartedu` command."""
    raw = argparse.RawDescriptionHelpFormatter
    pg_bin_help = (
        "directory holding the PostgreSQL client programs to use (default: the embedded server's when new "
        "enough, else those on PATH)"
    )

    backup = subparsers.add_parser(
        "backup",
        help="dump the database to a file (pg_dump custom format)",
        formatter_class=raw,
        description="Dump the whole database (DATABASE_URL, or the embedded server) with pg_dump -Fc.\n"
        "The file is written as FILE.partial and renamed once complete; it is readable by you only.",
        epilog="examples:\n  smartedu backup\n  smartedu backup --output /backups/smartedu-nightly.dump",
    )
    backup.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="where to write the backup: a file, or a directory for the default name (default "
        "smartedu-YYYYmmdd-HHMMSS.dump in the current directory, UTC)",
    )
    backup.add_argument("--pg-bin", type=Path, metavar="DIR", help=pg_bin_help)

    restore = subparsers.add_parser(
        "restore",
        help="restore a backup into an empty database, then migrate",
        formatter_class=raw,
        description="Restore a `smartedu backup` file into the database (DATABASE_URL, or the embedded\n"
        "server) in a single transaction, then apply pending migrations. The database must be empty\n"
        "unless --clean is given. Stop the chat servers first.",
        epilog="examples:\n  createdb smartedu_restored\n"
        "  DATABASE_URL=postgresql://.../smartedu_restored smartedu restore smartedu-20250101-020000.dump",
    )
    restore.add_argument("file", type=Path, metavar="FILE", help="a backup written by `smartedu backup`")
    restore.add_argument(
        "--clean", action="store_true",
        help="replace a non-empty database: drop the backup's tables before recreating them (all or nothing)",
    )
    restore.add_argument("--pg-bin", type=Path, metavar="DIR", help=pg_bin_help)

    purge = subparsers.add_parser(
        "purge",
        help="delete conversations inactive for longer than the retention period",
        formatter_class=raw,
        description="Delete conversations (with their messages, AI usage rows and flags) whose last activity\n"
        "is older than the retention period. A tenant's own tenants.retention_days wins over\n"
        "--older-than; with --per-tenant only tenants that set one are purged. Deletes run in batches,\n"
        "one transaction each, so an interrupted purge keeps what it did and can simply be run again.\n"
        "With REDIS_URL (and the servers' SMARTEDU_REDIS_PREFIX) their stream logs are deleted from Redis too.\n"
        "Erasure records and logged-out sessions whose tokens and cookies have all expired are deleted too.",
        epilog="examples:\n  smartedu purge --older-than 365d --dry-run\n"
        "  smartedu purge --older-than 52w --tenant school-a\n  smartedu purge --per-tenant",
    )
    limit = purge.add_mutually_exclusive_group(required=True)
    limit.add_argument(
        "--older-than", type=parse_duration, metavar="DURATION",
        help="retention for tenants without their own: a number and s, m, h, d or w (365d, 12h, 52w)",
    )
    limit.add_argument("--per-tenant", action="store_true", help="apply only each tenant's own retention_days")
    purge.add_argument("--tenant", metavar="T", help="purge only this tenant")
    purge.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    purge.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
        help=f"conversations per transaction (default {DEFAULT_BATCH_SIZE})",
    )

    export = subparsers.add_parser(
        "export-user",
        help="write everything stored about a user as JSON (data-protection access request)",
        formatter_class=raw,
        description="Write the user's record, conversations, messages, flags and AI usage rows as one JSON\n"
        "document (ISO 8601 timestamps). Only the given tenant is searched.",
        epilog="example:\n  smartedu export-user --tenant school-a --user stu-42 --output stu-42.json",
    )
    export.add_argument("--tenant", required=True, metavar="T", help="the user's tenant (school) id")
    export.add_argument("--user", required=True, metavar="EXTERNAL_ID", help="the user's id in the tokens (sub)")
    export.add_argument(
        "-o", "--output", type=Path, metavar="FILE.json", help="write here (mode 0600) instead of to stdout"
    )

    delete = subparsers.add_parser(
        "delete-user",
        help="delete a user and everything of theirs (data-protection erasure request)",
        formatter_class=raw,
        description="Delete the user, their conversations with every message, flag and AI usage row, in one\n"
        "transaction. Messages they wrote in other users' conversations stay there without an author.\n"
        "Only the given tenant is touched. Asks for confirmation unless --yes. With REDIS_URL (and the\n"
        "servers' SMARTEDU_REDIS_PREFIX) the running servers close the user's sockets (4403) and stop their\n"
        "answers, and their stream logs, presence entries and counters are deleted from Redis. The tokens\n"
        "they hold are refused from then on (an erasure record, kept SMARTEDU_MAX_TOKEN_LIFETIME_S).",
        epilog="example:\n  smartedu delete-user --tenant school-a --user stu-42",
    )
    delete.add_argument("--tenant", required=True, metavar="T", help="the user's tenant (school) id")
    delete.add_argument("--user", required=True, metavar="EXTERNAL_ID", help="the user's id in the tokens (sub)")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one lifecycle command against `settings.database_url`; return the exit status."""
    handler = _HANDLERS[args.command]
    return run_reporting(args.command, settings, lambda: handler(args, settings))


def run_reporting(command: str, settings: Settings, call: Callable[[], int]) -> int:
    """Run a database command's `call`; what it cannot do (a `LifecycleError` or `StorageError`, the database's
    refusal, an unreachable server) is one line on stderr naming `command`, and exit status 1."""
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set")
    try:
        return call()
    except (LifecycleError, StorageError) as exc:
        print(f"smartedu {command}: {exc}", file=sys.stderr)
    except asyncpg.PostgresError as exc:
        print(f"smartedu {command}: database error: {exc}", file=sys.stderr)
    except OSError as exc:  # an unreachable database, an unwritable output file
        print(f"smartedu {command}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"smartedu {command}: interrupted", file=sys.stderr)
        return 130
    return 1


# -- output ---------------------------------------------------------------------------------------


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows (the first one a header) in columns two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_json(document: object) -> None:
    """`document` as indented JSON on stdout."""
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe(counts: DataCounts) -> str:
    """`3 conversations, 20 messages, 10 usage rows, 1 flag`."""
    return ", ".join(
        [
            _plural(counts.conversations, "conversation"),
            _plural(counts.messages, "message"),
            _plural(counts.usage, "usage row"),
            _plural(counts.flags, "flag"),
        ]
    )


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, plain lines (at most every 2 s) otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._drawn = False
        self._last = 0.0

    def update(self, text: str, *, final: bool = False) -> None:
        if self._tty:
            sys.stderr.write("\r\x1b[K" + text)
            self._drawn = True
        elif final or time.monotonic() - self._last >= 2.0:
            sys.stderr.write(text + "\n")
            self._last = time.monotonic()
        sys.stderr.flush()

    def table(self, verb: str) -> Callable[[str, int, int], None]:
        def on_table(table: str, position: int, total: int) -> None:
            self.update(f"  [{position:>{len(str(total))}}/{total}] {verb} {table}", final=True)

        return on_table

    def deletions(self, tenant: str, expected: int) -> Callable[[DataCounts], None]:
        def on_batch(done: DataCounts) -> None:
            self.update(f"  {tenant}: {done.conversations}/{expected} conversations deleted")

        return on_batch

    def done(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


def _write_private(path: Path, data: bytes) -> None:
    # Exports hold a person's messages: readable by the owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def confirm(prompt: str) -> bool:
    """Ask a yes/no question on the terminal; anything but y or yes (or nothing to read) is no."""
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:  # nothing to read (stdin closed or not a terminal): the answer is no
        print()
        return False


# -- commands -------------------------------------------------------------------------------------


def _dsn(settings: Settings) -> str:
    assert settings.database_url is not None  # `run` checked
    return settings.database_url


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    dsn = _dsn(settings)
    name = f"smartedu-{datetime.now(UTC):%Y%m%d-%H%M%S}.dump"
    output: Path = args.output or Path(name)
    if output.is_dir():  # `--output /backups`: the usual name, in that directory
        output = output / name
    progress = _Progress()
    try:
        result = asyncio.run(backup_database(dsn, output, pg_bin=args.pg_bin, on_table=progress.table("dumped")))
    finally:
        progress.done()
    contents = result.contents
    print(
        f"backup written to {result.path}: {_size(result.size)}, {_plural(len(contents.tables), 'table')}, "
        f"{_plural(contents.conversations, 'conversation')}, {_plural(contents.messages, 'message')} "
        f"(PostgreSQL {result.server_version}, pg_dump {result.tool.version} from {result.tool.origin}, "
        f"{result.seconds:.1f} s)"
    )
    return 0


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    dsn = _dsn(settings)
    progress = _Progress()
    try:
        result = asyncio.run(
            restore_database(dsn, args.file, clean=args.clean, pg_bin=args.pg_bin, on_table=progress.table("restored"))
        )
    finally:
        progress.done()
    for warning in result.warnings:
        print(f"smartedu restore: warning: {warning}", file=sys.stderr)
    contents = result.contents
    migrations = ", ".join(str(v) for v in result.migrations) or "none pending"
    print(
        f"restored {args.file} (made from PostgreSQL {result.archive.dumped_from}) into PostgreSQL "
        f"{result.server_version}: {_plural(len(contents.tables), 'table')}, "
        f"{_plural(contents.conversations, 'conversation')}, {_plural(contents.messages, 'message')}; "
        f"migrations applied: {migrations} (pg_restore {result.tool.version}, {result.seconds:.1f} s)"
    )
    return 0


# -- Redis: copies of deleted data in live state ---------------------------------------------------


def _redis_not_cleaned(command: str, what: str) -> None:
    print(
        f"smartedu {command}: REDIS_URL is not set, so Redis was not cleaned: {what}. Set the servers' REDIS_URL "
        "(and SMARTEDU_REDIS_PREFIX) for this command to clean it too",
        file=sys.stderr,
    )


async def _clean_redis(command: str, settings: Settings, clean: Callable[[RedisStore], Awaitable[None]]) -> bool:
    """Run `clean` on the servers' Redis (REDIS_URL, the servers' SMARTEDU_REDIS_PREFIX); False if it failed,
    having said so: the database rows are deleted already, Redis's copies expire on their own."""
    assert settings.redis_url is not None
    failure: Exception
    try:
        client = await connect_redis(settings.redis_url, attempts=3)
    except (redis.exceptions.RedisError, OSError) as exc:
        failure = exc
    else:
        store = RedisStore(client, Keys(settings.redis_prefix), log_ttl_s=settings.stream_ttl_s)
        try:
            await clean(store)
            return True
        except redis.exceptions.RedisError as exc:
            failure = exc
        finally:
            await store.close()
            await client.aclose()
    print(f"smartedu {command}: the database rows are deleted, but Redis was not cleaned: {failure}", file=sys.stderr)
    return False


def _budget_days(now: float) -> list[str]:
    """The days whose token budget keys can still exist: each expires two days after its last write."""
    return [budget_day(now - back * 86400) for back in range(3)]


def _erasure_record(deleted: UserData) -> dict[str, float]:
    """The replicas refuse the user's older tokens from the record in PostgreSQL; announced, at once."""
    if deleted.deleted_at is None or deleted.refused_until is None:
        return {}
    return {"deleted_at": deleted.deleted_at.timestamp(), "expires_at": deleted.refused_until.timestamp()}


async def _erase_live_state(settings: Settings, deleted: UserData) -> bool:
    """Close the deleted user's sockets and stop their answers on every replica (`erase_user` on the control
    channel), then delete their conversations' stream logs and their presence entries."""
    user = deleted.user

    async def clean(store: RedisStore) -> None:
        await store.publish_control(
            {"op": "erase_user", "tenant": user.tenant_id, "user": user.external_id, "user_id": user.id,
             "conversations": list(deleted.conversation_ids), **_erasure_record(deleted)}
        )
        await store.forget_conversations(deleted.conversation_ids, deleted.answers)
        await store.forget_presence(user.tenant_id, deleted.course_ids, user.external_id)
        await store.forget_user_counters(user.tenant_id, user.id, _budget_days(time.time()))

    return await _clean_redis("delete-user", settings, clean)


async def _purge_expired_records(args: argparse.Namespace, lifecycle: Lifecycle) -> None:
    """Erasure records and logouts are kept until every token and cookie they refuse has expired: then they
    go, whatever the retention (they hold no conversation)."""
    tenants = [args.tenant] if args.tenant is not None else await lifecycle.tenants_with_expired_records()
    erased = revoked = 0
    for tenant_id in tenants:
        counts = await lifecycle.purge_expired_records(tenant_id, batch_size=args.batch_size, dry_run=args.dry_run)
        erased, revoked = erased + counts[0], revoked + counts[1]
    if erased or revoked:
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"expired: {verb} {_plural(erased, 'erasure record')}, {_plural(revoked, 'logged-out session')} "
            "(their tokens and cookies have all expired)"
        )


async def _purge(args: argparse.Namespace, settings: Settings, lifecycle: Lifecycle) -> int:
    policies = await lifecycle.retention_policies(args.tenant)
    if args.tenant is not None and not policies:
        raise LifecycleError(f"there is no tenant {args.tenant!r}")
    await _purge_expired_records(args, lifecycle)
    now = await lifecycle.now()
    rules = retention_rules(policies, now, None if args.per_tenant else args.older_than)
    if not rules:
        whose = f"tenant {args.tenant!r} sets" if args.tenant else "no tenant sets its"
        print(f"nothing to purge: {whose} own retention_days" if args.per_tenant else "nothing to purge: no tenants")
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    total = DataCounts()
    purged: list[str] = []  # their stream logs may still be in Redis (with a short retention)
    answers: list[tuple[str, int]] = []  # and their answers' keys
    for rule in rules:
        at = rule.cutoff.astimezone(UTC)
        cutoff = f"{at.year:04d}-{at:%m-%d %H:%M} UTC"  # %Y is not zero-padded for year 1 ("keep forever")
        expired = await lifecycle.count_expired(rule.tenant_id, rule.cutoff)
        if not args.dry_run and expired.conversations:
            progress = _Progress()
            on_batch = progress.deletions(rule.tenant_id, expired.conversations)
            try:
                expired = await lifecycle.purge(
                    rule, batch_size=args.batch_size, on_batch=on_batch, purged=purged, answers=answers
                )
            finally:
                progress.done()
        total += expired
        print(f"{rule.tenant_id}: inactive since before {cutoff} ({rule.source}): {verb} {describe(expired)}")
    print(f"{'dry run: ' if args.dry_run else ''}{verb} {describe(total)} in {_plural(len(rules), 'tenant')}")
    if not purged:
        return 0
    # A log expires an hour (settings.stream_ttl_s) after its conversation's last frame: only a retention
    # shorter than that can purge a conversation whose log is still there. Otherwise Redis is cleaned all the same, but
    # failing to changes nothing, and does not fail the (daily) command.
    logs_left = any(rule.cutoff > now - timedelta(seconds=settings.stream_ttl_s) for rule in rules)
    if settings.redis_url is None:
        if logs_left:
            _redis_not_cleaned(
                "purge",
                "the purged conversations' stream logs stay there until they expire, "
                f"{settings.stream_ttl_s} s after their last frame, longer than this retention",
            )
        return 0
    cleaned = await _clean_redis("purge", settings, lambda store: store.forget_conversations(purged, answers))
    return 1 if logs_left and not cleaned else 0


async def with_schema(settings: Settings, action: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run `action` with a small pool on a database with this build's schema: migrated first, unless
    SMARTEDU_MIGRATE_ON_START is false (the replicas do not migrate either), which checks it instead."""
    pool = await connect_pool(_dsn(settings), min_size=1, max_size=2)
    try:
        if settings.migrate_on_start:
            await Lifecycle(pool).migrate()
        elif pending := await pending_migrations(pool):
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
            raise LifecycleError(
                f"the database lacks migrations {names}: run `smartedu migrate` first "
                "(SMARTEDU_MIGRATE_ON_START=false: this command does not change the schema)"
            )
        return await action(pool)
    finally:
        await pool.close()


async def _with_lifecycle(settings: Settings, action: Callable[[Lifecycle], Awaitable[T]]) -> T:
    return await with_schema(settings, lambda pool: action(Lifecycle(pool)))


def _no_user(args: argparse.Namespace) -> LifecycleError:
    return LifecycleError(f"there is no user {args.user!r} in tenant {args.tenant!r}")


def _export_user(args: argparse.Namespace, settings: Settings) -> int:
    export = asyncio.run(_with_lifecycle(settings, lambda lc: lc.export_user(args.tenant, args.user)))
    if export is None:
        raise _no_user(args)
    data = orjson.dumps(export.document(), option=orjson.OPT_INDENT_2) + b"\n"
    counts = DataCounts(len(export.conversations), len(export.messages), len(export.usage), len(export.flags))
    summary = f"exported user {args.user!r} of tenant {args.tenant!r}: {describe(counts)}"
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        print(summary, file=sys.stderr)
    else:
        _write_private(args.output, data)
        print(f"{summary} -> {args.output}")
    return 0


def _delete_user(args: argparse.Namespace, settings: Settings) -> int:
    found = asyncio.run(_with_lifecycle(settings, lambda lc: lc.count_user_data(args.tenant, args.user)))
    if found is None:
        raise _no_user(args)
    elsewhere = (
        f"; {_plural(found.authored_elsewhere, 'message')} they wrote in other users' conversations stay there "
        "without an author" if found.authored_elsewhere else ""
    )
    print(f"user {args.user!r} ({found.user.role}) of tenant {args.tenant!r}: {describe(found.counts)}{elsewhere}")
    if not args.yes and not confirm("Delete this user and all of the above? This cannot be undone. [y/N] "):
        print("nothing deleted", file=sys.stderr)
        return 1
    # A token issued before the erasure stays valid (its signature, its exp) for up to the longest lifetime
    # the servers accept, and so does a cookie session made from it (SMARTEDU_SESSION_TTL_S is no longer).
    refuse_for = settings.max_token_lifetime_s + LEEWAY_S
    deleted = asyncio.run(_with_lifecycle(settings, lambda lc: lc.delete_user(args.tenant, args.user, refuse_for)))
    if deleted is None:
        raise _no_user(args)
    kept = deleted.authored_elsewhere
    kept_note = f"; {_plural(kept, 'message')} in other users' conversations kept without an author" if kept else ""
    print(f"deleted user {args.user!r} of tenant {args.tenant!r}: {describe(deleted.counts)}{kept_note}")
    if settings.redis_url is None:
        _redis_not_cleaned(
            "delete-user",
            "their questions and answers of the last "
            f"{settings.stream_ttl_s} s stay in the stream logs until they expire, their name in the presence "
            "lists of their courses until those are next read or idle, their rate-limit and budget counters until "
            "they expire (within two days), and answers being generated for them go on (their open sockets are "
            "closed within 10 s, when each replica next reads the erasure records)",
        )
        return 0
    return 0 if asyncio.run(_erase_live_state(settings, deleted)) else 1


_HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "backup": _backup,
    "restore": _restore,
    "purge": lambda args, settings: asyncio.run(_with_lifecycle(settings, lambda lc: _purge(args, settings, lc))),
    "export-user": _export_user,
    "delete-user": _delete_user,
}
