"""LTI 1.3 storage: platform registrations per tenant, logins in flight (state) and issued nonces.

A platform is found by (issuer, client_id) before its tenant is known; every other query carries the
tenant taken from that registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

_PLATFORM_COLUMNS = "id, tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url"


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


class LtiStore:
    """The LTI queries over the product's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def add_platform(
        self,
        tenant_id: str,
        issuer: str,
        client_id: str,
        auth_login_url: str,
        jwks_url: str,
        deployment_id: str | None = None,
    ) -> Platform:
        """Register a platform for the tenant (created if needed)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant_id)
            row = await conn.fetchrow(
                "INSERT INTO lti_platforms (tenant_id, issuer, client_id, deployment_id, auth_login_url, jwks_url)"
                f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_PLATFORM_COLUMNS}",
                tenant_id,
                issuer,
                client_id,
                deployment_id,
                auth_login_url,
                jwks_url,
            )
        assert row is not None
        return _platform(row)

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
        row = await self.pool.fetchrow(
            f"SELECT {_PLATFORM_COLUMNS} FROM lti_platforms WHERE id = $1 AND tenant_id = $2",
            platform_id,
            tenant_id,
        )
        return _platform(row) if row else None

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
