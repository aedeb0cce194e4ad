"""The HTTP surface: health, readiness, the REST API and its JSON errors, the chat page."""

from __future__ import annotations

import pytest

from tests.conftest import Serve, Server, seed_course, token

pytestmark = pytest.mark.integration

# What a browser's WebSocket handshake sends (the path and its query come first).
WS_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def test_health_and_ready(server: Server) -> None:
    response = await server.client.get("/health")
    assert response.status == 200 and (await response.json())["status"] == "ok"
    response = await server.client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "postgres": "ok", "redis": "ok"}


async def test_api_needs_a_valid_bearer_token(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": f"Basic {token()}"}):
        response = await server.client.get("/api/conversations", headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"


async def test_conversations_and_messages_are_the_users_own(server: Server) -> None:
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    for i in range(3):
        await sock.send(type="message", id=f"m{i}", text=f"question {i}")
        await sock.until("done")
    auth = {"Authorization": f"Bearer {token()}"}

    response = await server.client.get("/api/conversations", headers=auth)
    body = await response.json()
    assert response.status == 200 and [c["id"] for c in body["conversations"]] == [conversation]
    assert body["conversations"][0]["title"] == "question 0"

    response = await server.client.get(f"/api/conversations/{conversation}/messages?limit=4", headers=auth)
    page = await response.json()
    assert response.status == 200 and page["has_more"] is True and len(page["messages"]) == 4
    oldest = page["messages"][0]["id"]
    response = await server.client.get(f"/api/conversations/{conversation}/messages?before={oldest}", headers=auth)
    rest = await response.json()
    assert rest["has_more"] is False and len(rest["messages"]) == 2

    for other in (token("intruder"), token("stu-1", tenant="school-b")):
        response = await server.client.get(
            f"/api/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {other}"}
        )
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
        listing = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {other}"})
        assert (await listing.json())["conversations"] == []


async def test_conversations_are_listed_by_latest_activity(server: Server) -> None:
    """The conversation row is written when an answer is committed (not again for every question)."""
    for course in ("alg-1", "geo-1"):
        await seed_course(server.settings, "school-a", course, course.title())
    student = token(courses=["alg-1", "geo-1"])
    ids = {}
    for course in ("alg-1", "geo-1", "alg-1"):
        sock = await server.connect({"token": student, "course_id": course})
        ids[course] = sock.frames[0]["conversation_id"]
        await sock.send(type="message", id=f"q-{course}-{len(ids)}", text=f"about {course}")
        await sock.until("done")
        await sock.close()
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {student}"})
    listed = (await response.json())["conversations"]
    assert [c["id"] for c in listed] == [ids["alg-1"], ids["geo-1"]]
    assert [c["title"] for c in listed] == ["about alg-1", "about geo-1"]  # the first question names it


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=1000", "before=-1", "before=x"])
async def test_bad_query_parameters_are_400(server: Server, query: str) -> None:
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    response = await server.client.get(
        f"/api/conversations/{conversation}/messages?{query}", headers={"Authorization": f"Bearer {token()}"}
    )
    assert response.status == 400 and (await response.json())["error"]["code"] == "bad_request"


async def test_unknown_route_is_json_404(server: Server) -> None:
    response = await server.client.get("/api/nothing-here")
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


async def test_chat_page_is_served_with_a_strict_csp(server: Server) -> None:
    response = await server.client.get("/chat")
    assert response.status == 200
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<html" in (await response.text()).lower()


async def test_request_id_is_echoed_or_generated(server: Server) -> None:
    response = await server.client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    response = await server.client.get("/api/conversations")
    generated = response.headers["X-Request-ID"]
    assert response.status == 401 and len(generated) == 32
    response = await server.client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert response.headers["X-Request-ID"] != "x" * 500


def test_logs_are_json_lines_with_the_request_id() -> None:
    import logging

    import orjson

    from server.logs import JsonFormatter, request_id

    token = request_id.set("req-7")
    try:
        record = logging.LogRecord("smartedu", logging.INFO, __file__, 1, "turn finished", (), None)
        record.reply_id = 42
        line = JsonFormatter("replica-a").format(record)
    finally:
        request_id.reset(token)
    entry = orjson.loads(line)
    assert entry["event"] == "turn finished" and entry["request_id"] == "req-7" and entry["reply_id"] == 42
    assert entry["replica"] == "replica-a" and entry["level"] == "info" and entry["ts"].endswith("Z")


@pytest.mark.parametrize(
    ("path", "headers", "status", "words"),
    [
        ("/api/conversations", {"Authorization": "Bearer " + "a" * 20_000}, 431, "header 'Authorization'"),
        ("/api/conversations", {"Cookie": "smartedu=" + "c" * 9_000}, 431, "header 'Cookie'"),
        ("/ws?token=" + "t" * 20_000, WS_UPGRADE, 414, "URL"),
        ("/api/conversations?x=" + "q" * 9_000, {}, 414, "URL"),
    ],
    ids=["bearer-token", "cookie", "websocket-token-in-query", "query"],
)
async def test_oversized_headers_and_urls_get_the_json_error(
    server: Server, path: str, headers: dict[str, str], status: int, words: str
) -> None:
    """Over 8190 bytes (a header's value, or the URL) aiohttp's own parser answered a plain-text 400 before
    any of our code ran. Now: the API's JSON error with code too_large, up to 32 KiB."""
    response = await server.client.get(path, headers={**headers, "X-Request-ID": "big-1"})
    assert response.status == status and response.content_type == "application/json", await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "too_large" and words in error["message"] and "8190 bytes" in error["message"], error
    assert response.headers["X-Request-ID"] == "big-1"


async def test_headers_and_urls_up_to_the_limit_are_served(server: Server) -> None:
    response = await server.client.get("/api/conversations", headers={"Authorization": "Bearer " + "a" * 8_183})
    assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
    response = await server.client.get("/api/conversations?x=" + "q" * 8_168, headers={"Authorization": "Bearer x"})
    assert response.status == 401


async def test_a_school_page_can_read_why_its_request_was_too_large(serve: Serve) -> None:
    server = await serve(allowed_origins=("https://lms.example",))
    response = await server.client.get(
        "/api/conversations", headers={"Origin": "https://lms.example", "Authorization": "Bearer " + "a" * 9_000}
    )
    assert response.status == 431 and (await response.json())["error"]["code"] == "too_large"
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.example"
