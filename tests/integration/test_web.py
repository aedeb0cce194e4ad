"""Browser-facing HTTP: cookie sessions with CSRF, the embed page's frame-ancestors, teacher views, CORS."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from server.app import create_app
from server.settings import Settings
from server.websession import CSRF_COOKIE, SESSION_COOKIE, new_session_key
from tests.conftest import Serve, Server, seed_course, token

pytestmark = pytest.mark.integration


async def _login(server: Server, who: str) -> tuple[str, dict[str, str]]:
    """Log in; returns the CSRF token and the Cookie header a browser would send back.

    The test client (like any non-browser) does not send Secure cookies over plain http, so the
    cookies are carried by hand; browsers treat 127.0.0.1 and localhost as secure.
    """
    response = await server.client.post("/api/session", json={"token": who})
    assert response.status == 200, await response.text()
    body = await response.json()
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Strict"
    assert response.cookies[CSRF_COOKIE].value == body["csrf_token"]
    jar = f"{SESSION_COOKIE}={cookie.value}; {CSRF_COOKIE}={body['csrf_token']}"
    server.client.session.cookie_jar.clear()
    return str(body["csrf_token"]), {"Cookie": jar}


async def test_session_cookie_outlives_the_token_and_needs_csrf(serve: Serve) -> None:
    server = await serve()
    await seed_course(server.settings, "school-a", "alg-1", "Algebra")
    short = token("t1", role="teacher", courses=["alg-1"], ttl_s=2)
    csrf, cookies = await _login(server, short)
    await asyncio.sleep(2.5)  # the token has expired; the session has not
    response = await server.client.get("/api/session", headers=cookies)
    assert (await response.json())["user"] == {"id": "t1", "tenant": "school-a", "role": "teacher", "name": ""}
    response = await server.client.get("/api/conversations", headers=cookies)  # GET with the cookie alone
    assert response.status == 200
    # State-changing requests with the cookie need the CSRF header.
    document = {"name": "Notes", "body": "Slope is rise over run."}
    response = await server.client.post("/api/courses/alg-1/documents", json=document, headers=cookies)
    assert response.status == 403 and (await response.json())["error"]["code"] == "forbidden"
    response = await server.client.post("/api/courses/alg-1/documents", json=document,
                                        headers={**cookies, "X-CSRF-Token": "wrong"})
    assert response.status == 403
    response = await server.client.post("/api/courses/alg-1/documents", json=document,
                                        headers={**cookies, "X-CSRF-Token": csrf})
    assert response.status == 201
    # The socket accepts the session cookie from the server's own origin, without a token...
    own = f"http://{server.client.host}:{server.client.port}"
    sock = await server.connect({}, headers={**cookies, "Origin": own})
    assert sock.frames[0]["user"]["role"] == "teacher"
    # ...but not without an Origin (a cookie is a browser credential).
    sock = await server.connect({}, headers=cookies, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"
    response = await server.client.delete("/api/session", headers=cookies)
    assert response.status == 403
    response = await server.client.delete("/api/session", headers={**cookies, "X-CSRF-Token": csrf})
    assert response.status == 200
    gone = response.cookies[SESSION_COOKIE].value
    response = await server.client.get("/api/conversations", headers={"Cookie": f"{SESSION_COOKIE}={gone}"})
    assert response.status == 401


async def test_session_needs_a_valid_token(server: Server) -> None:
    for body in ({"token": "nope"}, {"token": token(ttl_s=-10)}, {}):
        response = await server.client.post("/api/session", json=body)
        assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"


async def test_cookie_alone_does_not_open_a_socket_from_a_tenant_origin(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve()
    _, cookies = await _login(server, token("stu-1"))
    await db.execute("UPDATE tenants SET allowed_origins = ARRAY['https://lms.example'] WHERE id = 'school-a'")
    sock = await server.connect({}, headers={**cookies, "Origin": "https://lms.example"}, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"


async def test_embed_frame_ancestors_follow_the_tenant(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(allowed_origins=("https://district.example",))
    await db.execute("INSERT INTO tenants (id, allowed_origins) VALUES ('school-a', ARRAY['https://lms.school-a.example'])")
    response = await server.client.get("/embed?course=alg-1&tenant=school-a")
    csp = response.headers["Content-Security-Policy"]
    assert response.status == 200
    assert "frame-ancestors https://district.example https://lms.school-a.example" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    response = await server.client.get("/embed?tenant=unknown")
    assert response.headers["Content-Security-Policy"].endswith("frame-ancestors https://district.example")
    page = await (await server.client.get("/embed?tenant=unknown")).text()
    assert 'name="smartedu-parent-origin" content="https://district.example"' in page

    bare = await serve()
    response = await bare.client.get("/embed")
    assert response.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    for path in ("/chat", "/teacher", "/static/chat.html"):
        response = await bare.client.get(path)
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path


async def test_pages_connect_to_their_own_origin_and_the_public_url_only(serve: Serve) -> None:
    """connect-src allowed `ws: wss:` (a script could open a socket to any host): now 'self', plus the
    public URL's socket origin when one is configured (Safari before 16 never matched a socket with 'self')."""
    bare = await serve()
    public = await serve(public_url="https://tutor.example.edu")
    odd = await serve(public_url="https://tutor.example.edu;script-src *")
    for path in ("/chat", "/teacher", "/embed", "/static/chat.html"):
        for server, connect in ((bare, "'self'"), (public, "'self' wss://tutor.example.edu"), (odd, "'self'")):
            csp = (await server.client.get(path)).headers["Content-Security-Policy"]
            assert f"; connect-src {connect};" in csp, (path, csp)
    http = await serve(public_url="http://tutor.example.edu:8080/school")
    csp = (await http.client.get("/chat")).headers["Content-Security-Policy"]
    assert "; connect-src 'self' ws://tutor.example.edu:8080;" in csp


async def test_bad_entries_in_a_schools_origins_never_reach_the_csp(serve: Serve, db: asyncpg.Connection) -> None:
    """A tenant's allowed_origins are not checked where they are written: `*` (which means nothing for CORS
    or WebSockets) made /embed frameable by every site, and an entry with `;` added its own directives."""
    server = await serve()
    bad = ["*", "https://x.example; script-src *", "javascript:alert(1)", "https://y.example/path", "https://"]
    await db.execute("INSERT INTO tenants (id, allowed_origins) VALUES ('school-a', $1)", [*bad, "https://ok.example/"])
    response = await server.client.get("/embed?course=alg-1&tenant=school-a")
    csp = response.headers["Content-Security-Policy"]
    assert csp.endswith("; frame-ancestors https://ok.example"), csp
    assert "script-src *" not in csp and "unsafe-inline" not in csp
    assert 'name="smartedu-parent-origin" content="https://ok.example"' in await response.text()
    await db.execute("UPDATE tenants SET allowed_origins = $1 WHERE id = 'school-a'", bad)
    response = await server.client.get("/embed?course=alg-1&tenant=school-a")
    assert response.headers["Content-Security-Policy"].endswith("; frame-ancestors 'none'")


async def test_teacher_views(serve: Serve) -> None:
    server = await serve()
    await seed_course(server.settings, "school-a", "alg-1", "Algebra")
    await seed_course(server.settings, "school-a", "geo-1", "Geometry")
    await seed_course(server.settings, "school-b", "bio-1", "Biology")
    teacher = {"Authorization": f"Bearer {token('t', role='teacher', courses=['alg-1'])}"}
    admin = {"Authorization": f"Bearer {token('a', role='admin')}"}
    assert (await (await server.client.get("/api/teacher/courses", headers=teacher)).json()) == {
        "courses": [{"id": "alg-1", "title": "Algebra"}]
    }
    courses = (await (await server.client.get("/api/teacher/courses", headers=admin)).json())["courses"]
    assert [c["id"] for c in courses] == ["alg-1", "geo-1"]
    response = await server.client.get("/api/teacher/courses", headers={"Authorization": f"Bearer {token()}"})
    assert response.status == 403

    student = await server.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    await student.send(type="message", id="q", text="What is x?")
    await student.until("done")
    conversation = student.frames[0]["conversation_id"]
    response = await server.client.get(f"/api/teacher/conversations/{conversation}/messages", headers=teacher)
    page = await response.json()
    assert response.status == 200 and [m["role"] for m in page["messages"]] == ["user", "assistant"]
    assert page["ai_paused"] is False
    other_teacher = {"Authorization": f"Bearer {token('t2', role='teacher', courses=['geo-1'])}"}
    response = await server.client.get(f"/api/teacher/conversations/{conversation}/messages", headers=other_teacher)
    assert response.status == 403
    foreign = {"Authorization": f"Bearer {token('a', role='admin', tenant='school-b')}"}
    response = await server.client.get(f"/api/teacher/conversations/{conversation}/messages", headers=foreign)
    assert response.status == 404


async def test_cors_for_configured_origins(serve: Serve) -> None:
    server = await serve(allowed_origins=("https://lms.example",))
    response = await server.client.options(
        "/api/conversations",
        headers={"Origin": "https://lms.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "Authorization"},
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.example"
    response = await server.client.options(
        "/api/conversations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert response.status == 403
    response = await server.client.get("/api/conversations", headers={
        "Origin": "https://lms.example", "Authorization": f"Bearer {token()}"
    })
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.example"


async def test_welcome_describes_the_conversation(server: Server) -> None:
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    sock = await server.connect({"token": token(), "course_id": "alg-1"})
    welcome = sock.frames[0]
    assert welcome["course_title"] == "Algebra I" and welcome["has_more"] is False
    assert "regenerate" in welcome["features"] and welcome["ai_paused"] is False


async def test_cors_for_tenant_origins_from_the_database(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve()
    await db.execute("INSERT INTO tenants (id, allowed_origins) VALUES ('school-a', ARRAY['https://lms.school-a.example'])")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
    response = await server.client.options(
        "/api/conversations", headers={"Origin": "https://lms.school-a.example", **preflight}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.school-a.example"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    # Any school may list any origin: that must not open other schools' users' cookie sessions to it.
    assert "Access-Control-Allow-Credentials" not in response.headers
    response = await server.client.get("/api/conversations", headers={
        "Origin": "https://lms.school-a.example", "Authorization": f"Bearer {token()}"
    })
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.school-a.example"
    assert "Access-Control-Allow-Credentials" not in response.headers
    # An error reaches the school's page as that error, not as an opaque network failure.
    response = await server.client.get("/api/conversations", headers={
        "Origin": "https://lms.school-a.example", "Authorization": "Bearer not-a-token"
    })
    assert response.status == 401
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.school-a.example"
    response = await server.client.get("/api/conversations", headers={
        "Origin": "https://unknown.example", "Authorization": f"Bearer {token()}"
    })
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_school_page_may_send_every_method_the_api_has(serve: Serve, db: asyncpg.Connection) -> None:
    """A school's origin from the database gets every method of the REST API in its preflight: replacing a
    course document is a PUT."""
    server = await serve()
    await db.execute("INSERT INTO tenants (id, allowed_origins) VALUES ('school-a', ARRAY['https://lms.school-a.example'])")
    methods = {
        route.method for route in server.client.server.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/api/")
        and route.method not in ("HEAD", "OPTIONS", "*")
    }
    assert {"GET", "POST", "PUT", "DELETE"} <= methods
    for method in sorted(methods):
        response = await server.client.options("/api/courses/alg-1/documents/1", headers={
            "Origin": "https://lms.school-a.example", "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        })
        assert response.status == 200, method
        allowed = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
        assert method in allowed, method


def test_a_missing_session_key_is_warned_about(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.app"):
        create_app(replace(settings, session_key=None))
    assert any("SMARTEDU_SESSION_KEY is not set" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.app"):
        create_app(replace(settings, session_key=new_session_key()))
    assert not [record for record in caplog.records if "SESSION_KEY" in record.getMessage()]


async def test_wildcard_origins_get_cors_and_sockets_without_the_cookie(serve: Serve) -> None:
    # `*` used to grant credentialed CORS (and the cookie on sockets) to every site on the web.
    server = await serve(allowed_origins=("*",))
    _, cookies = await _login(server, token("stu-1"))
    evil = "https://evil.example"
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "Authorization"}
    response = await server.client.options("/api/conversations", headers={"Origin": evil, **preflight})
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == evil
    assert "Access-Control-Allow-Credentials" not in response.headers
    response = await server.client.get("/api/session", headers={**cookies, "Origin": evil})
    assert "Access-Control-Allow-Credentials" not in response.headers
    bearer = {"Origin": evil, "Authorization": f"Bearer {token()}"}
    response = await server.client.get("/api/conversations", headers=bearer)
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == evil
    assert "Access-Control-Allow-Credentials" not in response.headers
    # Any origin may open a socket with a token, but the cookie alone does not sign it in...
    sock = await server.connect({}, headers={**cookies, "Origin": evil}, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"
    sock = await server.connect({"token": token()}, headers={"Origin": evil})
    assert sock.frames[0]["type"] == "welcome"
    # ...while the server's own origin keeps its cookie session.
    own = f"http://{server.client.host}:{server.client.port}"
    sock = await server.connect({}, headers={**cookies, "Origin": own})
    assert sock.frames[0]["type"] == "welcome" and sock.frames[0]["user"]["role"] == "student"


async def test_forwarded_headers_do_not_make_a_foreign_origin_the_servers_own(serve: Serve) -> None:
    # The socket's same-origin check reads Host only: a client's X-Forwarded-Host/Proto do not make its page
    # the server's own origin, whose sockets the cookie session signs in.
    server = await serve()
    _, cookies = await _login(server, token("stu-1"))
    faked = {"Origin": "https://evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    sock = await server.connect({}, headers={**cookies, **faked}, welcome=False)
    assert (await sock.expect("error"))["code"] == "unauthorized"


async def test_origins_listed_by_name_keep_credentialed_cors_next_to_a_wildcard(serve: Serve) -> None:
    server = await serve(allowed_origins=("https://lms.example", "*"))
    preflight = {"Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "X-CSRF-Token"}
    response = await server.client.options("/api/session", headers={"Origin": "https://lms.example", **preflight})
    assert response.headers["Access-Control-Allow-Origin"] == "https://lms.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    response = await server.client.options("/api/session", headers={"Origin": "https://other.example", **preflight})
    assert response.headers["Access-Control-Allow-Origin"] == "https://other.example"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_pages_name_their_files_by_content(serve: Serve, settings: Settings, tmp_path: Path) -> None:
    """During a rolling upgrade (and for an hour after, as NGINX and browsers cache /static/) a page of this
    release met the previous release's common.js, which lacks what this chat.js and teacher.js call
    (`common.Pacer`): a dead page. Each page names its files with a fingerprint of their content, so a file
    of another release, cached under its own URL, is never used with it."""
    static = tmp_path / "static"
    shutil.copytree(settings.static_dir, static)
    server = await serve(static_dir=static)
    pages = ("/chat", "/teacher", "/embed")
    before: dict[str, list[str]] = {}
    for path in pages:
        response = await server.client.get(path)
        assert response.status == 200 and response.headers["Cache-Control"] == "no-cache", path
        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', await response.text())
        assert "/static/common.js" in {ref.split("?")[0] for ref in refs}, (path, refs)
        for ref in refs:
            name, _, version = ref.removeprefix("/static/").partition("?v=")
            assert version, (path, ref)
            served = await server.client.get(ref)
            assert served.status == 200 and await served.read() == (static / name).read_bytes(), ref
            assert served.headers["Cache-Control"] == "public, max-age=31536000, immutable", ref
        before[path] = refs

    common = static / "common.js"
    common.write_text(common.read_text(encoding="utf-8") + "\n// the next release\n", encoding="utf-8")
    for path in pages:
        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', await (await server.client.get(path)).text())
        changed = [(old, new) for old, new in zip(before[path], refs, strict=True) if old != new]
        assert [old.split("?")[0] for old, _ in changed] == ["/static/common.js"], (path, changed)
    # Asked for a version it does not hold (a page of another release) or for none, a replica's copy is
    # revalidated on each use, never kept under that URL.
    [(stale, _)] = changed
    for ref in (stale, "/static/common.js"):
        served = await server.client.get(ref)
        assert served.status == 200 and served.headers["Cache-Control"] == "no-cache", ref


async def test_static_files_and_missing_ones(serve: Serve) -> None:
    """A missing file under /static/ is a `not_found` JSON error like any other path (aiohttp's static route
    sent an empty body of type application/octet-stream); paths never leave the directory."""
    server = await serve()
    script = await server.client.get("/static/chat.js")
    assert script.status == 200 and script.content_type in ("application/javascript", "text/javascript")
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    etag = script.headers["ETag"]
    assert (await server.client.get("/static/chat.js", headers={"If-None-Match": etag})).status == 304
    for path in ("/static/nope.js", "/static/%2E%2E/pyproject.toml", "/static/..%2Fpyproject.toml", "/static/vendor/"):
        response = await server.client.get(path)
        assert response.status == 404, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert (await response.json())["error"]["code"] == "not_found", path
