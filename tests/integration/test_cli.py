"""The `smartedu` command as a newcomer uses it: help, tokens, and `serve` with embedded servers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
import orjson
import psutil
import pytest

from tests.conftest import Services, with_database

pytestmark = pytest.mark.integration

SMARTEDU = [sys.executable, "-m", "server"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMARTEDU, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("command", ["serve", "migrate", "token", "seed-demo"])
def test_every_command_has_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.returncode == 0 and "usage: smartedu" in result.stdout and "-h, --help" in result.stdout


def test_token_is_signed_with_the_configured_secret(tmp_path: Path) -> None:
    secret = "cli-secret-" + "q" * 60
    env = {**os.environ, "SMARTEDU_JWT_SECRET": secret, "SMARTEDU_DATA_DIR": str(tmp_path)}
    result = _run("token", "--user", "u7", "--role", "teacher", "--tenant", "t9", "--course", "c1", "--ttl", "60",
                  env=env)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["tid"], claims["role"], claims["courses"]) == ("u7", "t9", "teacher", ["c1"])
    assert 55 <= claims["exp"] - claims["iat"] <= 60


def test_token_longer_than_the_servers_cap_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "SMARTEDU_DATA_DIR": str(tmp_path), "SMARTEDU_MAX_TOKEN_LIFETIME_S": "3600"}
    result = _run("token", "--user", "u7", "--role", "student", "--tenant", "t9", "--ttl", "3601", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "--ttl 3601 exceeds SMARTEDU_MAX_TOKEN_LIFETIME_S (3600 s)" in result.stderr
    result = _run("token", "--user", "u7", "--role", "student", "--tenant", "t9", "--ttl", "3600", env=env)
    assert result.returncode == 0, result.stderr


def test_an_empty_development_secret_file_is_replaced(tmp_path: Path) -> None:
    # Left by a first start that died between creating and writing it; before: "HMAC key must not be empty".
    (tmp_path / "jwt-secret").write_text("")
    env = {key: value for key, value in os.environ.items() if key != "SMARTEDU_JWT_SECRET"}
    env["SMARTEDU_DATA_DIR"] = str(tmp_path)
    result = _run("token", "--user", "u7", "--role", "student", "--tenant", "t9", env=env)
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "jwt-secret").read_text().strip()
    assert len(secret) >= 32 and jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "u7"
    assert stat.S_IMODE((tmp_path / "jwt-secret").stat().st_mode) == 0o600 and os.listdir(tmp_path) == ["jwt-secret"]
    again = _run("token", "--user", "u8", "--role", "student", "--tenant", "t9", env=env)
    assert jwt.decode(again.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "u8"


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    result = _run("migrate", env={**os.environ, "SMARTEDU_MESSAGES_PER_MINUTE": "lots"})
    assert result.returncode == 2 and "SMARTEDU_MESSAGES_PER_MINUTE" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _chat(url: str, token: str, text: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(orjson.dumps({"type": "hello", "token": token, "course_id": "algebra-1"}).decode())
        welcome: dict[str, object] = orjson.loads((await ws.receive(timeout=10)).data)
        if text:
            await ws.send_str(orjson.dumps({"type": "message", "id": "cli-1", "text": text}).decode())
            while orjson.loads((await ws.receive(timeout=10)).data)["type"] != "done":
                pass
        return welcome


def _start(
    tmp_path: Path, port: int, *, stderr: Path | None = None, **extra: str
) -> tuple[subprocess.Popen[str], str]:
    env = {
        key: value for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "SMARTEDU_JWT_SECRET")
    }
    env.update(SMARTEDU_DATA_DIR=str(tmp_path / "data"), SMARTEDU_PORT=str(port), SMARTEDU_OFFLINE_TTFT_MS="0")
    env.update(extra)
    # As on most servers and containers: the embedded PostgreSQL then warns of the runtime directory it falls
    # back to (a Python warning, which must reach the log as JSON like the rest).
    env.pop("XDG_RUNTIME_DIR", None)
    # The log goes to a file (the caller's, or one of its own) so that a start that fails can say why.
    stderr = stderr or tmp_path / f"serve-{uuid.uuid4().hex[:8]}.log"
    with open(stderr, "w") as errors:
        # Its own session, as a shell gives a foreground job: killpg then does what Ctrl-C in a terminal does.
        proc = subprocess.Popen([*SMARTEDU, "serve"], stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
                                start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"Student chat:\s+(\S+)", line)
        if match:
            return proc, match.group(1)
    tail = stderr.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise AssertionError(f"serve printed no chat URL (exit {proc.wait()}); its log ends:\n{tail}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_embedded_prints_a_working_url_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    port = _free_port()
    proc, url = _start(tmp_path, port)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}/chat#") and "token=" in url
        token = url.split("token=")[1]
        first = asyncio.run(_chat(f"http://127.0.0.1:{port}/ws", token, "Does my data survive?"))
    finally:
        _stop(proc)
    # Ctrl-C stopped the embedded servers too: nothing is left listening on the data directory.
    assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()

    proc, url = _start(tmp_path, port)
    try:
        again = asyncio.run(_chat(f"http://127.0.0.1:{port}/ws", url.split("token=")[1], ""))
        assert again["conversation_id"] == first["conversation_id"]
        history = again["history"]
        assert isinstance(history, list) and history[0]["text"] == "Does my data survive?"
        assert history[1]["status"] == "complete"
    finally:
        _stop(proc)


def _external_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"REDIS_URL": "redis://127.0.0.1:1/0", "SMARTEDU_JWT_SECRET": "cli-secret-" + "q" * 60, **extra})
    return env


def test_a_missing_database_is_one_line_not_a_traceback(services: Services) -> None:
    missing = with_database(services.database_url, "smartedu_no_such_database")
    result = _run("migrate", env=_external_env(DATABASE_URL=missing))
    assert result.returncode == 1, result.stderr
    assert "smartedu migrate: database error" in result.stderr and "smartedu_no_such_database" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_redis_is_one_line_not_a_traceback(services: Services, tmp_path: Path) -> None:
    env = _external_env(DATABASE_URL=services.database_url, SMARTEDU_DATA_DIR=str(tmp_path))
    result = _run("serve", "--port", "0", env=env)  # _external_env's REDIS_URL names port 1
    assert result.returncode == 1, result.stderr
    assert "smartedu serve: redis error" in result.stderr and "Traceback" not in result.stderr


def test_a_database_option_the_driver_refuses_is_one_line_not_a_traceback(services: Services) -> None:
    parts = urlsplit(services.database_url)  # the embedded server's URL has a query already (its socket)
    bogus = urlunsplit(parts._replace(query="&".join(q for q in (parts.query, "sslmode=bogus") if q)))
    result = _run("migrate", env=_external_env(DATABASE_URL=bogus))
    assert result.returncode == 1, result.stderr
    assert "smartedu migrate: database error" in result.stderr and "sslmode" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_not_a_traceback(services: Services, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _external_env(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url,
                            SMARTEDU_DATA_DIR=str(tmp_path), SMARTEDU_REDIS_PREFIX=f"test:{uuid.uuid4().hex[:12]}:")
        result = _run("serve", "--port", str(port), env=env)
    assert result.returncode == 1, result.stderr
    assert "smartedu serve:" in result.stderr and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "-1"], "--port"),
        (["token", "--user", "u", "--role", "student", "--tenant", "t", "--ttl", "-5"], "--ttl"),
        (["token", "--user", "u", "--role", "student", "--tenant", "t", "--ttl", "0"], "--ttl"),
    ],
)
def test_out_of_range_arguments_are_usage_errors(argv: list[str], named: str, tmp_path: Path) -> None:
    # Before: --port 70000 listened on 4464, and --ttl -5 printed a token that had already expired.
    result = _run(*argv, env={**os.environ, "SMARTEDU_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and named in result.stderr and result.stdout == ""


def _embedded_servers(data: Path) -> list[psutil.Process]:
    """The embedded postgres and redis processes serving `data` (their command lines name it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data) in cmdline and ("postgres" in cmdline or "redis-server" in cmdline):
            found.append(proc)
    return found


def _reap(proc: subprocess.Popen[str], data: Path) -> None:
    """After a test of a server: nothing of it is left running, whatever failed."""
    if proc.poll() is None:
        proc.kill()
    assert proc.stdout is not None
    proc.stdout.close()
    for leftover in _embedded_servers(data):
        leftover.kill()


def test_the_run_after_a_killed_one_adopts_and_stops_its_embedded_servers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    try:
        killed, _ = _start(tmp_path, port)
        killed.kill()
        killed.wait()
        assert killed.stdout is not None
        killed.stdout.close()
        assert len(_embedded_servers(data)) == 2  # SIGKILL leaves both running, as a crash would

        proc, url = _start(tmp_path, port)
        try:
            asyncio.run(_chat(f"http://127.0.0.1:{port}/ws", url.split("token=")[1], "Still here?"))
        finally:
            _stop(proc)
        # Before: the killed run stayed recorded as a user of both servers, so no later run ever stopped them.
        _gone, alive = psutil.wait_procs(_embedded_servers(data), timeout=15)
        assert alive == [] and not (data / "postgres" / "postmaster.pid").exists()
    finally:
        for leftover in _embedded_servers(data):
            leftover.kill()


async def _ask_until_streaming(url: str, token: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url)
    await ws.send_str(orjson.dumps({"type": "hello", "token": token, "course_id": "algebra-1"}).decode())
    await ws.receive(timeout=10)
    await ws.send_str(orjson.dumps({"type": "message", "id": "ctrl-c", "text": "Explain slopes"}).decode())
    while orjson.loads((await ws.receive(timeout=10)).data)["type"] != "token":
        pass
    return session, ws


def test_ctrl_c_in_the_terminal_stops_the_server_before_its_embedded_redis(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    # An answer of 400 words, so it is still streaming when Ctrl-C comes.
    proc, url = _start(tmp_path, port, stderr=log, SMARTEDU_OFFLINE_REPLY_WORDS="400")

    async def interrupt_mid_answer() -> None:
        session, ws = await _ask_until_streaming(f"http://127.0.0.1:{port}/ws", url.split("token=")[1])
        try:
            os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as a terminal's Ctrl-C
            await ws.receive(timeout=30)
        finally:
            await ws.close()
            await session.close()

    try:
        # A terminal delivers Ctrl-C to its foreground process group: the embedded servers must not be in it,
        # or Redis dies at the same moment as the server, whose shutdown still finishes answers through it
        # (before: "turn could not be finished", connection reset, whenever Redis won that race).
        servers = _embedded_servers(tmp_path / "data")
        assert len(servers) == 2 and all(os.getpgid(server.pid) != proc.pid for server in servers)
        asyncio.run(interrupt_mid_answer())
        assert proc.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(servers, timeout=15)
        assert alive == []  # the server stopped them after itself
    finally:
        _reap(proc, tmp_path / "data")
    lines = log.read_text().splitlines()
    errors = [line for line in lines if '"level":"error"' in line]
    assert errors == [], log.read_text()[-3000:]
    # Structured logs: every line of stderr is one JSON object (before, the runtime-directory warning was not).
    assert all(line.startswith("{") and isinstance(orjson.loads(line), dict) for line in lines), lines[:5]


@pytest.fixture
def empty_database(services: Services) -> Iterator[str]:
    """A database of its own on the test server (seed-demo must not add a tenant to the shared one)."""
    name = f"smartedu_cli_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(services.database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(services.database_url, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_database_only_commands_need_no_redis(empty_database: str, tmp_path: Path) -> None:
    # Before: without REDIS_URL these started an embedded Redis under SMARTEDU_DATA_DIR (or, where none is
    # installed, refused: "REDIS_URL is not set"), though they never use Redis.
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "REDIS_CLUSTER_URLS")}
    env.update(DATABASE_URL=empty_database, SMARTEDU_DATA_DIR=str(tmp_path / "data"))
    outputs = []
    export = ["export-user", "--tenant", "demo", "--user", "demo-student"]
    for command in (["migrate"], ["migrate"], ["seed-demo"], export):
        result = _run(*command, env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
        outputs.append(result.stdout)
    assert not (tmp_path / "data").exists()
    # What migrate did: before, "migrations applied" either way.
    assert outputs[0].startswith("migrations applied: 1, 2") and outputs[1] == "no migrations pending\n"


def test_closing_the_terminal_stops_the_server_and_its_embedded_servers(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, _free_port())
    try:
        servers = _embedded_servers(tmp_path / "data")
        assert len(servers) == 2
        proc.send_signal(signal.SIGHUP)
        # Before: killed by the signal (exit -1), both embedded servers left running.
        assert proc.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(servers, timeout=15)
        assert alive == []
    finally:
        _reap(proc, tmp_path / "data")


def test_port_0_announces_the_port_the_system_gave(tmp_path: Path) -> None:
    # Before: "http://127.0.0.1:0/chat#..." was printed, a link that leads nowhere.
    proc, url = _start(tmp_path, 0)
    try:
        match = re.match(r"http://127\.0\.0\.1:(\d+)/chat#", url)
        assert match is not None and int(match.group(1)) > 0, url
        welcome = asyncio.run(_chat(f"http://127.0.0.1:{match.group(1)}/ws", url.split("token=")[1], ""))
        assert welcome["type"] == "welcome"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        _reap(proc, tmp_path / "data")


@pytest.mark.parametrize(
    ("host", "shown"), [("::1", "[::1]:8123"), ("0.0.0.0", "127.0.0.1:8123"), ("localhost", "localhost:8123")]
)
def test_the_demo_links_are_urls_for_any_host(host: str, shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    from server.__main__ import _print_demo
    from server.settings import Settings

    # Before: --host ::1 printed http://::1:8123/chat, which no browser opens.
    _print_demo(Settings(jwt_secret="d" * 40), host, 8123)
    out = capsys.readouterr().out
    assert f"http://{shown}/chat#" in out and f"http://{shown}/teacher#" in out
