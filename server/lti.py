"""LTI 1.3 resource-link launches: OIDC login initiation, id_token verification, mapping to our users.

Transport-agnostic: handlers pass the request's parameters as plain mappings and get back the URL to
redirect to (login) or a `Launch` describing where the browser goes next (launch). Every refusal is a
`ChatError` from the catalogue. Login writes nothing (its state is signed, not stored), and a refused
launch writes nothing: only a verified launch records its nonce as used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import jwt

from storage.lti import LtiStore, Platform
from storage.postgres import Database

from .auth import mint_token
from .errors import ChatError, ErrorCode, bad_request, forbidden, unauthorized
from .origins import framing_origins, is_plain_origin
from .settings import Settings

log = logging.getLogger(__name__)

LOGIN_TTL_S = 600  # from /lti/login to /lti/launch: the user's browser goes to the LMS and back
TOKEN_TTL_S = 3600  # our JWT; when it has expired, the student opens the tutor again from the LMS
LEEWAY_S = 60  # clock skew allowed between the LMS and us
JWKS_MAX_BYTES = 256 * 1024
JWKS_TIMEOUT_S = 5.0

LTI_CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
MESSAGE_TYPE_CLAIM = LTI_CLAIM + "message_type"
VERSION_CLAIM = LTI_CLAIM + "version"
DEPLOYMENT_CLAIM = LTI_CLAIM + "deployment_id"
ROLES_CLAIM = LTI_CLAIM + "roles"
CONTEXT_CLAIM = LTI_CLAIM + "context"

MEMBERSHIP = "http://purl.imsglobal.org/vocab/lis/v2/membership"
# Context (course) roles only: an institution-wide LMS administrator is not thereby a tutor admin. A
# launch never makes an admin: our admin sees every course of the tenant, while an LTI context role only
# speaks for the one course launched from, so the course's Administrator is a teacher of that course.
ROLE_MAP: dict[str, str] = {
    f"{MEMBERSHIP}#Administrator": "teacher",
    f"{MEMBERSHIP}#Instructor": "teacher",
    f"{MEMBERSHIP}/Instructor#TeachingAssistant": "teacher",
    f"{MEMBERSHIP}#Learner": "student",
}
_RANK = {"student": 0, "teacher": 1}
_SAFE_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,150}")
_ISSUED_NONCE = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what secrets.token_urlsafe makes
STATE_AUDIENCE = "smartedu:lti-state"  # a state can never pass for one of our access tokens, nor they for it
MAX_STATE_CHARS = 1024


class LtiUnavailableError(ChatError):
    """LTI cannot work right now (no HS256 secret to mint with, the platform's keys unreachable): 503."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INTERNAL, message)

    @property
    def http_status(self) -> int:
        return 503


class JwksFetchError(Exception):
    """A platform's key set could not be fetched or read."""


# -- platform keys ---------------------------------------------------------------------------------

JwksFetch = Callable[[str], Awaitable[Mapping[str, Any]]]


async def fetch_jwks(url: str) -> Mapping[str, Any]:
    """GET a JWKS document (bounded in time and size) from `url` itself: a redirect is refused."""
    try:
        timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as response,
        ):
            # The keys that verify a platform's launches come from the URL registered for it: following a
            # redirect would take them from another host, or over http from an https URL.
            if 300 <= response.status < 400:
                location = response.headers.get("Location", "")[:200]
                raise JwksFetchError(
                    f"the key set URL redirects (HTTP {response.status}) to {location}; redirects are not"
                    " followed: register the URL that serves the key set"
                )
            if response.status != 200:
                raise JwksFetchError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise JwksFetchError("key set too large")
        document = json.loads(body)
    # RecursionError: a body of nested arrays, which 256 KB allow far deeper than the JSON decoder goes.
    except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
        raise JwksFetchError(str(exc) or type(exc).__name__) from None
    if not isinstance(document, dict):
        raise JwksFetchError("key set is not a JSON object")
    return document


def parse_jwks(document: Mapping[str, Any]) -> dict[str, Any]:
    """The RS256 signing keys of a JWKS document, by kid (other keys are ignored)."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JwksFetchError("key set has no 'keys' list")
    keys: dict[str, Any] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        try:
            keys[kid] = jwt.PyJWK(entry, algorithm="RS256").key
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            log.warning("unusable key in a platform's key set", extra={"kid": kid})
    return keys


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: dict[str, Any]
    fetched_at: float
    forced_at: float = -math.inf
    failed: bool = False  # no key set was ever fetched: launches get a 503 until `fetched_at` expires


class JwksCache:
    """Platforms' signing keys per JWKS URL, cached for `ttl_s`.

    An unknown kid refetches the set once (the platform may have rotated its key), at most once per
    `refetch_s` per URL, so tokens with made-up kids cannot make us hammer the platform. If a refresh
    fails, keys already known keep working and the refresh is retried after `refetch_s`. If a first fetch
    fails, that is remembered for `refetch_s` too: launches waiting for it, and those in the next
    `refetch_s`, get the 503 at once instead of each fetching (and waiting for a timeout) again. While a
    refresh is under way, launches whose kid is already known do not wait for it.
    """

    def __init__(self, *, ttl_s: float = 300.0, refetch_s: float = 10.0, fetch: JwksFetch | None = None):
        self.ttl_s = ttl_s
        self.refetch_s = refetch_s
        self._fetch = fetch or fetch_jwks
        self._sets: dict[str, _KeySet] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def key(self, url: str, kid: str) -> Any:
        """The public key for `kid` from the key set at `url`, or `unauthorized`."""
        # One lock per URL: concurrent launches share one fetch instead of each making their own.
        lock = self._locks.setdefault(url, asyncio.Lock())
        known = self._sets.get(url)
        if lock.locked() and known is not None and kid in known.keys:
            # A refresh is under way (the set expired, or another launch named an unknown kid): a key we
            # know serves now, not after a fetch that may hang until the timeout.
            return known.keys[kid]
        async with lock:
            now = time.monotonic()
            current = self._sets.get(url)
            just_fetched = False
            if current is None or now - current.fetched_at >= self.ttl_s:
                current = await self._refresh(url, current, now)
                just_fetched = True
            if current.failed:
                raise LtiUnavailableError("could not fetch the platform's signing keys; try again later")
            found = current.keys.get(kid)
            if found is None and not just_fetched and now - current.forced_at >= self.refetch_s:
                current = await self._refresh(url, current, now, forced=True)
                found = current.keys.get(kid)
        if found is None:
            raise unauthorized("the id_token's key id (kid) is not in the platform's key set")
        return found

    async def _refresh(self, url: str, previous: _KeySet | None, now: float, *, forced: bool = False) -> _KeySet:
        try:
            keys = parse_jwks(await self._fetch(url))
        except JwksFetchError as exc:
            log.warning("could not fetch a platform's key set", extra={"url": url, "error": str(exc)})
            # Keep the keys we have (if any); try again after refetch_s rather than on every launch.
            expires_at = now - self.ttl_s + self.refetch_s  # what `fetched_at` says for the set to expire then
            if previous is None or previous.failed:
                current = _KeySet({}, expires_at, now, failed=True)
            else:
                current = replace(previous, fetched_at=expires_at, forced_at=now)
        else:
            current = _KeySet(keys, now, now if forced else -math.inf)
        self._sets[url] = current
        return current


# -- login and launch ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    """A verified launch: where the browser goes next and who may frame the page that sends it there."""

    target: str  # a path on this server; the token is in its fragment
    new_window: bool  # the teacher dashboard refuses framing: in an LMS iframe it opens in a new tab
    frame_ancestors: tuple[str, ...]
    tenant_id: str
    course_id: str
    user_id: str
    role: str


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """What a login's signed state says: the platform it was for, the nonce it issued, when it expires."""

    tenant_id: str
    platform_id: int
    nonce: str
    expires_at: int


def _state_key(secret: str) -> bytes:
    """The key states are signed with: derived from the JWT secret, so it is never the key our tokens use."""
    return hmac.new(secret.encode(), b"smartedu lti login state", hashlib.sha256).digest()


def sign_state(secret: str, login: PendingLogin) -> str:
    """The `state` sent to the platform: the login itself, signed (HS256), so /lti/login stores nothing."""
    payload = {
        "aud": STATE_AUDIENCE, "tid": login.tenant_id, "pid": login.platform_id, "nonce": login.nonce,
        "exp": login.expires_at,
    }
    return jwt.encode(payload, _state_key(secret), algorithm="HS256")


def read_state(secret: str, state: str) -> PendingLogin:
    """The login a state was signed for; `unauthorized` if it is forged, altered or expired."""
    try:
        payload = jwt.decode(
            state, _state_key(secret), algorithms=["HS256"], audience=STATE_AUDIENCE,
            options={"require": ["exp", "aud", "tid", "pid", "nonce"]},
        )
    except jwt.InvalidTokenError:
        raise unauthorized("unknown or expired state: open the tutor again from the LMS") from None
    tenant_id, platform_id, nonce = payload["tid"], payload["pid"], payload["nonce"]
    if not (isinstance(tenant_id, str) and isinstance(platform_id, int) and isinstance(nonce, str)):
        raise unauthorized("unknown or expired state: open the tutor again from the LMS")
    return PendingLogin(tenant_id, platform_id, nonce, int(payload["exp"]))


class LtiService:
    """LTI 1.3 for one request: the platform registrations and logins in PostgreSQL, keys in `keys`."""

    def __init__(self, settings: Settings, database: Database, keys: JwksCache):
        self.settings = settings
        self.database = database
        self.store = LtiStore(database.pool)
        self.keys = keys

    def _signing_secret(self) -> str:
        if not self.settings.jwt_secret:
            raise LtiUnavailableError(
                "LTI launches need SMARTEDU_JWT_SECRET: this server only has a public key, so it cannot mint tokens"
            )
        return self.settings.jwt_secret

    async def login(self, params: Mapping[str, str], base_url: str) -> str:
        """Check a third-party initiated login and return the platform's authorization URL to redirect to.
        Nothing is stored: the state carries the login, signed, so a flood of logins writes nothing."""
        secret = self._signing_secret()
        issuer = _param(params, "iss", 500)
        login_hint = _param(params, "login_hint", 4096)
        target_link_uri = _param(params, "target_link_uri", 2048)
        client_id = _optional_param(params, "client_id", 500)
        message_hint = _optional_param(params, "lti_message_hint", 8192)
        deployment_id = _optional_param(params, "lti_deployment_id", 500)
        if not _same_host(target_link_uri, base_url):
            raise bad_request("target_link_uri must be a URL of this tutor")
        platforms = await self.store.find_platforms(issuer, client_id)
        if not platforms:
            raise bad_request("no LTI platform is registered for this iss and client_id")
        if len(platforms) > 1:
            raise bad_request("'client_id' is required: several LTI platforms are registered for this iss")
        platform = platforms[0]
        if deployment_id is not None and platform.deployment_id not in (None, deployment_id):
            raise forbidden("this LTI deployment is not registered")
        nonce = secrets.token_urlsafe(32)
        login = PendingLogin(platform.tenant_id, platform.id, nonce, int(time.time()) + LOGIN_TTL_S)
        state = sign_state(secret, login)
        query = {
            "scope": "openid",
            "response_type": "id_token",
            "response_mode": "form_post",
            "prompt": "none",
            "client_id": platform.client_id,
            "redirect_uri": f"{base_url}/lti/launch",
            "login_hint": login_hint,
            "state": state,
            "nonce": nonce,
        }
        if message_hint is not None:
            query["lti_message_hint"] = message_hint
        log.info("lti login", extra={"tenant": platform.tenant_id, "platform": platform.id})
        return _with_query(platform.auth_login_url, query)

    async def launch(self, form: Mapping[str, str]) -> Launch:
        """Verify the platform's form post (id_token, state), create the course if needed and mint our token."""
        secret = self._signing_secret()
        id_token = _param(form, "id_token", 64 * 1024)
        pending = read_state(secret, _param(form, "state", MAX_STATE_CHARS))
        try:
            return await self._launch(secret, pending, id_token)
        except ChatError as exc:
            log.info(
                "lti launch refused",
                extra={"tenant": pending.tenant_id, "platform": pending.platform_id, "reason": exc.message},
            )
            raise

    async def _launch(self, secret: str, pending: PendingLogin, id_token: str) -> Launch:
        platform = await self.store.get_platform(pending.tenant_id, pending.platform_id)
        if platform is None:
            raise unauthorized("the LTI platform of this login is no longer registered")
        claims = await self._verify(platform, id_token)
        deployment_id = claims.get(DEPLOYMENT_CLAIM)
        if not isinstance(deployment_id, str) or not deployment_id:
            raise bad_request("the id_token has no deployment_id claim")
        if platform.deployment_id is not None and deployment_id != platform.deployment_id:
            raise forbidden("this LTI deployment is not registered")
        if claims.get(MESSAGE_TYPE_CLAIM) != "LtiResourceLinkRequest":
            raise bad_request("only LtiResourceLinkRequest launches are supported")
        if claims.get(VERSION_CLAIM) != "1.3.0":
            raise bad_request("only LTI version 1.3.0 is supported")
        # Checked before the nonce is used up: a launch refused for its claims writes nothing.
        role = map_role(claims.get(ROLES_CLAIM))
        context_id, title = _context(claims.get(CONTEXT_CLAIM))
        nonce = claims["nonce"]
        # A nonce we cannot have issued is refused without a query (PostgreSQL would reject a NUL in it).
        if not isinstance(nonce, str) or _ISSUED_NONCE.fullmatch(nonce) is None:
            raise unauthorized("the id_token's nonce is not one this tutor issued")
        if not secrets.compare_digest(nonce, pending.nonce):
            raise unauthorized("the id_token's nonce belongs to another login")
        # The first verified launch of a login uses its nonce up, on every replica: a replayed id_token (or
        # its state again) is refused. Only now is anything written.
        if not await self.store.use_nonce(platform.tenant_id, platform.id, nonce, pending.expires_at):
            raise unauthorized("this login was already used (a replayed id_token): open the tutor again from the LMS")

        user_id = lti_user_id(platform, claims["sub"])
        course_id = lti_course_id(platform, context_id)
        await self.store.ensure_course(platform.tenant_id, course_id, title)
        token = mint_token(
            secret,
            user=user_id,
            tenant=platform.tenant_id,
            role=role,
            name=_display_name(claims) or None,
            courses=[course_id],
            ttl_s=min(TOKEN_TTL_S, self.settings.max_token_lifetime_s),
            issuer=self.settings.jwt_issuer,
            audience=self.settings.jwt_audience,
        )
        if role == "student":
            query = urlencode({"course": course_id, "tenant": platform.tenant_id})
            target = f"/embed?{query}#{urlencode({'token': token, 'course': course_id})}"
        else:
            target = f"/teacher#{urlencode({'token': token})}"
        log.info(
            "lti launch",
            extra={"tenant": platform.tenant_id, "platform": platform.id, "course": course_id, "role": role},
        )
        return Launch(
            target=target,
            new_window=role != "student",
            frame_ancestors=await self._frame_ancestors(platform),
            tenant_id=platform.tenant_id,
            course_id=course_id,
            user_id=user_id,
            role=role,
        )

    async def _verify(self, platform: Platform, id_token: str) -> dict[str, Any]:
        """Signature (RS256, the platform's JWKS), iss, aud/azp, exp/iat and the claims we rely on."""
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.InvalidTokenError:
            raise unauthorized("the id_token is not a JWT") from None
        if header.get("alg") != "RS256":
            raise unauthorized("the id_token must be signed with RS256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise unauthorized("the id_token has no key id (kid)")
        key = await self.keys.key(platform.jwks_url, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=["RS256"],
                audience=platform.client_id,
                issuer=platform.issuer,
                leeway=LEEWAY_S,
                options={"require": ["iss", "aud", "sub", "exp", "iat", "nonce"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("the id_token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized(f"invalid id_token: {exc}") from None
        audience, azp = claims["aud"], claims.get("azp")
        # OIDC: with several audiences azp must name us; an azp that is present must always name us.
        several = isinstance(audience, list) and len(audience) > 1
        if (several or azp is not None) and azp != platform.client_id:
            raise unauthorized("the id_token's azp must be this tool's client_id")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 255 or _storable(sub) != sub:
            raise unauthorized("the id_token's sub must be a non-empty string without NUL or lone surrogates")
        return claims

    async def _frame_ancestors(self, platform: Platform) -> tuple[str, ...]:
        """Who may frame the launch page: as for /embed, plus the platform's own origin."""
        tenant = await self.database.get_tenant(platform.tenant_id)
        return framing_origins(self.settings.allowed_origins, tenant.allowed_origins, [_origin(platform.issuer) or ""])


# -- mapping ---------------------------------------------------------------------------------------


def map_role(roles: object) -> str:
    """Our role for the LTI roles claim: teacher (Administrator, Instructor, TA) > student (Learner), or `forbidden`."""
    if not isinstance(roles, list):
        raise bad_request("the id_token has no roles claim (a list of role URIs)")
    mapped = [ROLE_MAP[r] for r in roles if isinstance(r, str) and r in ROLE_MAP]
    if not mapped:
        raise forbidden("the tutor is for a course's learners, instructors and administrators")
    return max(mapped, key=lambda role: _RANK[role])


def lti_user_id(platform: Platform, sub: str) -> str:
    """Our user id for a platform's `sub`: unique per platform, within the 200 characters tokens allow."""
    user = f"lti:{platform.id}:{sub}"
    return user if len(user) <= 200 else f"lti:{platform.id}:sha256:{hashlib.sha256(sub.encode()).hexdigest()}"


def lti_course_id(platform: Platform, context_id: str) -> str:
    """Our course id for a platform's context id: readable when the id is short and plain, else hashed."""
    if _SAFE_ID.fullmatch(context_id):
        return f"lti-{platform.id}-{context_id}"
    return f"lti-{platform.id}-h{hashlib.sha256(context_id.encode()).hexdigest()[:40]}"


def _context(context: object) -> tuple[str, str]:
    if not isinstance(context, dict):
        raise bad_request("the launch has no course context")
    context_id = context.get("id")
    if not isinstance(context_id, str) or not 0 < len(context_id) <= 255 or _storable(context_id) != context_id:
        raise bad_request("the launch's context has no id (a string without NUL or lone surrogates)")
    titles = (_storable(t).strip() for t in (context.get("title"), context.get("label")) if isinstance(t, str))
    return context_id, (next((t for t in titles if t), "") or "Course")[:200]


def _display_name(claims: Mapping[str, Any]) -> str:
    name = claims.get("name")
    name = _storable(name).strip() if isinstance(name, str) else ""
    if not name:
        parts = (claims.get("given_name"), claims.get("family_name"))
        name = " ".join(p for p in (_storable(p).strip() for p in parts if isinstance(p, str)) if p)
    return name[:200]


def _storable(text: str) -> str:
    """The text without what JSON allows but PostgreSQL cannot store: NUL and lone surrogates."""
    return text.encode("utf-8", "ignore").decode("utf-8").replace("\x00", "")


# -- parameters and URLs ---------------------------------------------------------------------------


def _optional_param(params: Mapping[str, str], name: str, max_chars: int) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if len(value) > max_chars:
        raise bad_request(f"'{name}' is too long")
    return value


def _param(params: Mapping[str, str], name: str, max_chars: int) -> str:
    value = _optional_param(params, name, max_chars)
    if value is None:
        raise bad_request(f"'{name}' is required")
    return value


def _same_host(url: str, base_url: str) -> bool:
    # Only the host is compared: behind a TLS-terminating proxy the scheme we see may differ.
    try:
        target = urlsplit(url)
        return target.scheme in ("http", "https") and target.hostname == urlsplit(base_url).hostname
    except ValueError:  # not a URL at all, e.g. an unclosed IPv6 bracket
        return False


def _origin(url: str) -> str | None:
    # The result goes into a CSP header: anything but a plain scheme://host[:port] is dropped.
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc.lower()}"
    return origin if is_plain_origin(origin) else None


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))
