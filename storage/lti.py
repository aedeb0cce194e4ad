"""LTI 1.3 storage: platform registrations per tenant, logins in flight (state) and issued nonces.

A platform is found by (issuer, client_id) before its tenant is known; every other query carries the
tenant taken from that registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .errors import StorageError

_PLATFORM_COLUMNS = "id, tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url"
_REGISTRATION_COLUMNS = f"{_PLATFORM_COLUMNS}, created_at"


@dataclass(frozen=True, slots=True)
class Platform:
    """An LMS registered for a tenant (one row of lti_platforms)."""

    id: int
    tenant_id: str
    issuer: str
    client_id: str
    deployment_id: str | None
    auth_login_url: str
    jwks_url: str


def _platform(row: asyncpg.Record) -> Platform:
    return Platform(**dict(row))


@dataclass(frozen=True, slots=True)
class Registration:
    """A platform as its operator sees it: the row, and when it was registered."""

    platform: Platform
    created_at: datetime


def _registration(row: asyncpg.Record) -> Registration:
    fields = dict(row)
    created_at = fields.pop("created_at")
    return Registration(Platform(**fields), created_at)


@dataclass(frozen=True, slots=True)
class Registered:
    """What `register_platform` did: the registration now, the one it replaced (None: a new one), and
    whether the tenant had to be created for it."""

    registration: Registration
    previous: Platform | None
    tenant_created: bool


@dataclass(frozen=True, slots=True)
class Launched:
    """What launches from a platform made in its tenant (they stay when the platform is removed)."""

    courses: int
    users: int


class PlatformExistsError(StorageError):
    """The issuer and client id are registered already (for this tenant or another): nothing was written."""

    def __init__(self, message: str, existing: Platform):
        super().__init__(message)
        self.existing = existing


class LtiStore:
    """The LTI queries over the product's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def register_platform(
        self,
        tenant_id: str,
        issuer: str,
        client_id: str,
        deployment_id: str | None,
        auth_login_url: str,
        jwks_url: str,
        *,
        update: bool = False,
    ) -> Registered:
        """Register a platform for the tenant (created if needed). An (issuer, client_id) registered already
        raises `PlatformExistsError`, unless `update`, which replaces the deployment id and URLs of the
        tenant's own registration (another tenant's is never taken over)."""
        async with self.pool.acquire() as conn, conn.transaction():
            tenant_created = await conn.fetchval(
                "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING true", tenant_id
            )
            # Locks the row a concurrent --update would change; a concurrent insert of the same pair fails
            # on the unique constraint below instead.
            row = await conn.fetchrow(
                f"SELECT {_PLATFORM_COLUMNS} FROM lti_platforms WHERE issuer = $1 AND client_id = $2 FOR UPDATE",
                issuer,
                client_id,
            )
            previous = _platform(row) if row else None
            values = (tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url)
            if previous is None:
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO lti_platforms (tenant_id, issuer, client_id, deployment_id, auth_login_url,"
                        f" jwks_url) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_REGISTRATION_COLUMNS}",
                        *values,
                    )
                except asyncpg.UniqueViolationError:
                    raise StorageError(
                        "this issuer and client id were registered at the same moment by another command; "
                        "run `smartedu lti list` to see it"
                    ) from None
            elif previous.tenant_id != tenant_id:
                raise PlatformExistsError(
                    f"this issuer and client id are registered for another tenant, {previous.tenant_id!r} "
                    f"(platform {previous.id}); remove that registration first to move it",
                    previous,
                )
            elif not update:
                raise PlatformExistsError(
                    f"this issuer and client id are registered already (platform {previous.id} of tenant "
                    f"{tenant_id!r}); add --update to replace its deployment id and URLs",
                    previous,
                )
            else:
                row = await conn.fetchrow(
                    "UPDATE lti_platforms SET deployment_id = $4, auth_login_url = $5, jwks_url = $6"
                    f" WHERE tenant_id = $1 AND issuer = $2 AND client_id = $3 RETURNING {_REGISTRATION_COLUMNS}",
                    *values,
                )
        assert row is not None
        return Registered(_registration(row), previous, bool(tenant_created))

    async def list_registrations(self, tenant_id: str | None = None) -> list[Registration]:
        """The tenant's platforms (every tenant's when None, for the operator), by tenant and id."""
        rows = await self.pool.fetch(
            f"SELECT {_REGISTRATION_COLUMNS} FROM lti_platforms WHERE $1::text IS NULL OR tenant_id = $1"
            " ORDER BY tenant_id, id",
            tenant_id,
        )
        return [_registration(row) for row in rows]

    async def get_registration(self, tenant_id: str, platform_id: int) -> Registration | None:
        """The tenant's platform by id, with when it was registered; None if the tenant has no such platform."""
        row = await self.pool.fetchrow(
            f"SELECT {_REGISTRATION_COLUMNS} FROM lti_platforms WHERE id = $1 AND tenant_id = $2",
            platform_id,
            tenant_id,
        )
        return _registration(row) if row else None

    async def count_launched(self, tenant_id: str, platform_id: int) -> Launched:
        """The courses and users that launches from the platform created in its tenant (server/lti.py names
        them `lti-<platform id>-...` and `lti:<platform id>:...`)."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM courses WHERE tenant_id = $1 AND starts_with(id, $2)) AS courses,"
            " (SELECT count(*) FROM users WHERE tenant_id = $1 AND starts_with(external_id, $3)) AS users",
            tenant_id,
            f"lti-{platform_id}-",
            f"lti:{platform_id}:",
        )
        assert row is not None
        return Launched(int(row["courses"]), int(row["users"]))

    async def remove_platform(self, tenant_id: str, platform_id: int) -> bool:
        """Delete the tenant's platform and its used nonces (courses and users stay); False if there was none."""
        deleted = await self.pool.fetchval(
            "DELETE FROM lti_platforms WHERE id = $1 AND tenant_id = $2 RETURNING true", platform_id, tenant_id
        )
        return bool(deleted)

    async def find_platforms(self, issuer: str, client_id: str | None) -> list[Platform]:
        """The platform registered for (issuer, client_id); without a client id, up to two of the issuer's."""
        rows = await self.pool.fetch(
            f"SELECT {_PLATFORM_COLUMNS} FROM lti_platforms WHERE issuer = $1 AND ($2::text IS NULL OR client_id = $2)"
            " ORDER BY id LIMIT 2",
            issuer,
            client_id,
        )
        return [_platform(row) for row in rows]

    async def get_platform(self, tenant_id: str, platform_id: int) -> Platform | None:
        """The tenant's platform by id, or None (deleted since the login)."""
        registration = await self.get_registration(tenant_id, platform_id)
        return registration.platform if registration else None

    async def use_nonce(self, tenant_id: str, platform_id: int, nonce: str, expires_at: int) -> bool:
        """Record a verified launch's nonce as used until its login expires; False if it was used before (a
        replay). The tenant's expired nonces are purged on the way: only verified launches write here."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM lti_nonces WHERE tenant_id = $1 AND expires_at < now()", tenant_id)
            used = await conn.fetchval(
                "INSERT INTO lti_nonces (nonce, tenant_id, platform_id, expires_at)"
                " VALUES ($1, $2, $3, to_timestamp($4)) ON CONFLICT (nonce) DO NOTHING RETURNING true",
                nonce,
                tenant_id,
                platform_id,
                float(expires_at),
            )
        return used is not None

    async def ensure_course(self, tenant_id: str, course_id: str, title: str) -> bool:
        """Create the course if the tenant does not have it yet (an existing one is left as it is)."""
        created = await self.pool.fetchval(
            "INSERT INTO courses (tenant_id, id, title) VALUES ($1, $2, $3)"
            " ON CONFLICT (tenant_id, id) DO NOTHING RETURNING true",
            tenant_id,
            course_id,
            title,
        )
        return bool(created)
