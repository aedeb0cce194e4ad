"""Every malformed frame, bad token and foreign id ends in the right error, and the database stays consistent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.errors import CloseCode
from tests.conftest import TEST_SECRET, Serve, Server, seed_course, token

pytestmark = pytest.mark.integration


async def _counts(db: asyncpg.Connection) -> tuple[int, int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM conversations), (SELECT count(*) FROM ai_usage)"
    )
    assert row is not None
    return (row[0], row[1], row[2])


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ("this is not json", "bad_request", "not valid JSON"),
        ("[1, 2, 3]", "bad_request", "JSON object"),
        ('"hello"', "bad_request", "JSON object"),
        ('{"no_type": 1}', "bad_request", "'type'"),
        ('{"type": 7}', "bad_request", "'type'"),
        ('{"type": "launch_rockets"}', "bad_request", "unknown frame type"),
        ('{"type": "message", "text": "hi"}', "bad_request", "'id'"),
        ('{"type": "message", "id": 5, "text": "hi"}', "bad_request", "'id'"),
        ('{"type": "message", "id": "' + "x" * 65 + '", "text": "hi"}', "bad_request", "'id'"),
        ('{"type": "message", "id": "a"}', "bad_request", "'text'"),
        ('{"type": "message", "id": "a", "text": ["hi"]}', "bad_request", "'text'"),
        ('{"type": "message", "id": "a", "text": "   "}', "bad_request", "empty"),
        ('{"type": "message", "id": "a", "text": "hi", "conversation_id": 12}', "bad_request", "conversation_id"),
        ('{"type": "cancel"}', "bad_request", "reply_id"),
        ('{"type": "cancel", "reply_id": "12"}', "bad_request", "reply_id"),
        ('{"type": "cancel", "reply_id": true}', "bad_request", "reply_id"),
        ('{"type": "history", "limit": 0}', "bad_request", "limit"),
        ('{"type": "history", "limit": 1000}', "bad_request", "limit"),
        ('{"type": "history", "before": -4}', "bad_request", "before"),
        ('{"type": "hello", "token": "x"}', "bad_request", "hello was already received"),
    ],
)
async def test_malformed_frames_after_hello(
    server: Server, db: asyncpg.Connection, raw: str, code: str, fragment: str
) -> None:
    sock = await server.connect({"token": token()})
    before = await _counts(db)
    await sock.ws.send_str(raw)
    error = await sock.expect("error")
    assert error["code"] == code and fragment in error["message"], error
    # The socket stays usable and nothing was written.
    await sock.send(type="ping")
    assert (await sock.expect("pong")) == {"type": "pong"}
    assert await _counts(db) == before


async def test_binary_frame_is_refused(server: Server) -> None:
    sock = await server.connect({"token": token()})
    await sock.ws.send_bytes(b'{"type":"ping"}')
    error = await sock.expect("error")
    assert error["code"] == "bad_request" and "binary" in error["message"]


async def test_oversized_message_and_frame(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(max_message_chars=100)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="big", text="x" * 101)
    error = await sock.expect("error")
    assert error == {"type": "error", "code": "too_large", "message": error["message"], "ref": "big"}
    await sock.ws.send_str('{"type":"ping","pad":"' + "y" * (server.settings.max_frame_bytes + 10) + '"}')
    assert (await sock.expect("error"))["code"] == "too_large"
    await sock.send(type="message", id="ok", text="x" * 100)
    assert (await sock.expect("ack"))["id"] == "ok"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE client_id = 'big'") == 0


async def test_frames_before_hello_are_refused_and_hello_still_works(server: Server) -> None:
    sock = await server.connect()
    await sock.send(type="message", id="m", text="hi")
    error = await sock.expect("error")
    assert error["code"] == "bad_request" and "first frame must be hello" in error["message"]
    await sock.send(type="hello", token=token())
    assert (await sock.expect("welcome"))["type"] == "welcome"


async def test_no_hello_in_time_closes_4408(serve: Serve) -> None:
    server = await serve(hello_timeout=0.3)
    sock = await server.connect()
    assert await sock.close_code() == CloseCode.HELLO_TIMEOUT


async def test_hello_deadline_does_not_apply_after_hello(serve: Serve) -> None:
    server = await serve(hello_timeout=0.3)
    sock = await server.connect({"token": token()})
    await asyncio.sleep(0.6)
    await sock.send(type="ping")
    assert (await sock.expect("pong"))["type"] == "pong"


def _none_alg_token() -> str:
    payload = {"sub": "stu-1", "tid": "school-a", "role": "student", "exp": int(time.time()) + 3600}
    return jwt.encode(payload, None, algorithm="none")


def _es256_token() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    payload = {"sub": "stu-1", "tid": "school-a", "role": "student", "exp": int(time.time()) + 3600}
    return jwt.encode(payload, pem, algorithm="ES256")


@pytest.mark.parametrize(
    ("bad_token", "fragment"),
    [
        (None, "token is required"),
        ("not-a-jwt", "invalid token"),
        (token(ttl_s=-60), "expired"),
        (token(secret="another-secret-" + "z" * 40), "invalid token"),
        (_none_alg_token(), "invalid token"),
        (jwt.encode({"sub": "u", "tid": "t", "role": "student", "exp": int(time.time()) + 3600}, TEST_SECRET,
                    algorithm="HS512"), "invalid token"),
        (_es256_token(), "invalid token"),
        (jwt.encode({"sub": "u", "tid": "t", "role": "janitor", "exp": int(time.time()) + 3600}, TEST_SECRET,
                    algorithm="HS256"), "role"),
        (jwt.encode({"sub": "u", "role": "student", "exp": int(time.time()) + 3600}, TEST_SECRET,
                    algorithm="HS256"), "tid"),
        (jwt.encode({"sub": "u", "tid": "t", "role": "student"}, TEST_SECRET, algorithm="HS256"), "exp"),
    ],
)
async def test_bad_tokens_close_4401(
    server: Server, db: asyncpg.Connection, bad_token: str | None, fragment: str
) -> None:
    sock = await server.connect()
    hello: dict[str, Any] = {"type": "hello"}
    if bad_token is not None:
        hello["token"] = bad_token
    await sock.send(**hello)
    error = await sock.expect("error")
    assert error["code"] == "unauthorized" and fragment in error["message"], error
    assert await sock.close_code() == CloseCode.BAD_TOKEN
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_token_in_authorization_header(server: Server) -> None:
    sock = await server.connect({}, headers={"Authorization": f"Bearer {token('hdr-user')}"})
    assert sock.frames[0]["user"]["role"] == "student"


async def test_foreign_conversation_ids_are_not_found(server: Server, db: asyncpg.Connection) -> None:
    owner = await server.connect({"token": token("owner")})
    conversation = owner.frames[0]["conversation_id"]
    await owner.send(type="message", id="secret", text="my private question")
    await owner.until("done")
    before = await _counts(db)

    for intruder in (token("someone-else"), token("owner", tenant="school-b")):
        sock = await server.connect({"token": intruder, "conversation_id": conversation}, welcome=False)
        error = await sock.expect("error")
        assert error["code"] == "not_found", error
        await sock.send(type="hello", token=intruder)
        mine = await sock.expect("welcome")
        assert mine["conversation_id"] != conversation and mine["history"] == []
        await sock.send(type="message", id="x", text="hi", conversation_id=conversation)
        assert (await sock.expect("error")) == {
            "type": "error", "code": "not_found", "message": "conversation not found", "ref": "x"
        }
        await sock.send(type="history", conversation_id=conversation)
        assert (await sock.expect("error"))["code"] == "not_found"
        await sock.send(type="history", conversation_id="not-a-uuid")
        assert (await sock.expect("error"))["code"] == "not_found"
    reply_id = next(f["reply_id"] for f in owner.frames if f["type"] == "ack")
    sock = await server.connect({"token": token("someone-else")})
    await sock.send(type="cancel", reply_id=reply_id)
    assert (await sock.expect("error"))["code"] == "not_found"
    messages, conversations, usage = await _counts(db)
    assert (messages, usage) == before[0::2] and conversations == before[1] + 2


async def test_other_tenants_course_is_not_found_and_unlisted_course_forbidden(
    server: Server, db: asyncpg.Connection
) -> None:
    await seed_course(server.settings, "school-b", "bio-1", "Biology")
    await seed_course(server.settings, "school-a", "alg-1", "Algebra")
    sock = await server.connect({"token": token(), "course_id": "bio-1"}, welcome=False)
    assert (await sock.expect("error"))["code"] == "not_found"

    restricted = token(courses=["alg-1"])
    sock = await server.connect({"token": restricted, "course_id": "geo-9"}, welcome=False)
    error = await sock.expect("error")
    assert error["code"] == "forbidden"
    assert await sock.close_code() == CloseCode.FORBIDDEN
    assert await db.fetchval("SELECT count(*) FROM conversations WHERE course_id IS NOT NULL") == 0


async def test_origin_is_checked_for_browsers(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(allowed_origins=("https://lms.example.edu",))
    for origin in ("https://lms.example.edu", None):
        headers = {"Origin": origin} if origin else {}
        sock = await server.connect({"token": token()}, headers=headers)
        assert sock.frames[0]["type"] == "welcome"
    own = f"http://{server.client.host}:{server.client.port}"
    sock = await server.connect({"token": token()}, headers={"Origin": own})
    assert sock.frames[0]["type"] == "welcome"

    # Another web origin may connect only if the token's school allows it; found out at hello.
    evil = await server.connect({"token": token()}, headers={"Origin": "https://evil.example"}, welcome=False)
    assert (await evil.expect("error"))["code"] == "forbidden"
    assert await evil.close_code() == CloseCode.FORBIDDEN
    await db.execute("INSERT INTO tenants (id, allowed_origins) VALUES ('school-a', ARRAY['https://school-a.example'])"
                     " ON CONFLICT (id) DO UPDATE SET allowed_origins = EXCLUDED.allowed_origins")
    school = await server.connect({"token": token()}, headers={"Origin": "https://school-a.example"})
    assert school.frames[0]["type"] == "welcome"
    other_school = await server.connect(
        {"token": token(tenant="school-b")}, headers={"Origin": "https://school-a.example"}, welcome=False
    )
    assert (await other_school.expect("error"))["code"] == "forbidden"

    # Not a web origin at all: refused before the upgrade.
    response = await server.client.get(
        "/ws", headers={"Origin": "null", "Upgrade": "websocket", "Connection": "Upgrade",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    )
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


async def test_redis_failure_gives_explicit_error_and_no_row(server: Server, db: asyncpg.Connection) -> None:
    from redis.asyncio import Redis

    from server.keys import REDIS

    sock = await server.connect({"token": token()})
    store = server.client.app[REDIS]
    healthy = store.client
    broken = Redis.from_url("unix:///nonexistent/redis.sock")
    store.client = broken
    for script in (store._emit, store._snapshot, store._admit):
        script.registered_client = broken
    # The admits and the emits have connections of their own: those lose Redis too.
    dedicated = {name: getattr(store, name) for name in ("_admit_conn", "_emit_conn")}
    pool = broken.connection_pool
    for name in dedicated:
        setattr(store, name, pool.connection_class(**pool.connection_kwargs))
    try:
        await sock.send(type="message", id="r1", text="hello?")
        error = await sock.expect("error")
        assert error["code"] == "internal" and error["retry_after"] == 1.0 and "ref" in error
        response = await server.client.get("/ready")
        assert response.status == 503 and (await response.json())["redis"].startswith("unavailable")
        assert (await server.client.get("/health")).status == 200  # liveness does not ask Redis
    finally:
        store.client = healthy
        for script in (store._emit, store._snapshot, store._admit):
            script.registered_client = healthy
        for name, conn in dedicated.items():
            setattr(store, name, conn)
        await broken.aclose()
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert (await server.client.get("/ready")).status == 200
    await sock.send(type="message", id="r1", text="hello?")
    assert (await sock.expect("ack"))["id"] == "r1"


async def test_a_timely_hello_that_is_slow_to_process_is_not_timed_out(serve: Serve) -> None:
    from server.keys import CHAT

    server = await serve(hello_timeout=0.3)
    chat = server.client.app[CHAT]
    original = chat.open_session

    async def slow_open_session(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.6)  # e.g. a busy database, after the hello arrived in time
        return await original(*args, **kwargs)

    chat.open_session = slow_open_session  # type: ignore[method-assign]
    sock = await server.connect({"token": token()})
    assert sock.frames[0]["type"] == "welcome"
    await sock.send(type="ping")
    assert (await sock.expect("pong"))["type"] == "pong"
