"""A write whose target vanished after the server checked it (a data-protection deletion between the
check and the write) is `not_found` for the client, over the socket and over HTTP, never `internal`."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import error_middleware
from server.errors import ErrorCode, from_storage
from server.keys import DATABASE
from storage.errors import ClientIdTakenError, NotFoundError
from tests.conftest import Server, token

pytestmark = pytest.mark.integration


async def test_a_message_into_a_conversation_deleted_meanwhile_is_not_found(
    server: Server, db: asyncpg.Connection
) -> None:
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    database = server.client.app[DATABASE]
    original = database.save_question

    async def deleted_first(*args: Any, **kwargs: Any) -> Any:
        await db.execute("DELETE FROM conversations WHERE id = $1", conversation)
        return await original(*args, **kwargs)

    database.save_question = deleted_first  # type: ignore[method-assign]
    await sock.send(type="message", id="m1", text="Is anyone there?")
    error = await sock.expect("error")
    assert error["code"] == "not_found" and error["ref"] == "m1" and "log_ref" not in error, error
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    await sock.send(type="ping")
    await sock.expect("pong")  # the socket stays usable


async def test_storage_errors_over_http_are_client_errors(aiohttp_client: Any) -> None:
    async def vanished(request: web.Request) -> web.Response:
        raise NotFoundError("conversation")

    async def taken(request: web.Request) -> web.Response:
        raise ClientIdTakenError("the id 'x' already names another message in the conversation")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/vanished", vanished)
    app.router.add_get("/taken", taken)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(TestServer(app))
    response = await client.get("/vanished")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    response = await client.get("/taken")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_request"


def test_from_storage_keeps_the_ref() -> None:
    error = from_storage(NotFoundError("conversation"), "m7")
    assert (error.code, error.ref) == (ErrorCode.NOT_FOUND, "m7")
    assert from_storage(ClientIdTakenError("taken"), "m8").code == ErrorCode.BAD_REQUEST
