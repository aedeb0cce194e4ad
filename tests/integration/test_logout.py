"""Logging out revokes the cookie session server-side: a copied cookie stops working everywhere."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.fernet import Fernet

from server.keys import REDIS
from server.websession import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, new_session_key, session_key
from storage.keys import Keys
from tests.conftest import Serve, Server, hold_pubsub_reconnects, kill_pubsub_of, token

pytestmark = pytest.mark.integration


async def _login(server: Server) -> tuple[str, dict[str, str]]:
    response = await server.client.post("/api/session", json={"token": token("stu-1")})
    assert response.status == 200, await response.text()
    csrf = str((await response.json())["csrf_token"])
    server.client.session.cookie_jar.clear()  # carried by hand, as a copy of the cookie would be
    return csrf, {"Cookie": f"{SESSION_COOKIE}={response.cookies[SESSION_COOKIE].value}; {CSRF_COOKIE}={csrf}"}


def _own_origin(server: Server) -> dict[str, str]:
    return {"Origin": f"http://{server.client.host}:{server.client.port}"}


async def test_a_copied_cookie_is_refused_after_logout_and_its_sockets_close(serve: Serve) -> None:
    key = new_session_key()  # both replicas read the same cookies
    first, second = await serve(session_key=key), await serve(session_key=key)
    csrf, copied = await _login(first)
    here = await first.connect({}, headers={**copied, **_own_origin(first)})
    there = await second.connect({}, headers={**copied, **_own_origin(second)})
    with_token = await second.connect({"token": token("stu-1")})  # the user's token is not the session
    assert (await second.client.get("/api/conversations", headers=copied)).status == 200

    response = await first.client.delete("/api/session", headers={**copied, CSRF_HEADER: csrf})
    assert response.status == 200

    # Open sockets of the session close with 4401 on every replica...
    assert await here.close_code() == 4401
    assert await there.close_code() == 4401
    # ...and the copied cookie no longer signs in a request or a socket, on either replica.
    for server in (first, second):
        response = await server.client.get("/api/conversations", headers=copied)
        assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
        assert (await server.client.get("/api/session", headers=copied)).status == 401
        sock = await server.connect({}, headers={**copied, **_own_origin(server)}, welcome=False)
        assert (await sock.expect("error"))["code"] == "unauthorized"
        assert await sock.close_code() == 4401
    await with_token.send(type="ping")
    assert (await with_token.expect("pong"))["type"] == "pong"


async def test_logout_ends_only_its_own_session(serve: Serve) -> None:
    server = await serve()
    csrf, leaving = await _login(server)
    _, staying = await _login(server)  # the same user signed in on another device
    sock = await server.connect({}, headers={**staying, **_own_origin(server)})
    response = await server.client.delete("/api/session", headers={**leaving, CSRF_HEADER: csrf})
    assert response.status == 200
    assert (await server.client.get("/api/conversations", headers=staying)).status == 200
    await sock.send(type="ping")
    assert (await sock.expect("pong"))["type"] == "pong"


async def test_a_socket_upgraded_before_logout_cannot_say_hello_after_it(serve: Serve) -> None:
    server = await serve()
    csrf, cookies = await _login(server)
    sock = await server.connect(None, headers={**cookies, **_own_origin(server)})  # upgraded, no hello yet
    response = await server.client.delete("/api/session", headers={**cookies, CSRF_HEADER: csrf})
    assert response.status == 200
    await sock.send(type="hello")
    error = await sock.expect("error")
    assert error["code"] == "unauthorized" and "logged out" in error["message"]
    assert await sock.close_code() == 4401


async def test_a_logout_announced_while_a_replica_was_reconnecting_still_closes_its_sockets(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logouts reach other replicas by pub/sub, which keeps nothing for a listener that is away: once its
    listener is back, a replica asks Redis about the cookie sessions it has sockets for."""
    key = new_session_key()
    first, second = await serve(session_key=key), await serve(session_key=key)
    csrf, copied = await _login(first)
    there = await second.connect({}, headers={**copied, **_own_origin(second)})
    reconnecting, let_go = hold_pubsub_reconnects(second, monkeypatch)
    await kill_pubsub_of(second)
    async with asyncio.timeout(5):
        await reconnecting.wait()
    response = await first.client.delete("/api/session", headers={**copied, CSRF_HEADER: csrf})
    assert response.status == 200
    let_go.set()
    assert await there.close_code() == 4401


def _cookie_of_an_earlier_version(server: Server, csrf: str) -> str:
    """A session cookie as versions before session ids made it: the same claims, no `sid`."""
    assert server.settings.session_key is not None
    fernet = Fernet(base64.urlsafe_b64encode(session_key(server.settings.session_key)))
    claims = {"sub": "stu-1", "tid": "school-a", "role": "student", "name": "", "courses": None,
              "exp": int(time.time()) + 3600}
    stored = {"created": int(time.time()), "session": {"claims": claims, "csrf": csrf}}
    return fernet.encrypt(json.dumps(stored).encode()).decode()


async def test_a_cookie_of_an_earlier_version_is_taken_until_it_expires(serve: Serve) -> None:
    """Deploying this version (or a rolling upgrade, where older replicas still make such cookies) does not
    sign everyone out: a session without an id works until it expires, though logout cannot revoke a copy."""
    server = await serve(session_key=new_session_key())
    csrf = "csrf-of-an-earlier-version"
    cookies = {"Cookie": f"{SESSION_COOKIE}={_cookie_of_an_earlier_version(server, csrf)}; {CSRF_COOKIE}={csrf}"}
    assert (await server.client.get("/api/conversations", headers=cookies)).status == 200
    sock = await server.connect({}, headers={**cookies, **_own_origin(server)})
    assert sock.frames[0]["type"] == "welcome"
    response = await server.client.delete("/api/session", headers={**cookies, CSRF_HEADER: csrf})
    assert response.status == 200


async def _lose_redis_data(server: Server) -> None:
    """What a Redis restarted without persistence would hold of this test: nothing. Only the test's own keys
    (its prefix) are deleted: the Redis is shared with other runs."""
    client = server.client.app[REDIS].client
    keys = [key async for key in client.scan_iter(match=f"{server.settings.redis_prefix}*", count=1000)]
    for key in keys:
        await client.delete(key)


async def _refused(server: Server, copied: dict[str, str]) -> None:
    response = await server.client.get("/api/conversations", headers=copied)
    assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
    sock = await server.connect({}, headers={**copied, **_own_origin(server)}, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"
    assert await sock.close_code() == 4401


async def test_a_logged_out_cookie_stays_refused_after_redis_loses_its_data(serve: Serve) -> None:
    key = new_session_key()
    first = await serve(session_key=key)
    csrf, copied = await _login(first)
    _, staying = await _login(first)
    response = await first.client.delete("/api/session", headers={**copied, CSRF_HEADER: csrf})
    assert response.status == 200
    await _lose_redis_data(first)
    second = await serve(session_key=key)  # started after the loss: it never heard of the logout
    for server in (second, first):
        await _refused(server, copied)
    assert (await second.client.get("/api/conversations", headers=staying)).status == 200

    # The first request copied the logouts back into Redis, which answers from then on. While another
    # replica is copying them (it holds the lock), PostgreSQL is asked directly.
    keys = Keys(first.settings.redis_prefix)
    client = first.client.app[REDIS].client
    assert await client.exists(keys.revocations_loaded())
    await _lose_redis_data(first)
    await client.set(keys.revocations_loading(), b"1")
    await _refused(first, copied)
    assert not await client.exists(keys.revocations_loaded())
    await client.delete(keys.revocations_loading())
    await _refused(second, copied)
    assert await client.exists(keys.revocations_loaded())
