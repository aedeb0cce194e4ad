"""JWTs for simulated users: minted from an HS256 secret or a PEM private key, or read from a file."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROLES = ("student", "teacher", "admin")

# The server verifies with one configured algorithm; the key type decides which one we sign with.
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class TokenError(Exception):
    """A key or token file that cannot be used."""


@dataclass(frozen=True)
class TokenMinter:
    """Signs one token per simulated user; `key` is a secret (HS256) or a private key object."""

    algorithm: str
    key: str | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    tenant: str
    courses: tuple[str, ...]
    ttl: float
    issuer: str | None = None
    audience: str | None = None

    def mint(self, subject: str, role: str, name: str) -> str:
        now = int(time.time())
        claims: dict[str, object] = {
            "sub": subject,
            "tid": self.tenant,
            "role": role,
            "name": name,
            "courses": list(self.courses),
            "iat": now,
            "exp": now + int(self.ttl),
        }
        if self.issuer is not None:
            claims["iss"] = self.issuer
        if self.audience is not None:
            claims["aud"] = self.audience
        with warnings.catch_warnings():
            # A short test secret is the operator's choice; the server decides whether to accept it.
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            return jwt.encode(claims, self.key, algorithm=self.algorithm)


def minter_from_secret(
    secret: str,
    *,
    tenant: str,
    courses: Sequence[str],
    ttl: float,
    issuer: str | None = None,
    audience: str | None = None,
) -> TokenMinter:
    if not secret:
        raise TokenError("the HS256 secret is empty")
    return TokenMinter("HS256", secret, tenant, tuple(courses), ttl, issuer, audience)


def minter_from_private_key(
    pem_path: Path,
    *,
    tenant: str,
    courses: Sequence[str],
    ttl: float,
    issuer: str | None = None,
    audience: str | None = None,
) -> TokenMinter:
    try:
        data = pem_path.read_bytes()
    except OSError as exc:
        raise TokenError(f"cannot read private key {pem_path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{pem_path} is not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        found = _EC_ALGORITHMS.get(key.curve.name)
        if found is None:
            raise TokenError(f"unsupported elliptic curve {key.curve.name} (use P-256 for ES256)")
        algorithm = found
    else:
        raise TokenError(f"unsupported key type {type(key).__name__}: use an RSA (RS256) or EC (ES256) key")
    return TokenMinter(algorithm, key, tenant, tuple(courses), ttl, issuer, audience)


def read_tokens_file(path: Path) -> list[str]:
    """One JWT per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TokenError(f"cannot read tokens file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TokenError(f"tokens file {path} is not UTF-8 text") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise TokenError(f"tokens file {path} holds no token")
    for number, token in enumerate(tokens, start=1):
        if token.count(".") != 2:
            raise TokenError(f"tokens file {path}: token {number} is not a JWT (expected three parts)")
    return tokens


@dataclass
class TokenSource:
    """Hands out the token for user number `index`: minted on first use, or taken from a list in turn."""

    role: str
    subject_prefix: str
    minter: TokenMinter | None = None
    tokens: list[str] | None = None

    def token_for(self, index: int) -> str:
        if self.tokens:
            return self.tokens[index % len(self.tokens)]
        if self.minter is None:
            raise TokenError("no token source configured")
        label = self.subject_prefix.rsplit("-", 1)[-1].capitalize()
        return self.minter.mint(f"{self.subject_prefix}-{index}", self.role, f"Load {label} {index}")
