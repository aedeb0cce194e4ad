"""PostgreSQL restarting or failing over mid-class: every connection dropped, new ones refused (or left
unanswered) for a few seconds, then back. Played by a proxy of the test's own between the server and the
shared PostgreSQL (tests/pgproxy.py), and by terminating the server's backends in its test database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from server import answers
from server.keys import CHAT, METRICS
from tests.conftest import Serve, Server, Services, Socket, answer_text, seed_course, token
from tests.pgproxy import PostgresProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxy(services: Services) -> AsyncIterator[PostgresProxy]:
    proxy = PostgresProxy(services.database_url)
    await proxy.start()
    yield proxy
    await proxy.close()


async def _serve(serve: Serve, proxy: PostgresProxy, **overrides: Any) -> Server:
    return await serve(database_url=proxy.url, **overrides)


async def _turn(sock: Socket, client_id: str, text: str = "How do fractions work?") -> tuple[dict[str, Any], str]:
    """Ask, and wait for the answer: (its `done`, its text as streamed)."""
    await sock.send(type="message", id=client_id, text=text)
    ack = await sock.expect("ack")
    frames = await sock.until("done")
    assert not [f for f in frames if f["type"] == "error"], frames
    return frames[-1], answer_text(frames, ack["reply_id"])


async def _terminate_backends(db: asyncpg.Connection, where: str = "true") -> int:
    """Terminate the server's connections to this run's database (the test's own is kept)."""
    return int(
        await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            f" WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({where})"
        )
    )


async def _ready(server: Server) -> tuple[int, dict[str, Any]]:
    response = await server.client.get("/ready")
    return response.status, await response.json()


async def test_a_question_committed_whose_reply_was_lost_is_answered_when_resent(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    """The connection drops after the question's commit, before its reply: the client gets an error and
    resends. The resend finds the question stored, never acknowledged and its answer never started: it is
    acknowledged and answered then (not left 'streaming' for the sweep of unstarted answers)."""
    server = await _serve(serve, proxy)
    sock = await server.connect({"token": token()})
    proxy.lose_reply_with = b"reply lost on the way"
    await sock.send(type="message", id="q1", text="reply lost on the way")
    error = await sock.expect("error")
    assert (error["code"], error["ref"]) == ("internal", "q1")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_id = 'q1'") == 1  # committed

    await sock.send(type="message", id="q1", text="reply lost on the way")  # the client's retry
    frames = await sock.until("done", timeout=5)
    ack, done = frames[0], frames[-1]
    assert ack["type"] == "ack" and ack["seq"] > 0 and done["status"] == "complete", frames
    assert done["reply_id"] == ack["reply_id"] and answer_text(frames, ack["reply_id"])
    rows = await db.fetch("SELECT role, client_id, status FROM messages ORDER BY id")
    assert [tuple(r) for r in rows] == [("user", "q1", "complete"), ("assistant", None, "complete")]
    assert await db.fetchval("SELECT seq FROM messages WHERE client_id = 'q1'") == ack["seq"]

    await sock.send(type="message", id="q1", text="reply lost on the way")  # a resend after all that
    again = await sock.expect("ack")
    assert (again["reply_id"], again["seq"]) == (ack["reply_id"], ack["seq"])
    await asyncio.sleep(0.3)
    assert [f["type"] for f in sock.frames[-1:]] == ["ack"]  # no second answer


async def test_an_answer_whose_context_cannot_be_read_fails_with_an_explicit_error(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    """The database goes away as the answer starts, while the course's documents are read: the answer ends
    failed with a reason (`internal`, retryable) in its `done`, an `error` frame and the stored row, not a
    `done` that does not say why; regenerating it works."""
    server = await _serve(serve, proxy)
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    sock = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    proxy.lose_request_with = b"FROM course_documents"
    await sock.send(type="message", id="q1", text="How do I solve 2x = 6?")
    ack = await sock.expect("ack")
    done = (await sock.until("done"))[-1]
    assert (done["status"], done.get("error"), done.get("retryable")) == ("failed", "internal", True), done
    error = await sock.expect("error")
    assert (error["code"], error["ref"], error["retryable"]) == ("internal", str(ack["reply_id"]), True)
    row = await db.fetchrow("SELECT status, error_code, retryable FROM messages WHERE id = $1", ack["reply_id"])
    assert row is not None and tuple(row) == ("failed", "internal", True)

    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    again = await sock.expect("ack")
    assert (await sock.until("done"))[-1]["status"] == "complete" and again["reply_id"] != ack["reply_id"]


async def _answer_across_a_restart(sock: Socket, proxy: PostgresProxy, db: asyncpg.Connection, status: str) -> None:
    """Ask; once the answer streams, PostgreSQL goes down for 2 s (its commit, under a second later, finds no
    database): the `done` comes once it is back, with `status` and the text streamed, as committed."""
    await sock.send(type="message", id="q1", text="Explain photosynthesis")
    ack = await sock.expect("ack")
    await sock.expect("token")
    await proxy.down()
    await asyncio.sleep(2.0)
    assert not [f for f in sock.frames if f["type"] == "done"]
    await proxy.up()
    frames = await sock.until("done", timeout=10)
    done, text = frames[-1], answer_text(sock.frames, ack["reply_id"])
    assert (done["status"], done["reply_id"], done["length"]) == (status, ack["reply_id"], len(text))
    row = await db.fetchrow("SELECT status, text FROM messages WHERE id = $1", ack["reply_id"])
    assert row is not None and (row["status"], row["text"]) == (status, text)


async def test_idle_connections_reset_by_a_restart_are_replaced_without_an_error(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    server = await _serve(serve, proxy)
    sock = await server.connect({"token": token()})
    await _turn(sock, "q0")
    proxy.drop()  # every pooled connection reset
    done, _ = await _turn(sock, "q1")
    assert done["status"] == "complete"
    rows = await db.fetch("SELECT role, status FROM messages ORDER BY id")
    assert [tuple(r) for r in rows] == [("user", "complete"), ("assistant", "complete")] * 2


async def test_statements_given_connections_postgres_terminated_are_sent_again_on_new_ones(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart sends every backend's client a FATAL, then closes. A statement on a pooled connection that
    has read the FATAL but not yet the close is refused by asyncpg (or answered with the FATAL): it was not
    applied, and is sent on a new connection instead of failing the student's message or hello."""
    server = await _serve(serve, proxy, db_pool_min=3)
    sock = await server.connect({"token": token()})
    await _turn(sock, "q0")
    proxy.linger_s = 1.0  # the close reaches the server a second after the FATAL
    for n in (1, 2, 3):
        assert await _terminate_backends(db) > 0
        await asyncio.sleep(0.2)  # the FATALs are read
        done, _ = await _turn(sock, f"q{n}")
        assert done["status"] == "complete"
        other = await server.connect({"token": token(f"stu-{n + 1}")})
        assert other.frames[0]["type"] == "welcome"
        assert (await _ready(server))[0] == 200
    rows = await db.fetch("SELECT role, status FROM messages ORDER BY id")
    assert [tuple(r) for r in rows] == [("user", "complete"), ("assistant", "complete")] * 4
    assert "stale PostgreSQL connection replaced" in caplog.text  # the case this test is about did happen


async def test_a_question_whose_commit_is_killed_gets_an_error_and_its_resend_is_stored_once(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    server = await _serve(serve, proxy)
    sock = await server.connect({"token": token()})
    conversation_id = sock.frames[0]["conversation_id"]
    # The test holds the conversation's row, so the question's insert waits on it; then its backend is killed
    # before it could commit.
    async with db.transaction():
        await db.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
        await sock.send(type="message", id="q1", text="What is a prime number?")
        async with asyncio.timeout(5):
            while not await _terminate_backends(db, "wait_event_type = 'Lock'"):
                await asyncio.sleep(0.02)
        error = await sock.expect("error")
    assert (error["code"], error["ref"], error["retry_after"]) == ("internal", "q1", 1.0), error
    assert await db.fetchval("SELECT count(*) FROM messages") == 0  # nothing half-committed

    done, text = await _turn(sock, "q1", "What is a prime number?")  # the client's retry, same id
    assert done["status"] == "complete" and text
    await sock.send(type="message", id="q1", text="What is a prime number?")  # and once more: a resend
    again = await sock.expect("ack")
    assert again["reply_id"] == done["reply_id"]
    rows = await db.fetch("SELECT role, client_id, status FROM messages ORDER BY id")
    assert [tuple(r) for r in rows] == [("user", "q1", "complete"), ("assistant", None, "complete")]


async def test_an_answer_ending_while_postgres_restarts_is_committed_when_it_is_back(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    """The answer's commit fails while the database is down: it is tried again (its lease kept) and the
    answer ends complete with its whole text, and the student gets the `done`, once PostgreSQL is back. The
    commit batchers and the maintenance loop keep working afterwards."""
    server = await _serve(serve, proxy, offline_tokens_per_s=25.0, offline_reply_words=20)
    sock = await server.connect({"token": token()})
    await _answer_across_a_restart(sock, proxy, db, "complete")
    assert server.client.app[METRICS].commit_retries._value.get() > 0

    done, _ = await _turn(sock, "q2")  # both batchers (questions, answers) still commit
    assert done["status"] == "complete"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE status = 'streaming'") == 0
    maintenance = server.client.app[CHAT]._maintenance
    assert maintenance is not None and not maintenance.done()


async def test_an_answer_whose_commit_gives_up_is_ended_by_the_takeover_once_postgres_is_back(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its retries the answer's lease is not dropped: it expires and the takeover ends the answer as
    interrupted with the text streamed (not a placeholder left 'streaming' for the minute-long sweep)."""
    monkeypatch.setattr(answers, "COMMIT_RETRY_S", 0.3)
    server = await _serve(serve, proxy, offline_tokens_per_s=25.0, offline_reply_words=12)
    sock = await server.connect({"token": token()})
    await _answer_across_a_restart(sock, proxy, db, "interrupted")
    # Counted once, as stored: by the takeover (the replica that gave the commit up counts nothing).
    registry = server.client.app[METRICS].registry
    assert registry.get_sample_value("smartedu_turns_total", {"status": "interrupted"}) == 1
    assert registry.get_sample_value("smartedu_turns_total", {"status": "complete"}) is None
    done, _ = await _turn(sock, "q2")
    assert done["status"] == "complete"


async def test_while_postgres_refuses_connections_requests_fail_fast_and_readiness_says_so(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    server = await _serve(serve, proxy)
    sock = await server.connect({"token": token()})
    assert (await _ready(server))[0] == 200
    await proxy.down()
    started = time.monotonic()
    await sock.send(type="message", id="q1", text="Is anyone there?")
    error = await sock.expect("error")
    assert (error["code"], error["ref"], error["retry_after"]) == ("internal", "q1", 1.0)
    hello = await server.connect({"token": token("stu-2")}, welcome=False)
    assert (await hello.expect("error"))["code"] == "internal"
    status, body = await _ready(server)
    assert (status, body["postgres"], body["redis"]) == (503, "unavailable: ConnectionRefusedError", "ok")
    # Liveness does not ask PostgreSQL: an outage must not make Kubernetes restart every replica at once.
    assert (await server.client.get("/health")).status == 200
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {token()}"})
    assert response.status == 500 and (await response.json())["error"]["code"] == "internal"
    assert time.monotonic() - started < 3.0
    await asyncio.sleep(1.5)  # maintenance ticks meet the outage too

    await proxy.up()
    assert (await _ready(server))[0] == 200
    done, _ = await _turn(sock, "q1", "Is anyone there?")  # the same message again: now answered
    assert done["status"] == "complete"
    await hello.send(type="hello", token=token("stu-2"))
    assert (await hello.expect("welcome"))["user"]["role"] == "student"
    maintenance = server.client.app[CHAT]._maintenance
    assert maintenance is not None and not maintenance.done()


async def test_an_unreachable_postgres_fails_requests_after_the_connect_timeout_not_a_minute(
    proxy: PostgresProxy, serve: Serve, db: asyncpg.Connection
) -> None:
    """A fail-over: the old address accepts nothing and answers nothing. New connections give up after
    SMARTEDU_DB_CONNECT_TIMEOUT_S (asyncpg's own default is 60 s)."""
    server = await _serve(serve, proxy, db_connect_timeout_s=1.0)
    sock = await server.connect({"token": token()})
    proxy.hold_new = True
    proxy.drop()
    started = time.monotonic()
    await sock.send(type="message", id="q1", text="Is anyone there?")
    error = await sock.expect("error", timeout=10)
    assert (error["code"], error["ref"]) == ("internal", "q1")
    assert time.monotonic() - started < 3.0
    status, body = await _ready(server)
    assert status == 503 and body["postgres"].startswith("unavailable")

    await proxy.up()
    proxy.drop()  # the connections left waiting on the old address
    done, _ = await _turn(sock, "q1", "Is anyone there?")
    assert done["status"] == "complete"
    assert (await _ready(server))[0] == 200


async def test_readiness_with_neither_postgres_nor_redis_answering_takes_one_timeout_not_two(
    proxy: PostgresProxy, serve: Serve
) -> None:
    """A zone outage: neither PostgreSQL nor Redis answers at all. /ready asks both at once and says 503
    within its 2 s timeout, inside the probe's timeoutSeconds (deploy/k8s/deployment.yaml); asked one after
    the other it took 4 s, and the kubelet counted a probe timeout instead of the 503."""
    from redis.asyncio import Redis

    from server.keys import REDIS

    server = await _serve(serve, proxy, db_connect_timeout_s=10.0)
    assert (await _ready(server))[0] == 200
    silent_links: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_links.append(writer)
        await reader.read()  # accepts, never answers

    silent_redis = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = silent_redis.sockets[0].getsockname()[1]
    store = server.client.app[REDIS]
    healthy, store.client = store.client, Redis.from_url(f"redis://127.0.0.1:{port}/0")
    proxy.hold_new = True
    proxy.drop()  # the readiness probe's own connection goes; a new one gets no answer
    try:
        started = time.monotonic()
        status, body = await _ready(server)
        elapsed = time.monotonic() - started
    finally:
        await store.client.aclose()
        store.client = healthy
        for writer in silent_links:
            writer.transport.abort()
        silent_redis.close()
        await silent_redis.wait_closed()
        await proxy.up()
    assert (status, body["postgres"], body["redis"]) == (503, "unavailable: TimeoutError", "unavailable: TimeoutError")
    assert 1.9 < elapsed < 3.5, elapsed  # 4 s when asked one after the other
    assert (await _ready(server))[0] == 200


async def test_postgres_connections_keep_alive_so_a_server_gone_silent_is_given_up(
    proxy: PostgresProxy, serve: Serve
) -> None:
    """After a fail-over a pooled connection whose server vanished without closing it heard nothing until
    the 30 s statement timeout. TCP keepalive (and TCP_USER_TIMEOUT for a statement on its way) give it up
    after SMARTEDU_DB_KEEPALIVE_S (12 s: 6 s idle, then 3 probes 2 s apart): the pool's connections and
    the readiness probe's own. Over TCP through the proxy, since the embedded PostgreSQL is on a Unix
    socket (which has no keepalive, and is left alone: every other test starts on it)."""
    import socket

    from server.keys import DATABASE
    from storage.postgres import connection_socket

    server = await _serve(serve, proxy)
    assert server.settings.db_keepalive_s == 12
    database = server.client.app[DATABASE]
    assert (await _ready(server))[0] == 200  # opens the probe's connection
    async with database.pool.acquire() as pooled:
        sockets = [connection_socket(pooled), connection_socket(database._probe)]  # type: ignore[arg-type]
    for sock in sockets:
        assert sock is not None and sock.family == socket.AF_INET
        options = (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
        assert options == (True, 6, 2, 3, 12_000), options
