"""JWT verification (and minting for development): only the configured algorithm is ever accepted."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import ConfigError, forbidden, unauthorized
from .settings import Settings

ROLES = ("student", "teacher", "admin")
MAX_TOKEN_CHARS = 8192
LEEWAY_S = 5  # clock skew between the token's issuer and this server


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    tenant: str
    role: str
    exp: int
    name: str = ""
    courses: tuple[str, ...] | None = None
    session_id: str | None = None  # the cookie session these claims came from (None for a token)
    # When the token (`iat`) or cookie session was issued, seconds since the epoch; None when it does not say.
    issued_at: float | None = None

    def may_use_course(self, course_id: str) -> bool:
        return self.courses is None or course_id in self.courses

    def require_course(self, course_id: str) -> None:
        """`forbidden` unless the token may use the course."""
        if not self.may_use_course(course_id):
            raise forbidden("this course is not in your token's courses")

    def require_no_course(self) -> None:
        """`forbidden` for a student whose token names its courses: they chat only in those."""
        if self.role == "student" and self.courses is not None:
            raise forbidden("conversations without a course are outside your token's courses")


class TokenVerifier:
    """Checks signature, algorithm, expiry, issuer, audience and the product's own claims."""

    def __init__(self, settings: Settings):
        settings.require_auth()
        self.algorithm = settings.jwt_algorithm
        # Parsed once: a key PyJWT cannot use (a malformed PEM, an EC key for RS256) fails at start, not
        # as an internal error on every token; it also spares parsing the PEM at each verification.
        try:
            self.key = jwt.get_algorithm_by_name(self.algorithm).prepare_key(
                settings.jwt_secret or settings.jwt_public_key or ""
            )
        except (jwt.InvalidKeyError, NotImplementedError, ValueError):
            variable = "SMARTEDU_JWT_SECRET" if settings.jwt_secret else "SMARTEDU_JWT_PUBLIC_KEY"
            raise ConfigError(
                f"{variable} is not a usable {self.algorithm} key (a malformed PEM, or a key of another type:"
                " RS* need an RSA key, ES* an EC key)"
            ) from None
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.max_lifetime_s = settings.max_token_lifetime_s

    def verify(self, token: object) -> Claims:
        """Return the claims of a valid token, or raise `unauthorized`."""
        if not isinstance(token, str) or not token:
            raise unauthorized("a token is required")
        if len(token) > MAX_TOKEN_CHARS:
            raise unauthorized(f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            payload = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "sub"]},
                leeway=LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "exp":
                raise unauthorized(
                    f"invalid token: it has no expiry (exp); tokens must expire within "
                    f"SMARTEDU_MAX_TOKEN_LIFETIME_S ({self.max_lifetime_s} s)"
                ) from None
            raise unauthorized(f"invalid token: {exc}") from None
        except jwt.InvalidAudienceError as exc:
            if self.audience is None:
                # PyJWT refuses any `aud` when none is expected; say which setting the school is missing.
                raise unauthorized(
                    "invalid token: it names an audience (aud) but SMARTEDU_JWT_AUDIENCE is not set"
                ) from None
            raise unauthorized(f"invalid token: {exc}") from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        self._check_lifetime(payload)
        return claims_from_payload(payload)

    def _check_lifetime(self, payload: dict[str, Any]) -> None:
        """Refuse a token that lives longer than SMARTEDU_MAX_TOKEN_LIFETIME_S (PyJWT checked exp and iat are
        numbers)."""
        issued = payload.get("iat")
        since, start = ("iat", float(issued)) if issued is not None else ("now", time.time())
        lifetime = float(payload["exp"]) - start
        if lifetime > self.max_lifetime_s + LEEWAY_S:
            raise unauthorized(
                f"invalid token: its lifetime (exp - {since}, {lifetime:.0f} s) exceeds "
                f"SMARTEDU_MAX_TOKEN_LIFETIME_S ({self.max_lifetime_s} s)"
            )


def claims_from_payload(payload: dict[str, Any]) -> Claims:
    """Validate the product's claims (`sub`, `tid`, `role`, optional `name`, `courses`)."""
    sub, tenant, role = payload.get("sub"), payload.get("tid"), payload.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > 200 or not _storable(sub):
        raise unauthorized("claim 'sub' must be a non-empty string (no NUL or lone surrogates)")
    if not isinstance(tenant, str) or not tenant or len(tenant) > 100 or not _storable(tenant):
        raise unauthorized("claim 'tid' must be a non-empty string (no NUL or lone surrogates)")
    if role not in ROLES:
        raise unauthorized("claim 'role' must be student, teacher or admin")
    name = payload.get("name", "")
    if not isinstance(name, str) or not _storable(name):
        raise unauthorized("claim 'name' must be a string (no NUL or lone surrogates)")
    courses = payload.get("courses")
    if courses is not None and (
        not isinstance(courses, list) or not all(isinstance(c, str) and _storable(c) for c in courses)
    ):
        raise unauthorized("claim 'courses' must be a list of strings (no NUL or lone surrogates)")
    issued = payload.get("iat")  # PyJWT checked it is a number
    return Claims(
        sub=sub,
        tenant=tenant,
        role=str(role),
        exp=int(payload["exp"]),
        name=name[:200],
        courses=tuple(courses) if courses is not None else None,
        issued_at=float(issued) if issued is not None else None,
    )


def _storable(text: str) -> bool:
    """Text PostgreSQL can store (no NUL, valid UTF-8)."""
    # JSON escapes can put either in a claim; the user's upsert then failed as `internal`, which clients
    # retry, instead of the token being refused.
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def mint_token(
    secret_or_private_key: str,
    *,
    user: str,
    tenant: str,
    role: str,
    algorithm: str = "HS256",
    name: str | None = None,
    courses: list[str] | None = None,
    ttl_s: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Sign a token with the product's claims (development, demos and load tests)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "tid": tenant, "role": role, "iat": now, "exp": now + ttl_s}
    if name:
        payload["name"] = name
    if courses is not None:
        payload["courses"] = courses
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    return jwt.encode(payload, secret_or_private_key, algorithm=algorithm)
