"""Forged and odd tokens: only the configured algorithm and key verify, headers never pick a key, time claims
are checked with a few seconds of leeway, and the product's claims must have the right types."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import TEST_SECRET, Serve, Server

pytestmark = pytest.mark.integration

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "stu-1", "tid": "school-a", "role": "student", "iat": now, "exp": now + 600, **overrides}
    return {name: value for name, value in claims.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_signed(header: dict[str, Any], payload_json: str, secret: bytes) -> str:
    """An HS256 JWT built by hand, so that the header and payload text are exactly what the test says."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload_json.encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _unsigned(claims: dict[str, Any]) -> str:
    """`alg: none`, no signature."""
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."


async def _status_everywhere(server: Server, token: str) -> tuple[int, str]:
    """The token over HTTP (Bearer), as a cookie session login and on the socket: the same outcome each time."""
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {token}"})
    body = await response.json()
    login = await server.client.post("/api/session", json={"token": token})
    assert login.status == response.status, await login.text()
    server.client.session.cookie_jar.clear()
    sock = await server.connect({"token": token}, welcome=False)
    frame = await sock.recv()
    if response.status == 200:
        assert frame["type"] == "welcome", frame
        await sock.close()
        return 200, ""
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame
    assert await sock.close_code() == 4401
    return response.status, str(body["error"]["message"])


async def _refused(server: Server, token: str, words: str) -> None:
    status, message = await _status_everywhere(server, token)
    assert status == 401 and words.lower() in message.lower(), message


async def test_an_rs256_server_refuses_hs256_signed_with_its_public_key_none_and_other_algorithms(
    serve: Serve,
) -> None:
    server = await serve(jwt_secret=None, jwt_public_key=RSA_PUBLIC_PEM, jwt_algorithm="RS256")
    assert (await _status_everywhere(server, jwt.encode(_claims(), RSA_KEY, algorithm="RS256")))[0] == 200
    # The classic confusion: the public key (which anyone may have) used as an HMAC secret.
    confused = _hand_signed({"alg": "HS256", "typ": "JWT"}, json.dumps(_claims()), RSA_PUBLIC_PEM.encode())
    await _refused(server, confused, "alg value is not allowed")
    await _refused(server, _unsigned(_claims()), "alg value is not allowed")
    await _refused(server, jwt.encode(_claims(), RSA_KEY, algorithm="RS512"), "alg value is not allowed")
    await _refused(server, jwt.encode(_claims(), RSA_KEY, algorithm="PS256"), "alg value is not allowed")
    await _refused(
        server,
        jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        "alg value is not allowed",
    )


async def test_an_hs256_server_refuses_none_and_other_hmac_algorithms(serve: Serve) -> None:
    server = await serve()
    await _refused(server, _unsigned(_claims()), "alg value is not allowed")
    await _refused(server, jwt.encode(_claims(), TEST_SECRET, algorithm="HS512"), "alg value is not allowed")
    await _refused(server, jwt.encode(_claims(), RSA_KEY, algorithm="RS256"), "alg value is not allowed")


async def test_key_headers_never_choose_the_key(serve: Serve) -> None:
    """kid, jku, x5u, jwk and x5c are ignored: the configured key verifies, whatever they point at."""
    server = await serve()
    elsewhere = {
        "kid": "../../../dev/null",
        "jku": "http://127.0.0.1:9/jwks",
        "x5u": "http://127.0.0.1:9/cert",
        "jwk": {"kty": "oct", "k": _b64(b"attacker")},
        "x5c": ["MIIB"],
    }
    assert (await _status_everywhere(server, jwt.encode(_claims(), TEST_SECRET, headers=elsewhere)))[0] == 200
    forged = _hand_signed({"alg": "HS256", **elsewhere}, json.dumps(_claims()), b"attacker")
    await _refused(server, forged, "signature")


async def test_time_claims_have_five_seconds_of_leeway(serve: Serve) -> None:
    server = await serve()
    now = int(time.time())
    for within in (_claims(exp=now - 2), _claims(iat=now + 3), _claims(nbf=now + 3)):
        token = jwt.encode(within, TEST_SECRET)
        assert (await _status_everywhere(server, token))[0] == 200, within
    await _refused(server, jwt.encode(_claims(exp=now - 30), TEST_SECRET), "expired")
    await _refused(server, jwt.encode(_claims(iat=now + 60), TEST_SECRET), "not yet valid")
    await _refused(server, jwt.encode(_claims(nbf=now + 60), TEST_SECRET), "not yet valid")
    # A future nbf does not stretch the lifetime cap: it still counts from iat.
    await _refused(server, jwt.encode(_claims(nbf=now + 3, exp=now + 2 * 86400), TEST_SECRET), "lifetime")
    for odd in ('"soon"', "1e400", "Infinity", "NaN", "null"):
        text = json.dumps(_claims(exp=None))[:-1] + f', "exp": {odd}}}'
        await _refused(server, _hand_signed({"alg": "HS256"}, text, TEST_SECRET.encode()), "exp")


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"role": ["admin"]}, "role"),
        ({"role": {"admin": True}}, "role"),
        ({"role": "Admin"}, "role"),
        ({"role": None}, "role"),
        ({"tid": ["school-a"]}, "tid"),
        ({"tid": 7}, "tid"),
        ({"sub": 42}, "sub"),
        ({"sub": "x" * 201}, "sub"),
        ({"name": ["Ada"]}, "name"),
        ({"courses": "algebra"}, "courses"),
        ({"courses": {"algebra": 1}}, "courses"),
        ({"courses": [["algebra"]]}, "courses"),
        ({"aud": "someone-else"}, "SMARTEDU_JWT_AUDIENCE"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else str(value),
)
async def test_claims_of_the_wrong_type_are_refused(serve: Serve, claims: dict[str, Any], words: str) -> None:
    server = await serve()
    await _refused(server, jwt.encode(_claims(**claims), TEST_SECRET), words)


async def test_a_duplicated_claim_means_its_last_value_everywhere(serve: Serve) -> None:
    """JSON with a claim twice: the last one counts, for HTTP, the cookie session and the socket alike."""
    server = await serve()
    text = json.dumps(_claims())[:-1] + ', "role": "admin", "role": "student"}'
    token = _hand_signed({"alg": "HS256"}, text, TEST_SECRET.encode())
    response = await server.client.post("/api/session", json={"token": token})
    assert response.status == 200 and (await response.json())["user"]["role"] == "student"
    sock = await server.connect({"token": token})
    assert sock.frames[0]["user"]["role"] == "student"
    await sock.close()


async def test_a_token_with_as_many_courses_as_fit_is_served(serve: Serve) -> None:
    """As many courses as fit in 8192 characters (about 800): accepted; the course check is a tuple lookup."""
    server = await serve()
    courses = [f"c{i}" for i in range(800)]
    token = jwt.encode(_claims(courses=courses), TEST_SECRET)
    assert 7000 < len(token) <= 8192
    response = await server.client.get("/api/conversations", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, await response.text()
    sock = await server.connect({"token": token, "course_id": "c799"}, welcome=False)
    error = await sock.expect("error")
    assert error["code"] == "not_found", error  # the course is allowed by the token, but does not exist
    # Hello without a course: a student must say which of its courses.
    sock = await server.connect({"token": token}, welcome=False)
    assert (await sock.expect("error"))["code"] == "forbidden"


async def test_issuer_and_audience_when_configured_must_be_present_and_match(serve: Serve) -> None:
    server = await serve(jwt_issuer="https://idp.school.example", jwt_audience="smartedu-tutor")
    good = {"iss": "https://idp.school.example", "aud": "smartedu-tutor"}
    assert (await _status_everywhere(server, jwt.encode(_claims(**good), TEST_SECRET)))[0] == 200
    several = {**good, "aud": ["another-app", "smartedu-tutor"]}
    assert (await _status_everywhere(server, jwt.encode(_claims(**several), TEST_SECRET)))[0] == 200
    await _refused(server, jwt.encode(_claims(aud="smartedu-tutor"), TEST_SECRET), "iss")
    await _refused(server, jwt.encode(_claims(**{**good, "iss": "https://idp.evil.example"}), TEST_SECRET), "issuer")
    await _refused(server, jwt.encode(_claims(iss="https://idp.school.example"), TEST_SECRET), "aud")
    await _refused(server, jwt.encode(_claims(**{**good, "aud": "another-app"}), TEST_SECRET), "audience")
    await _refused(server, jwt.encode(_claims(**{**good, "aud": ["another-app"]}), TEST_SECRET), "audience")
