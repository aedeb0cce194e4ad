"""Cookie sessions against cross-site requests: every state-changing route needs the CSRF token when the
cookie authenticates it, a login cannot be forged by a form, and logging in always makes a new session."""

from __future__ import annotations

import re

import pytest
from aiohttp import hdrs

from server.websession import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from tests.conftest import Serve, Server, seed_course, token

pytestmark = pytest.mark.integration

# Routes that take no cookie: the login itself (a JWT in, a session out) and the LMS's form posts.
NOT_COOKIE_AUTHENTICATED = {("POST", "/api/session"), ("POST", "/lti/login"), ("POST", "/lti/launch")}


async def _login(server: Server) -> tuple[str, str, str]:
    """Log in as a teacher of alg-1: (CSRF token, session cookie, csrf cookie) as a browser would hold them."""
    response = await server.client.post("/api/session", json={"token": token("t1", role="teacher", courses=["alg-1"])})
    assert response.status == 200, await response.text()
    csrf = str((await response.json())["csrf_token"])
    session = response.cookies[SESSION_COOKIE].value
    server.client.session.cookie_jar.clear()  # carried by hand: the test client drops Secure cookies on http
    return csrf, session, response.cookies[CSRF_COOKIE].value


def _state_changing_routes(server: Server, ids: dict[str, str]) -> list[tuple[str, str]]:
    """Every state-changing route with its path's parameters filled in from `ids` (others: alg-1)."""
    routes = []
    for route in server.client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        changes_state = route.method in ("POST", "PUT", "PATCH", "DELETE")
        if changes_state and isinstance(path, str) and (route.method, path) not in NOT_COOKIE_AUTHENTICATED:
            filled = re.sub(r"\{([^}]+)\}", lambda param: ids.get(param.group(1), "alg-1"), path)
            routes.append((route.method, filled))
    return routes


async def test_every_state_changing_route_needs_the_csrf_token_with_the_cookie(serve: Serve) -> None:
    server = await serve()
    await seed_course(server.settings, "school-a", "alg-1", "Algebra")
    csrf, session, csrf_cookie = await _login(server)
    _, _, other_csrf = await _login(server)  # another session's token does not count for this one
    document = {"name": "Notes", "body": "Slope is rise over run."}
    teacher = {"Authorization": f"Bearer {token('t1', role='teacher', courses=['alg-1'])}"}
    added = await server.client.post("/api/courses/alg-1/documents", json=document, headers=teacher)
    document_id = str((await added.json())["id"])
    routes = _state_changing_routes(server, {"document_id": document_id})
    assert ("POST", "/api/courses/alg-1/documents") in routes and ("DELETE", "/api/session") in routes
    assert ("DELETE", f"/api/courses/alg-1/documents/{document_id}") in routes
    cases = {
        "no header": {"Cookie": f"{SESSION_COOKIE}={session}; {CSRF_COOKIE}={csrf_cookie}"},
        "wrong header": {"Cookie": f"{SESSION_COOKIE}={session}; {CSRF_COOKIE}={csrf_cookie}", CSRF_HEADER: "x"},
        "header without the cookie": {"Cookie": f"{SESSION_COOKIE}={session}", CSRF_HEADER: csrf},
        "header and cookie of another session": {
            "Cookie": f"{SESSION_COOKIE}={session}; {CSRF_COOKIE}={other_csrf}",
            CSRF_HEADER: other_csrf,
        },
        "empty header and cookie": {"Cookie": f"{SESSION_COOKIE}={session}; {CSRF_COOKIE}=", CSRF_HEADER: ""},
    }
    for method, path in routes:
        for case, headers in cases.items():
            response = await server.client.request(method, path, json=document, headers=headers)
            assert response.status == 403, (method, path, case, await response.text())
            assert (await response.json())["error"]["code"] == "forbidden"
    good = {"Cookie": f"{SESSION_COOKIE}={session}; {CSRF_COOKIE}={csrf_cookie}", CSRF_HEADER: csrf}
    # The document's name and body again: adding it is idempotent, replacing it changes nothing; deleting
    # it, then logging out, last.
    for method, path in sorted(routes, key=lambda route: (route[0] == "DELETE", route[1] == "/api/session")):
        response = await server.client.request(method, path, json=document, headers=good)
        assert response.status in (200, 201), (method, path, await response.text())


async def test_a_login_cannot_be_forged_by_a_cross_site_form(serve: Serve) -> None:
    """A form can send text/plain or urlencoded bodies without a preflight: the login reads the token only from
    a JSON body or the Authorization header (neither of which a form can send), so no session is made."""
    server = await serve()
    attacker = token("attacker")
    bodies = [
        ("text/plain", f'{{"token": "{attacker}", "x": "="}}'),
        ("application/x-www-form-urlencoded", f"token={attacker}"),
        (
            "multipart/form-data; boundary=b",
            f'--b\r\nContent-Disposition: form-data; name="token"\r\n\r\n{attacker}\r\n--b--\r\n',
        ),
    ]
    for content_type, body in bodies:
        response = await server.client.post(
            "/api/session", data=body, headers={hdrs.CONTENT_TYPE: content_type, hdrs.ORIGIN: "https://evil.example"}
        )
        assert response.status == 401, (content_type, await response.text())
        assert SESSION_COOKIE not in response.cookies


async def test_logging_in_again_makes_a_new_session_and_csrf_token(serve: Serve) -> None:
    """No session fixation: a session cookie already in the browser (planted, or the last user's) is replaced
    by a new session with its own id and CSRF token; the old one does not become the new user's."""
    server = await serve()
    planted_csrf, planted, _ = await _login(server)
    response = await server.client.post(
        "/api/session",
        json={"token": token("stu-2")},
        headers={"Cookie": f"{SESSION_COOKIE}={planted}; {CSRF_COOKIE}={planted_csrf}"},
    )
    assert response.status == 200
    fresh, fresh_csrf = response.cookies[SESSION_COOKIE].value, str((await response.json())["csrf_token"])
    assert fresh != planted and fresh_csrf != planted_csrf
    assert response.cookies[CSRF_COOKIE].value == fresh_csrf
    server.client.session.cookie_jar.clear()
    who = await server.client.get("/api/session", headers={"Cookie": f"{SESSION_COOKIE}={planted}"})
    assert (await who.json())["user"]["id"] == "t1"  # the planted cookie still speaks only for its own user
    who = await server.client.get("/api/session", headers={"Cookie": f"{SESSION_COOKIE}={fresh}"})
    assert (await who.json())["user"]["id"] == "stu-2"
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        cookie = response.cookies[name]
        assert cookie["samesite"] == "Strict" and cookie["secure"] and cookie["path"] == "/", (name, cookie)
    assert response.cookies[SESSION_COOKIE]["httponly"] and not response.cookies[CSRF_COOKIE]["httponly"]
