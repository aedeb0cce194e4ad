"""After `smartedu delete-user`, the tokens the person still holds stay refused; Redis keeps nothing of theirs,
and logouts survive Redis losing its data."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncpg
import jwt
import pytest
from redis.asyncio import Redis

from server.budgets import Budgets, budget_day
from server.errors import CloseCode
from server.keys import CHAT, REDIS
from server.settings import Settings
from server.websession import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, new_session_key
from tests.conftest import TEST_SECRET, Serve, Server, Socket, token
from tests.integration.test_lifecycle import _cli
from tests.integration.test_lifecycle_live import _close_frame
from tests.integration.test_logout import _login

pytestmark = pytest.mark.integration


def _token(*, iat: int | None, user: str = "stu-1") -> str:
    """A student's token issued at `iat` (none when None)."""
    payload: dict[str, Any] = {"sub": user, "tid": "school-a", "role": "student", "exp": int(time.time()) + 600}
    if iat is not None:
        payload["iat"] = iat
    return jwt.encode(payload, TEST_SECRET, algorithm="HS256")


def _bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def _refused_at_hello(server: Server, hello: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    sock: Socket = await server.connect(hello, headers=headers, welcome=False)
    error = await sock.expect("error")
    assert (error["code"], error["message"]) == ("forbidden", "account deleted"), error
    assert await _close_frame(sock) == (CloseCode.FORBIDDEN, "account deleted")


async def _refused_over_http(server: Server, headers: dict[str, str]) -> None:
    response = await server.client.get("/api/conversations", headers=headers)
    body = await response.json()
    assert (response.status, body["error"]["code"], body["error"]["message"]) == (403, "forbidden", "account deleted")


async def _delete_user(settings: Settings, user: str = "stu-1") -> None:
    assert await _cli(settings, "delete-user", "--tenant", "school-a", "--user", user, "--yes") == 0


async def _deleted_at(db: asyncpg.Connection) -> int:
    return int((await db.fetchval("SELECT extract(epoch FROM max(deleted_at)) FROM erased_users")) + 1)


@pytest.mark.parametrize("with_redis", [True, False], ids=["with-redis", "database-only"])
async def test_a_token_issued_before_delete_user_is_refused_and_a_new_one_works(
    serve: Serve, db: asyncpg.Connection, with_redis: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve()
    held = token("stu-1")  # issued now, valid for an hour
    sock = await server.connect({"token": held})
    await sock.send(type="message", id="q1", text="a question")
    await sock.until("done")
    await _delete_user(server.settings if with_redis else replace(server.settings, redis_url=None))
    capsys.readouterr()

    await _refused_at_hello(server, {"token": held})
    await _refused_over_http(server, _bearer(held))
    await _refused_at_hello(server, {"token": _token(iat=None)})  # no iat: refused while the record lasts
    # A replica started afterwards (its Redis state fresh) refuses it as well.
    other = await serve()
    await _refused_at_hello(other, {"token": held})
    assert await db.fetchval("SELECT count(*) FROM users WHERE external_id = 'stu-1'") == 0
    # Nothing but the tenant and a hash of the person's id is kept.
    assert await db.fetchval("SELECT count(*) FROM erased_users WHERE position('stu-1'::bytea IN subject) > 0") == 0

    # The school provisions the student again: a token issued after the deletion starts afresh.
    again = _token(iat=await _deleted_at(db))
    fresh = await other.connect({"token": again})
    assert fresh.frames[0]["history"] == []
    response = await server.client.get("/api/conversations", headers=_bearer(again))
    assert response.status == 200 and len((await response.json())["conversations"]) == 1
    # ...while the old token still is not taken, now that the account exists again.
    await _refused_at_hello(server, {"token": held})
    # The same external id in another school is another person.
    await server.connect({"token": token("stu-1", tenant="school-b")})


async def _waiting_for_locks(db: asyncpg.Connection, count: int) -> None:
    """Until `count` sessions of the test database wait for a lock."""
    async with asyncio.timeout(10):
        while await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ) < count:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("via", ["hello", "http"])
async def test_a_hello_racing_delete_user_does_not_recreate_the_account(
    serve: Serve, db: asyncpg.Connection, via: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hello (or a request) with a token issued before the erasure arrives while delete-user's transaction is
    still open: held here at its last statement, the erasure record's insert, after the user's row is deleted.
    Once the deletion commits, the hello is refused and no account is left behind."""
    server = await serve()
    held = token("stu-1")
    await (await server.connect({"token": held})).close()
    blocker = await asyncpg.connect(server.settings.database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE erased_users IN SHARE MODE")  # reads pass, the record's insert waits
            deleting = asyncio.create_task(_delete_user(server.settings))
            await _waiting_for_locks(db, 1)
            if via == "hello":
                racing: asyncio.Task[Any] = asyncio.create_task(server.connect({"token": held}, welcome=False))
            else:
                racing = asyncio.create_task(server.client.get("/api/conversations", headers=_bearer(held)))
            await _waiting_for_locks(db, 2)  # the hello waits for the deletion
        await deleting
    finally:
        await blocker.close()
    if via == "hello":
        sock: Socket = await racing
        error = await sock.expect("error")
        assert (error["code"], error["message"]) == ("forbidden", "account deleted"), error
    else:
        response = await racing
        assert response.status == 403, await response.text()
    assert await db.fetchval("SELECT count(*) FROM users WHERE external_id = 'stu-1'") == 0
    # A token issued after the deletion still makes the account anew.
    fresh = await server.connect({"token": _token(iat=await _deleted_at(db))})
    assert fresh.frames[0]["history"] == []
    capsys.readouterr()


async def test_a_cookie_session_made_before_delete_user_is_refused(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(session_key=new_session_key())
    held = token("stu-1")
    response = await server.client.post("/api/session", json={"token": held})
    assert response.status == 200
    csrf = str((await response.json())["csrf_token"])
    server.client.session.cookie_jar.clear()
    cookies = {"Cookie": f"{SESSION_COOKIE}={response.cookies[SESSION_COOKIE].value}; {CSRF_COOKIE}={csrf}"}
    assert (await server.client.get("/api/conversations", headers=cookies)).status == 200

    await _delete_user(server.settings)
    await _refused_over_http(server, cookies)
    origin = {"Origin": f"http://{server.client.host}:{server.client.port}"}
    await _refused_at_hello(server, {}, headers={**cookies, **origin})
    assert (await server.client.get("/api/session", headers=cookies)).status == 403
    # Nor can the token still held make a new session.
    assert (await server.client.post("/api/session", json={"token": held})).status == 403
    assert await db.fetchval("SELECT count(*) FROM users WHERE external_id = 'stu-1'") == 0
    assert (await server.client.delete("/api/session", headers={**cookies, CSRF_HEADER: csrf})).status == 200


async def test_a_deleted_teachers_token_is_refused_where_no_user_row_is_needed(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    held = token("tea-1", role="teacher", courses=["alg-1"])
    running = await serve()
    sock = await running.connect({"token": held})
    assert (await running.client.get("/api/teacher/courses", headers=_bearer(held))).status == 200
    await _delete_user(running.settings, "tea-1")
    capsys.readouterr()
    # The replica has heard of the erasure.
    assert await _close_frame(sock) == (CloseCode.FORBIDDEN, "account deleted")
    for server in (running, await serve()):  # and one started afterwards reads it from PostgreSQL
        response = await server.client.get("/api/teacher/courses", headers=_bearer(held))
        assert response.status == 403 and (await response.json())["error"]["message"] == "account deleted"


async def _keys_naming(settings: Settings, text: str) -> list[bytes]:
    assert settings.redis_url
    client = Redis.from_url(settings.redis_url)
    try:
        return [key async for key in client.scan_iter(match=f"{settings.redis_prefix}*{text}*", count=1000)]
    finally:
        await client.aclose()


async def test_delete_user_removes_their_rate_limit_and_budget_counters(
    serve: Serve, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve()
    sock = await server.connect({"token": token("stu-1")})
    classmate = await server.connect({"token": token("stu-2")})
    for frames in (sock, classmate):
        await frames.send(type="message", id="q1", text="a question")
        await frames.until("done")
    user_id = sock.frames[0]["user"]["id"]
    kept_id = classmate.frames[0]["user"]["id"]
    assert len(await _keys_naming(server.settings, user_id)) == 2  # the rate limit and today's budget

    await _delete_user(server.settings)
    capsys.readouterr()
    assert await _keys_naming(server.settings, user_id) == []
    assert len(await _keys_naming(server.settings, kept_id)) == 2


async def _counters_of(server: Server, user_id: str) -> int:
    """How many of the user's rate-limit and today's budget counters Redis holds (also on a Redis Cluster)."""
    store = server.client.app[REDIS]
    keys, day = store.keys, budget_day(time.time())
    counters = keys.rate_limit("school-a", user_id), keys.user_tokens("school-a", user_id, day)
    return int(await store.client.exists(*counters))


async def test_an_answer_settled_after_delete_user_does_not_recreate_their_budget_counter(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command deletes the counters; the answer it stopped settles its reservation only afterwards (held
    here until the command has finished). The settlement must not write the counter again."""
    server = await serve(offline_tokens_per_s=1000, offline_reply_words=5000, frame_interval_ms=1)
    budgets: Budgets = server.client.app[CHAT].budgets
    settle, deleted, settled = budgets.settle, asyncio.Event(), asyncio.Event()

    async def settle_after_the_command(*args: Any) -> None:
        await deleted.wait()
        await settle(*args)
        settled.set()

    monkeypatch.setattr(budgets, "settle", settle_after_the_command)
    sock = await server.connect({"token": token("stu-1")})
    user_id = sock.frames[0]["user"]["id"]
    await sock.send(type="message", id="q1", text="a question")
    await sock.until("token")  # its answer streams
    assert await _counters_of(server, user_id) == 2

    await _delete_user(server.settings)
    capsys.readouterr()
    deleted.set()
    await asyncio.wait_for(settled.wait(), 10)
    assert await _counters_of(server, user_id) == 0


async def test_purge_deletes_erasure_records_and_logouts_once_every_token_has_expired(
    serve: Serve, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await serve(session_key=new_session_key())
    csrf, cookies = await _login(server)
    assert (await server.client.delete("/api/session", headers={**cookies, CSRF_HEADER: csrf})).status == 200
    held = {user: token(user) for user in ("stu-1", "stu-2", "stu-3")}
    for user, value in held.items():
        await server.connect({"token": value})
        await _delete_user(server.settings, user)
    assert await db.fetchval("SELECT count(*) FROM revoked_sessions") == 1
    # Time passes for two of the erasures and the logout: every token they refuse has expired.
    await db.execute(
        "UPDATE erased_users SET expires_at = now() - interval '1 second' WHERE subject <> ("
        " SELECT subject FROM erased_users ORDER BY deleted_at DESC LIMIT 1)"
    )
    await db.execute("UPDATE revoked_sessions SET expires_at = now() - interval '1 second'")
    capsys.readouterr()

    assert await _cli(server.settings, "purge", "--older-than", "365d", "--dry-run") == 0
    assert "expired: would delete 2 erasure records, 1 logged-out session" in capsys.readouterr().out
    assert await db.fetchval("SELECT count(*) FROM erased_users") == 3
    assert await _cli(server.settings, "purge", "--older-than", "365d", "--batch-size", "1") == 0
    assert "expired: deleted 2 erasure records, 1 logged-out session" in capsys.readouterr().out
    assert await db.fetchval("SELECT count(*) FROM erased_users") == 1
    assert await db.fetchval("SELECT count(*) FROM revoked_sessions") == 0
    # The erasure still recorded still refuses its token; the others' tokens would have expired by now.
    fresh = await serve()
    await _refused_at_hello(fresh, {"token": held["stu-3"]})
    assert await _cli(server.settings, "purge", "--older-than", "365d") == 0
    assert "expired:" not in capsys.readouterr().out
