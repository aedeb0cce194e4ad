"""LTI 1.3 launches against a fake platform (its own RSA keys, JWKS and id_tokens): the whole login →
authorization redirect → launch flow, and every refusal (a 4xx JSON error that writes nothing)."""

from __future__ import annotations

import asyncio
import functools
import html
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import jwt
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server import lti as server_lti
from server.auth import Claims, TokenVerifier
from server.keys import LTI_KEYS
from server.lti import PendingLogin, read_state, sign_state
from tests.conftest import Serve, Server

pytestmark = pytest.mark.integration

TENANT = "school-lti"
CLIENT_ID = "tutor-client-1"
DEPLOYMENT = "deployment-1"
LTI = "https://purl.imsglobal.org/spec/lti/claim/"
MEMBERSHIP = "http://purl.imsglobal.org/vocab/lis/v2/membership"
LEARNER, INSTRUCTOR = f"{MEMBERSHIP}#Learner", f"{MEMBERSHIP}#Instructor"


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """RSA keys are slow to make: one per name for the whole run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakePlatform:
    """An LMS: publishes its JWKS (counting fetches) and signs id_tokens with its private key."""

    def __init__(self) -> None:
        self.kid = "platform-key-1"
        self.published: dict[str, rsa.RSAPrivateKey] = {self.kid: rsa_key("platform")}
        self.jwks_fetches = 0
        self.moved_fetches = 0
        self.jwks_down = False
        self.jwks_delay = 0.0  # seconds before the key set is answered (a hanging LMS)
        self.jwks_answer: web.Response | None = None  # something else than a key set (HTML, a huge body)
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        async def jwks(request: web.Request) -> web.Response:
            self.jwks_fetches += 1
            await asyncio.sleep(self.jwks_delay)
            if self.jwks_answer is not None:
                return self.jwks_answer
            if self.jwks_down:
                return web.json_response({"error": "maintenance"}, status=503)
            return web.json_response(self.key_set())

        async def moved_jwks(request: web.Request) -> web.Response:
            self.moved_fetches += 1
            return web.json_response(self.key_set())

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        app.router.add_get("/moved/jwks", moved_jwks)  # where a redirecting key set URL points
        return app

    def key_set(self) -> dict[str, Any]:
        keys = []
        for kid, private in self.published.items():
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        # An encryption key in the set is ignored.
        keys.append({"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB"})
        return {"keys": keys}

    @property
    def issuer(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def claims(self, nonce: str, /, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": "user-42",
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "name": "Ada Lovelace",
            LTI + "message_type": "LtiResourceLinkRequest",
            LTI + "version": "1.3.0",
            LTI + "deployment_id": DEPLOYMENT,
            LTI + "target_link_uri": "https://tutor.example/lti",
            LTI + "resource_link": {"id": "link-1"},
            LTI + "roles": [LEARNER],
            LTI + "context": {"id": "c-101", "label": "ALG", "title": "Algebra I"},
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def id_token(self, nonce: str, /, *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None,
                 **overrides: Any) -> str:
        kid = kid or self.kid
        signing = key or self.published.get(kid) or rsa_key("platform")
        return jwt.encode(self.claims(nonce, **overrides), signing, algorithm="RS256", headers={"kid": kid})


@dataclass
class Lti:
    """A running tutor with one registered fake platform, and the steps of a launch."""

    server: Server
    platform: FakePlatform
    platform_id: int
    db: asyncpg.Connection

    @property
    def secret(self) -> str:
        assert self.server.settings.jwt_secret is not None
        return self.server.settings.jwt_secret

    def login_params(self, **overrides: str | None) -> dict[str, str]:
        params: dict[str, str | None] = {
            "iss": self.platform.issuer,
            "login_hint": "hint-42",
            "target_link_uri": str(self.server.client.make_url("/lti/launch")),
            "client_id": CLIENT_ID,
            "lti_message_hint": "message-hint-7",
            "lti_deployment_id": DEPLOYMENT,
        }
        params.update(overrides)
        return {name: value for name, value in params.items() if value is not None}

    async def login(self, **overrides: str | None) -> tuple[str, str]:
        """Log in and follow nothing: return the state and nonce the tutor sent to the platform."""
        response = await self.server.client.get("/lti/login", params=self.login_params(**overrides),
                                                allow_redirects=False)
        assert response.status == 302, await response.text()
        query = parse_qs(urlsplit(response.headers["Location"]).query)
        return query["state"][0], query["nonce"][0]

    async def launch(self, id_token: str, state: str) -> ClientResponse:
        return await self.server.client.post("/lti/launch", data={"id_token": id_token, "state": state})

    async def launch_ok(self, **claims: Any) -> tuple[str, str]:
        """A whole successful launch; returns the page's target and its data-lti-window."""
        state, nonce = await self.login()
        response = await self.launch(self.platform.id_token(nonce, **claims), state)
        assert response.status == 200, await response.text()
        return launch_target(await response.text())

    def verify(self, token: str) -> Claims:
        return TokenVerifier(self.server.settings).verify(token)


async def register(db: asyncpg.Connection, platform: FakePlatform, tenant: str, deployment_id: str | None) -> int:
    """Register the platform with the row `smartedu lti add` writes (test_lti_cli.py runs the command itself)."""
    await db.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant)
    platform_id = await db.fetchval(
        "INSERT INTO lti_platforms (tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        tenant,
        platform.issuer,
        CLIENT_ID,
        deployment_id,
        f"{platform.issuer}/auth?lms=1",
        f"{platform.issuer}/jwks",
    )
    return int(platform_id)


@pytest.fixture
async def lti(serve: Serve, db: asyncpg.Connection, aiohttp_server: Any) -> Lti:
    platform = FakePlatform()
    platform.server = await aiohttp_server(platform.app())
    server = await serve()
    return Lti(server, platform, await register(db, platform, TENANT, DEPLOYMENT), db)


def launch_target(page: str) -> tuple[str, str]:
    match = re.search(r'data-lti-target="([^"]*)" data-lti-window="(same|new)"', page)
    assert match, page
    return html.unescape(match.group(1)), match.group(2)


def fragment(target: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(target).fragment).items()}


async def count(db: asyncpg.Connection, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))


async def test_forwarded_headers_from_a_client_do_not_change_the_redirect_uri(lti: Lti) -> None:
    # The app reads no X-Forwarded-* (nor Forwarded): behind a proxy SMARTEDU_PUBLIC_URL says the URL, and
    # NGINX passes X-Forwarded-Proto on only from SMARTEDU_TRUSTED_PROXIES (tests/unit/test_deploy_static.py).
    faked = {
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example", "Forwarded": "proto=https;host=evil.example"
    }
    response = await lti.server.client.get(
        "/lti/login", params=lti.login_params(), headers=faked, allow_redirects=False
    )
    assert response.status == 302
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["redirect_uri"] == [str(lti.server.client.make_url("/lti/launch"))]
    assert query["redirect_uri"][0].startswith("http://127.0.0.1:")


async def test_student_launch_ends_in_the_embed_with_a_token_in_the_fragment(lti: Lti) -> None:
    response = await lti.server.client.get("/lti/login", params=lti.login_params(), allow_redirects=False)
    assert response.status == 302 and response.headers["Cache-Control"] == "no-store"
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{lti.platform.issuer}/auth"
    query = {name: values[0] for name, values in parse_qs(location.query).items()}
    state, nonce = query.pop("state"), query.pop("nonce")
    assert len(state) >= 40 and len(nonce) >= 40 and state != nonce
    assert query == {
        "lms": "1",  # the platform's own query is kept
        "scope": "openid",
        "response_type": "id_token",
        "response_mode": "form_post",
        "prompt": "none",
        "client_id": CLIENT_ID,
        "redirect_uri": str(lti.server.client.make_url("/lti/launch")),
        "login_hint": "hint-42",
        "lti_message_hint": "message-hint-7",
    }
    # Login stores nothing: the state is the login, signed with a key derived from the server's secret.
    assert await count(lti.db, "lti_login_states") == 0 and await count(lti.db, "lti_nonces") == 0
    login = read_state(lti.secret, state)
    assert (login.tenant_id, login.platform_id, login.nonce) == (TENANT, lti.platform_id, nonce)
    assert 0 < login.expires_at - time.time() <= 600
    with pytest.raises(jwt.InvalidTokenError):  # nor is it signed with the key of our access tokens
        jwt.decode(state, lti.secret, algorithms=["HS256"], options={"verify_aud": False})

    response = await lti.launch(lti.platform.id_token(nonce), state)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/html" and response.headers["Cache-Control"] == "no-store"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert csp.endswith(f"frame-ancestors {lti.platform.issuer}")  # the LMS may frame the launch page
    page = await response.text()
    [script] = re.findall(r"<script[^>]*>", page)  # one, loaded from our origin (named by its content)
    assert re.fullmatch(r'<script src="/static/lti-launch\.js\?v=[0-9a-f]+" defer>', script), script
    target, window = launch_target(page)
    course = f"lti-{lti.platform_id}-c-101"
    parts = urlsplit(target)
    assert (parts.scheme, parts.netloc, parts.path, window) == ("", "", "/embed", "same")
    assert parse_qs(parts.query) == {"course": [course], "tenant": [TENANT]}  # and no token in the query
    assert fragment(target)["course"] == course
    claims = lti.verify(fragment(target)["token"])
    assert claims.sub == f"lti:{lti.platform_id}:user-42" and claims.tenant == TENANT
    assert (claims.role, claims.name, claims.courses) == ("student", "Ada Lovelace", (course,))
    assert claims.exp - time.time() <= 3600
    row = await lti.db.fetchrow("SELECT tenant_id, title FROM courses WHERE id = $1", course)
    assert row is not None and dict(row) == {"tenant_id": TENANT, "title": "Algebra I"}
    # The verified launch used its nonce up (until the login would have expired): a replay is refused.
    assert await lti.db.fetchval("SELECT tenant_id FROM lti_nonces WHERE nonce = $1", nonce) == TENANT

    script = await lti.server.client.get("/static/lti-launch.js")
    assert script.status == 200 and "location.replace" in await script.text()
    # The embed page takes the student on: the token is accepted by the socket.
    sock = await lti.server.connect({"token": fragment(target)["token"], "course_id": course})
    assert (sock.frames[0]["user"]["name"], sock.frames[0]["user"]["role"]) == ("Ada Lovelace", "student")
    user = await lti.db.fetchrow("SELECT tenant_id, external_id FROM users")
    assert user is not None and dict(user) == {"tenant_id": TENANT, "external_id": f"lti:{lti.platform_id}:user-42"}
    assert sock.frames[0]["course_title"] == "Algebra I"
    await sock.close()


async def test_teacher_launch_opens_the_dashboard_for_an_existing_course(
    serve: Serve, db: asyncpg.Connection, aiohttp_server: Any
) -> None:
    platform = FakePlatform()
    platform.server = await aiohttp_server(platform.app())
    # Any deployment (NULL), another tenant; the course exists already and keeps its title.
    platform_id = await register(db, platform, "school-t", None)
    lti = Lti(await serve(), platform, platform_id, db)
    await db.execute("INSERT INTO courses (tenant_id, id, title) VALUES ('school-t', $1, 'Kept')",
                     f"lti-{platform_id}-c-101")
    params = lti.login_params(lti_deployment_id="any", lti_message_hint=None, client_id=None)
    response = await lti.server.client.post("/lti/login", data=params, allow_redirects=False)
    assert response.status == 302
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert "lti_message_hint" not in query and query["client_id"] == [CLIENT_ID]
    id_token = platform.id_token(query["nonce"][0], name=None, given_name="Grace", family_name="Hopper",
                                 **{LTI + "roles": [LEARNER, INSTRUCTOR], LTI + "deployment_id": "another"})
    response = await lti.launch(id_token, query["state"][0])
    assert response.status == 200, await response.text()
    target, window = launch_target(await response.text())
    assert target.startswith("/teacher#token=") and "?" not in target and window == "new"
    claims = lti.verify(fragment(target)["token"])
    assert (claims.role, claims.tenant, claims.name) == ("teacher", "school-t", "Grace Hopper")
    assert claims.courses == (f"lti-{platform_id}-c-101",)
    assert await db.fetchval("SELECT title FROM courses WHERE tenant_id = 'school-t'") == "Kept"

    # An administrator of the course is a teacher of that course, never a tenant-wide admin (who would
    # see every course of the school); an odd context id becomes a hashed course id.
    target, window = await lti.launch_ok(**{
        LTI + "roles": [f"{MEMBERSHIP}#Administrator", LEARNER],
        LTI + "context": {"id": "Kurs 7/β", "title": "Physik"},
    })
    claims = lti.verify(fragment(target)["token"])
    assert (claims.role, window) == ("teacher", "new") and claims.courses is not None
    assert re.fullmatch(rf"lti-{platform_id}-h[0-9a-f]{{40}}", claims.courses[0])
    assert await db.fetchval("SELECT title FROM courses WHERE id = $1", claims.courses[0]) == "Physik"
    headers = {"Authorization": f"Bearer {fragment(target)['token']}"}
    own = await lti.server.client.get(f"/api/courses/{claims.courses[0]}/live", headers=headers)
    assert own.status == 200, await own.text()
    other = await lti.server.client.get(f"/api/courses/lti-{platform_id}-c-101/live", headers=headers)
    assert other.status == 403, await other.text()


async def test_nul_and_lone_surrogates_are_dropped_from_the_title_and_name(lti: Lti) -> None:
    target, _ = await lti.launch_ok(name="Ada\x00 Love\ud800lace",
                                    **{LTI + "context": {"id": "c-101", "title": "Alge\x00bra \udfffI"}})
    token, course = fragment(target)["token"], fragment(target)["course"]
    assert lti.verify(token).name == "Ada Lovelace"
    assert await lti.db.fetchval("SELECT title FROM courses WHERE id = $1", course) == "Algebra I"
    sock = await lti.server.connect({"token": token, "course_id": course})
    assert sock.frames[0]["user"]["name"] == "Ada Lovelace" and sock.frames[0]["course_title"] == "Algebra I"
    await sock.close()


async def test_a_rotated_platform_key_is_fetched_once(lti: Lti) -> None:
    await lti.launch_ok()
    assert lti.platform.jwks_fetches == 1
    await lti.launch_ok()
    assert lti.platform.jwks_fetches == 1  # cached
    lti.platform.kid = "platform-key-2"
    lti.platform.published = {"platform-key-2": rsa_key("rotated")}
    await lti.launch_ok()
    assert lti.platform.jwks_fetches == 2


async def test_an_unreachable_key_set_is_a_503_until_keys_are_known_then_they_keep_working(lti: Lti) -> None:
    lti.server.client.app[LTI_KEYS].refetch_s = 0  # a failed first fetch is retried after refetch_s
    lti.platform.jwks_down = True
    state, nonce = await lti.login()
    response = await lti.launch(lti.platform.id_token(nonce), state)
    await _assert_refused(response, 503, "internal", "signing keys")
    assert await count(lti.db, "courses") == 0 and await count(lti.db, "lti_nonces") == 0

    lti.platform.jwks_down = False
    await lti.launch_ok()  # nothing bad was kept: the next launch fetches the keys
    fetches = lti.platform.jwks_fetches
    lti.server.client.app[LTI_KEYS].ttl_s = 0  # every launch now refreshes the set
    lti.platform.jwks_down = True
    await lti.launch_ok()  # the refresh fails; the known key still verifies
    assert lti.platform.jwks_fetches == fetches + 1


async def _assert_refused(response: ClientResponse, status: int, code: str, words: str) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code and words.lower() in error["message"].lower(), error


@pytest.mark.parametrize(
    ("overrides", "status", "code", "words"),
    [
        ({"iss": "https://unknown.example"}, 400, "bad_request", "no LTI platform"),
        ({"client_id": "someone-else"}, 400, "bad_request", "no LTI platform"),
        ({"login_hint": None}, 400, "bad_request", "'login_hint' is required"),
        ({"iss": None}, 400, "bad_request", "'iss' is required"),
        ({"target_link_uri": None}, 400, "bad_request", "'target_link_uri' is required"),
        ({"target_link_uri": "https://elsewhere.example/lti"}, 400, "bad_request", "target_link_uri"),
        ({"target_link_uri": "http://[127.0.0.1/lti"}, 400, "bad_request", "target_link_uri"),
        ({"lti_deployment_id": "deployment-2"}, 403, "forbidden", "deployment"),
    ],
    ids=["unknown-issuer", "unknown-client", "no-login-hint", "no-iss", "no-target", "foreign-target",
         "malformed-target", "wrong-deployment"],
)
async def test_login_refusals(lti: Lti, overrides: dict[str, str | None], status: int, code: str,
                              words: str) -> None:
    response = await lti.server.client.get("/lti/login", params=lti.login_params(**overrides),
                                           allow_redirects=False)
    await _assert_refused(response, status, code, words)
    assert await count(lti.db, "lti_login_states") == 0 and await count(lti.db, "lti_nonces") == 0


async def test_an_issuer_with_several_registrations_needs_the_client_id(lti: Lti) -> None:
    # One issuer for many schools (Canvas cloud): a second registration with another client id.
    await lti.db.execute(
        "INSERT INTO lti_platforms (tenant_id, issuer, client_id, auth_login_url, jwks_url)"
        " VALUES ($1, $2, 'tutor-client-2', $3, $4)",
        TENANT, lti.platform.issuer, f"{lti.platform.issuer}/auth", f"{lti.platform.issuer}/jwks",
    )
    response = await lti.server.client.get("/lti/login", params=lti.login_params(client_id=None),
                                           allow_redirects=False)
    await _assert_refused(response, 400, "bad_request", "'client_id' is required")
    state, _ = await lti.login()  # with its client id, each registration is found
    assert read_state(lti.secret, state).platform_id == lti.platform_id


Refusal = Callable[[Lti], Awaitable[ClientResponse]]


async def _bad_state(lti: Lti) -> ClientResponse:
    _, nonce = await lti.login()
    return await lti.launch(lti.platform.id_token(nonce), "no-such-state")


async def _expired_state(lti: Lti) -> ClientResponse:
    state, nonce = await lti.login()
    login = replace(read_state(lti.secret, state), expires_at=int(time.time()) - 1)
    return await lti.launch(lti.platform.id_token(nonce), sign_state(lti.secret, login))


async def _forged_state(lti: Lti) -> ClientResponse:
    # A state for this platform and a nonce of the attacker's choosing, signed with another secret.
    login = PendingLogin(TENANT, lti.platform_id, "attacker-nonce", int(time.time()) + 600)
    return await lti.launch(lti.platform.id_token(login.nonce), sign_state("another-secret-" + "x" * 40, login))


async def _state_signed_as_an_access_token(lti: Lti) -> ClientResponse:
    # Signed with the server's JWT secret itself (the key of its access tokens), not the state key.
    _, nonce = await lti.login()
    claims = {"aud": "smartedu:lti-state", "tid": TENANT, "pid": lti.platform_id, "nonce": nonce,
              "exp": int(time.time()) + 600}
    return await lti.launch(lti.platform.id_token(nonce), jwt.encode(claims, lti.secret, algorithm="HS256"))


async def _replayed_launch(lti: Lti) -> ClientResponse:
    state, nonce = await lti.login()
    id_token = lti.platform.id_token(nonce, **{LTI + "context": {"id": "c-100", "title": "First"}})
    assert (await lti.launch(id_token, state)).status == 200
    return await lti.launch(id_token, state)  # the same form post again (e.g. from the browser history)


async def _reused_nonce(lti: Lti) -> ClientResponse:
    state, nonce = await lti.login()
    first = lti.platform.id_token(nonce, **{LTI + "context": {"id": "c-100", "title": "First"}})
    assert (await lti.launch(first, state)).status == 200
    state, _ = await lti.login()
    return await lti.launch(lti.platform.id_token(nonce), state)


async def _nonce_of_another_login(lti: Lti) -> ClientResponse:
    _, other_nonce = await lti.login()
    state, _ = await lti.login()
    return await lti.launch(lti.platform.id_token(other_nonce), state)


def _with_claims(**claims: Any) -> Refusal:
    async def refusal(lti: Lti) -> ClientResponse:
        state, nonce = await lti.login()
        return await lti.launch(lti.platform.id_token(nonce, **claims), state)

    return refusal


async def _expired(lti: Lti) -> ClientResponse:
    now = int(time.time())
    return await _with_claims(iat=now - 900, exp=now - 600)(lti)


async def _issued_in_the_future(lti: Lti) -> ClientResponse:
    now = int(time.time())
    return await _with_claims(iat=now + 600, exp=now + 900)(lti)


async def _other_key(lti: Lti) -> ClientResponse:
    state, nonce = await lti.login()
    return await lti.launch(lti.platform.id_token(nonce, key=rsa_key("attacker")), state)


async def _unknown_kid(lti: Lti) -> ClientResponse:
    await lti.launch_ok(**{LTI + "context": {"id": "c-100", "title": "First"}})  # the key set is cached
    assert lti.platform.jwks_fetches == 1
    for attempt in range(2):
        state, nonce = await lti.login()
        response = await lti.launch(lti.platform.id_token(nonce, key=rsa_key("attacker"), kid="made-up"), state)
        # The first unknown kid refetches the set once; another one soon after does not.
        assert lti.platform.jwks_fetches == 2
        if attempt == 0:
            await _assert_refused(response, 401, "unauthorized", "kid")
    return response


async def _hs256(lti: Lti) -> ClientResponse:
    state, nonce = await lti.login()
    forged = jwt.encode(lti.platform.claims(nonce), "a-shared-secret-" * 4, algorithm="HS256",
                        headers={"kid": lti.platform.kid})
    return await lti.launch(forged, state)


async def _not_a_jwt(lti: Lti) -> ClientResponse:
    state, _ = await lti.login()
    return await lti.launch("not.a.jwt", state)


async def _missing_id_token(lti: Lti) -> ClientResponse:
    state, _ = await lti.login()
    return await lti.server.client.post("/lti/launch", data={"state": state})


@pytest.mark.parametrize(
    ("refusal", "status", "code", "words"),
    [
        (_bad_state, 401, "unauthorized", "unknown or expired state"),
        (_expired_state, 401, "unauthorized", "unknown or expired state"),
        (_forged_state, 401, "unauthorized", "unknown or expired state"),
        (_state_signed_as_an_access_token, 401, "unauthorized", "unknown or expired state"),
        (_replayed_launch, 401, "unauthorized", "already used"),
        (_reused_nonce, 401, "unauthorized", "nonce belongs to another login"),
        (_nonce_of_another_login, 401, "unauthorized", "nonce belongs to another login"),
        (_expired, 401, "unauthorized", "expired"),
        (_issued_in_the_future, 401, "unauthorized", "invalid id_token"),
        (_with_claims(aud="another-tool"), 401, "unauthorized", "audience"),
        (_with_claims(aud=[CLIENT_ID, "another-tool"]), 401, "unauthorized", "azp"),
        (_with_claims(aud=[CLIENT_ID, "another-tool"], azp="another-tool"), 401, "unauthorized", "azp"),
        (_with_claims(iss="https://impostor.example"), 401, "unauthorized", "issuer"),
        (_other_key, 401, "unauthorized", "Signature verification failed"),
        (_unknown_kid, 401, "unauthorized", "kid"),
        (_hs256, 401, "unauthorized", "RS256"),
        (_not_a_jwt, 401, "unauthorized", "not a JWT"),
        (_missing_id_token, 400, "bad_request", "'id_token' is required"),
        (_with_claims(nonce=None), 401, "unauthorized", "nonce"),
        (_with_claims(**{LTI + "deployment_id": "deployment-2"}), 403, "forbidden", "deployment"),
        (_with_claims(**{LTI + "deployment_id": None}), 400, "bad_request", "deployment_id"),
        (_with_claims(**{LTI + "message_type": "LtiDeepLinkingRequest"}), 400, "bad_request", "LtiResourceLink"),
        (_with_claims(**{LTI + "version": "1.1"}), 400, "bad_request", "1.3.0"),
        (_with_claims(**{LTI + "roles": [f"{MEMBERSHIP}#Mentor"]}), 403, "forbidden", "learners"),
        (_with_claims(**{LTI + "context": None}), 400, "bad_request", "context"),
        # JSON allows NUL and lone surrogates, PostgreSQL does not: refused, never a 500.
        (_with_claims(nonce="n\x00nce"), 401, "unauthorized", "nonce"),
        (_with_claims(nonce="\ud800"), 401, "unauthorized", "nonce"),
        (_with_claims(sub="user\x0042"), 401, "unauthorized", "sub"),
        (_with_claims(sub="user-\udc00"), 401, "unauthorized", "sub"),
        (_with_claims(**{LTI + "context": {"id": "c-\ud800"}}), 400, "bad_request", "context"),
    ],
    ids=["bad-state", "expired-state", "forged-state", "state-signed-as-an-access-token", "replayed-launch",
         "reused-nonce", "nonce-of-another-login", "expired",
         "issued-in-the-future", "wrong-audience", "audiences-without-azp", "wrong-azp", "wrong-issuer",
         "other-key", "unknown-kid", "hs256", "not-a-jwt", "no-id-token", "no-nonce", "wrong-deployment",
         "no-deployment", "wrong-message-type", "wrong-version", "no-usable-role", "no-context", "nul-in-nonce",
         "surrogate-in-nonce", "nul-in-sub", "surrogate-in-sub", "surrogate-in-context-id"],
)
async def test_launch_refusals(lti: Lti, refusal: Refusal, status: int, code: str, words: str) -> None:
    assert await count(lti.db, "courses") == 0
    response = await refusal(lti)
    await _assert_refused(response, status, code, words)
    # Some refusals start with a good launch (course c-100); the refused launch (c-101) writes nothing.
    courses = {row["id"] for row in await lti.db.fetch("SELECT id FROM courses")}
    assert courses <= {f"lti-{lti.platform_id}-c-100"}
    assert await count(lti.db, "lti_nonces") == len(courses)  # nor uses up its login's nonce
    assert await count(lti.db, "users") == 0
    assert [row["id"] for row in await lti.db.fetch("SELECT id FROM tenants")] == [TENANT]


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/lti/launch", "application/x-www-form-urlencoded", b"id_token=\xff\xfe&state=s"),
        ("/lti/login", "application/x-www-form-urlencoded", b"iss=\xff"),
        ("/lti/launch", "multipart/form-data; boundary=x", b"--x\r\n\r\nno name\r\n--x--\r\n"),
    ],
    ids=["launch-not-utf8", "login-not-utf8", "multipart-without-name"],
)
async def test_an_unreadable_form_is_a_bad_request(lti: Lti, path: str, content_type: str, body: bytes) -> None:
    response = await lti.server.client.post(path, data=body, headers={"Content-Type": content_type},
                                            allow_redirects=False)
    await _assert_refused(response, 400, "bad_request", "form could not be read")
    assert await count(lti.db, "lti_nonces") == 0


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


async def test_a_browser_is_told_in_a_page_what_went_wrong(lti: Lti) -> None:
    """The LMS's form post comes from a student's browser, often in an iframe: a refused launch or login is a
    short page saying what to do, with the reason and a reference, not a JSON body; with the same status,
    no script, and framable (the tenant is unknown when the launch is refused)."""
    forged = await lti.server.client.post(
        "/lti/launch",
        data={"id_token": "not-a-token", "state": "<script>alert(1)</script>"},
        headers={"Accept": BROWSER_ACCEPT, "X-Request-ID": "req-42"},
    )
    assert forged.status == 401 and forged.content_type == "text/html"
    page = await forged.text()
    assert "The tutor could not be opened" in page and "Open the tutor again from your course" in page
    assert "(unauthorized, reference req-42)" in page and "<script" not in page
    csp = forged.headers["Content-Security-Policy"]
    assert "script-src" not in csp and "default-src 'none'" in csp and "frame-ancestors" not in csp
    login = await lti.server.client.get(
        "/lti/login", params={
            "iss": "https://unknown.example",
            "login_hint": "x",
            "target_link_uri": str(lti.server.client.make_url("/lti/launch")),
        },
        headers={"Accept": BROWSER_ACCEPT}, allow_redirects=False,
    )
    assert login.status == 400 and "no LTI platform" in await login.text()
    # Other clients keep the JSON body.
    await _assert_refused(
        await lti.server.client.post("/lti/launch", data={"id_token": "not-a-token", "state": "s"}),
        401, "unauthorized", "",
    )
    assert await count(lti.db, "lti_nonces") == 0


async def test_without_a_secret_lti_is_unavailable(serve: Serve) -> None:
    public_pem = rsa_key("tutor").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    server = await serve(jwt_secret=None, jwt_public_key=public_pem, jwt_algorithm="RS256")
    for response in (
        await server.client.get("/lti/login", params={"iss": "x"}, allow_redirects=False),
        await server.client.post("/lti/launch", data={"id_token": "x", "state": str(uuid.uuid4())}),
    ):
        assert response.status == 503
        error = (await response.json())["error"]
        assert "SMARTEDU_JWT_SECRET" in error["message"], error


async def test_launches_waiting_on_a_hanging_key_set_share_one_fetch(lti: Lti, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class opens the tutor at once while the LMS's JWKS URL hangs: one fetch, and every launch gets its 503
    when that fetch times out. Before, each waiting launch made its own fetch after the previous one had
    timed out: the n-th student waited n timeouts and the LMS got one request per launch."""
    monkeypatch.setattr(server_lti, "JWKS_TIMEOUT_S", 0.5)
    lti.platform.jwks_delay = 30
    logins = [await lti.login() for _ in range(4)]
    started = time.monotonic()
    responses = await asyncio.gather(*(lti.launch(lti.platform.id_token(nonce), state) for state, nonce in logins))
    for response in responses:
        await _assert_refused(response, 503, "internal", "signing keys")
    assert time.monotonic() - started < 1.5
    assert lti.platform.jwks_fetches == 1
    # Launches right after the failure do not refetch either: a failing LMS is asked at most every refetch_s.
    state, nonce = await lti.login()
    await _assert_refused(await lti.launch(lti.platform.id_token(nonce), state), 503, "internal", "signing keys")
    assert lti.platform.jwks_fetches == 1
    assert await count(lti.db, "courses") == 0 and await count(lti.db, "lti_nonces") == 0


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(text="<html><body>Sign in</body></html>", content_type="text/html"),
        web.Response(body=b'{"keys": [' + b'{"kty": "oct"},' * 40000 + b"{}]}", content_type="application/json"),
        web.Response(text="[]", content_type="application/json"),
        web.Response(text='{"keys": "none"}', content_type="application/json"),
        web.Response(text="oops", status=500),
        web.Response(text="[" * 100_000 + "]" * 100_000, content_type="application/json"),
    ],
    ids=["html", "huge", "not-an-object", "no-keys-list", "http-500", "deeply-nested"],
)
async def test_a_key_set_that_is_not_one_is_a_503(lti: Lti, answer: web.Response) -> None:
    lti.platform.jwks_answer = answer
    state, nonce = await lti.login()
    await _assert_refused(await lti.launch(lti.platform.id_token(nonce), state), 503, "internal", "signing keys")
    assert lti.platform.jwks_fetches == 1 and await count(lti.db, "lti_nonces") == 0


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize(
    "location", ["/moved/jwks", "http://localhost:{port}/moved/jwks"], ids=["same-host", "other-host"]
)
async def test_a_key_set_url_that_redirects_is_refused(
    lti: Lti, status: int, location: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The keys that verify a platform's id_tokens come from the URL registered for it, not from wherever
    that URL redirects (another host, or http after https): the launch gets the 503 and the log says why."""
    assert lti.platform.server is not None
    moved = location.format(port=lti.platform.server.port)
    lti.platform.jwks_answer = web.Response(status=status, headers={"Location": moved})
    state, nonce = await lti.login()
    await _assert_refused(await lti.launch(lti.platform.id_token(nonce), state), 503, "internal", "signing keys")
    assert (lti.platform.jwks_fetches, lti.platform.moved_fetches) == (1, 0)
    assert await count(lti.db, "lti_nonces") == 0
    (record,) = [r for r in caplog.records if r.getMessage() == "could not fetch a platform's key set"]
    assert f"redirects (HTTP {status}) to {moved}" in record.__dict__["error"], record.__dict__


async def test_several_audiences_with_our_azp_are_accepted(lti: Lti) -> None:
    target, _ = await lti.launch_ok(aud=["another-tool", CLIENT_ID], azp=CLIENT_ID)
    assert lti.verify(fragment(target)["token"]).role == "student"


@pytest.mark.parametrize(
    ("roles", "status", "words"),
    [
        (None, 400, "roles"),
        (LEARNER, 400, "roles"),
        ([], 403, "learners"),
        ([7, {"r": LEARNER}], 403, "learners"),
        (["Learner"], 403, "learners"),
    ],
    ids=["missing", "a-string", "empty", "not-strings", "short-name"],
)
async def test_missing_or_odd_roles_are_refused(lti: Lti, roles: object, status: int, words: str) -> None:
    state, nonce = await lti.login()
    response = await lti.launch(lti.platform.id_token(nonce, **{LTI + "roles": roles}), state)
    await _assert_refused(response, status, "bad_request" if status == 400 else "forbidden", words)
    assert await count(lti.db, "users") == 0 and await count(lti.db, "lti_nonces") == 0


async def test_concurrent_launches_after_a_key_rotation_refetch_once(lti: Lti) -> None:
    await lti.launch_ok()
    lti.platform.kid = "platform-key-2"
    lti.platform.published = {"platform-key-2": rsa_key("rotated")}
    logins = [await lti.login() for _ in range(5)]
    responses = await asyncio.gather(*(lti.launch(lti.platform.id_token(nonce), state) for state, nonce in logins))
    assert [response.status for response in responses] == [200] * 5
    assert lti.platform.jwks_fetches == 2


async def test_an_id_token_for_one_registration_does_not_launch_another(lti: Lti) -> None:
    """Two schools on one LMS (one issuer and key set, a client id each): a user of the first who gets the LMS
    to sign an id_token with the nonce of a login for the second cannot launch into the second school."""
    await lti.db.execute("INSERT INTO tenants (id) VALUES ('school-other')")
    await lti.db.execute(
        "INSERT INTO lti_platforms (tenant_id, issuer, client_id, auth_login_url, jwks_url)"
        " VALUES ('school-other', $1, 'tutor-client-2', $2, $3)",
        lti.platform.issuer,
        f"{lti.platform.issuer}/auth",
        f"{lti.platform.issuer}/jwks",
    )
    for aud, azp in ((CLIENT_ID, None), ([CLIENT_ID, "tutor-client-2"], CLIENT_ID), (CLIENT_ID, "tutor-client-2")):
        state, nonce = await lti.login(client_id="tutor-client-2")
        response = await lti.launch(lti.platform.id_token(nonce, aud=aud, azp=azp), state)
        assert response.status == 401, (aud, azp, await response.text())
    # The state of one registration with an id_token of the other's login: the nonces differ.
    state_other, _ = await lti.login(client_id="tutor-client-2")
    _, nonce = await lti.login()
    response = await lti.launch(lti.platform.id_token(nonce, aud="tutor-client-2"), state_other)
    await _assert_refused(response, 401, "unauthorized", "nonce belongs to another login")
    assert await count(lti.db, "users") == 0 and await count(lti.db, "lti_nonces") == 0
    assert await count(lti.db, "courses") == 0


async def test_launches_with_a_known_key_do_not_wait_for_a_refresh_that_hangs(
    lti: Lti, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached set has expired and the LMS hangs: the launch that refreshes it waits for the timeout (and
    then uses the key it knows), but launches meanwhile use the known key at once. Before, each of them
    waited for the hanging refresh too."""
    await lti.launch_ok()
    monkeypatch.setattr(server_lti, "JWKS_TIMEOUT_S", 2.0)
    lti.server.client.app[LTI_KEYS].ttl_s = 0  # every launch finds the set expired
    lti.platform.jwks_delay = 30
    (state, nonce), (other_state, other_nonce) = await lti.login(), await lti.login()
    refreshing = asyncio.create_task(lti.launch(lti.platform.id_token(nonce), state))
    async with asyncio.timeout(5):
        while lti.platform.jwks_fetches < 2:  # the refresh has reached the LMS
            await asyncio.sleep(0.01)
    started = time.monotonic()
    response = await lti.launch(lti.platform.id_token(other_nonce), other_state)
    assert response.status == 200, await response.text()
    assert time.monotonic() - started < 1.0
    assert not refreshing.done()
    assert (await refreshing).status == 200
    assert lti.platform.jwks_fetches == 2
