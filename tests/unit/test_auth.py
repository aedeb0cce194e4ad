"""Token verification accepts only the configured algorithm and the product's claims."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import Claims, TokenVerifier, mint_token
from server.errors import ChatError, ConfigError, ErrorCode
from server.origins import origin_allowed
from server.settings import Settings

SECRET = "k" * 64


def test_round_trip_hs256() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    claims = verifier.verify(mint_token(SECRET, user="u1", tenant="t1", role="teacher", courses=["c1"], name="Ms T"))
    assert claims == Claims("u1", "t1", "teacher", claims.exp, "Ms T", ("c1",), issued_at=claims.exp - 3600)
    assert claims.may_use_course("c1") and not claims.may_use_course("c2")


def test_rs256_public_key_and_issuer_audience() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    settings = Settings(jwt_public_key=public, jwt_algorithm="RS256", jwt_issuer="idp", jwt_audience="smartedu")
    verifier = TokenVerifier(settings)
    good = mint_token(private, user="u", tenant="t", role="student", algorithm="RS256", issuer="idp",
                      audience="smartedu")
    assert verifier.verify(good).sub == "u"
    for bad in (
        mint_token(private, user="u", tenant="t", role="student", algorithm="RS256", issuer="other",
                   audience="smartedu"),
        mint_token(private, user="u", tenant="t", role="student", algorithm="RS256", issuer="idp"),
        # The classic confusion attack: an HS256 token signed with the public key as the secret.
        jwt.encode({"sub": "u", "tid": "t", "role": "student", "exp": int(time.time()) + 60, "iss": "idp",
                    "aud": "smartedu"}, "x" * 64, algorithm="HS256"),
    ):
        with pytest.raises(ChatError) as info:
            verifier.verify(bad)
        assert info.value.code is ErrorCode.UNAUTHORIZED


def test_mint_refuses_unknown_roles() -> None:
    with pytest.raises(ValueError, match="role"):
        mint_token(SECRET, user="u", tenant="t", role="root")


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "chat.example", (), True),
        ("https://chat.example", "chat.example", (), True),
        ("https://evil.example", "chat.example", (), False),
        ("https://lms.example", "chat.example", ("https://lms.example",), True),
        ("https://lms.example/", "chat.example", ("https://lms.example",), True),
        ("null", "chat.example", (), False),
        # `*` lets any origin open a socket with a token (handlers/ws.py), never with the cookie session.
        ("https://anything.example", "chat.example", ("*",), False),
    ],
)
def test_origin_rules(origin: str | None, host: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert origin_allowed(origin, host, allowed) is expected


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(
    ("public_key", "algorithm"),
    [
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "RS256"),
        (_public_pem(ec.generate_private_key(ec.SECP256R1())), "RS256"),
        (_public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "ES256"),
    ],
    ids=["malformed-pem", "ec-key-for-rs256", "rsa-key-for-es256"],
)
def test_unusable_public_key_is_a_configuration_error(public_key: str, algorithm: str) -> None:
    # Before, the verifier accepted the key and every token then raised InvalidKeyError (500 internal).
    with pytest.raises(ConfigError, match=f"SMARTEDU_JWT_PUBLIC_KEY is not a usable {algorithm} key"):
        TokenVerifier(Settings(jwt_public_key=public_key, jwt_algorithm=algorithm))


def test_es256_tokens_verify() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    verifier = TokenVerifier(Settings(jwt_public_key=_public_pem(key), jwt_algorithm="ES256"))
    assert verifier.verify(mint_token(private, user="u", tenant="t", role="student", algorithm="ES256")).sub == "u"


def test_audience_in_token_without_configured_audience_names_the_setting() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    with pytest.raises(ChatError, match="SMARTEDU_JWT_AUDIENCE is not set") as info:
        verifier.verify(mint_token(SECRET, user="u", tenant="t", role="student", audience="smartedu"))
    assert info.value.code is ErrorCode.UNAUTHORIZED
    configured = TokenVerifier(Settings(jwt_secret=SECRET, jwt_audience="smartedu"))
    with pytest.raises(ChatError, match="Audience doesn't match"):
        configured.verify(mint_token(SECRET, user="u", tenant="t", role="student", audience="other"))
