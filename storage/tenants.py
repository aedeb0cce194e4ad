"""Tenants (schools) as their operator configures them: the `tenants` row and what the school holds.

The server reads these settings in storage/postgres.py (`get_tenant`, `origin_is_allowed`) and
storage/lifecycle.py (`retention_policies`); this module is the operator's side (`smartedu tenant`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .errors import NotFoundError, StorageError

# The settings `update_tenant` may set, in the order they are reported.
SETTINGS = ("name", "system_prompt", "daily_token_budget", "user_daily_token_budget", "retention_days")
_COLUMNS = f"id, {', '.join(SETTINGS)}, allowed_origins, created_at"


@dataclass(frozen=True, slots=True)
class Tenant:
    """One row of `tenants`: None for a budget or retention is the operator's default."""

    id: str
    name: str
    system_prompt: str | None
    daily_token_budget: int | None
    user_daily_token_budget: int | None
    retention_days: int | None
    allowed_origins: tuple[str, ...]
    created_at: datetime


def _tenant(row: asyncpg.Record) -> Tenant:
    fields = dict(row)
    fields["allowed_origins"] = tuple(fields["allowed_origins"])
    return Tenant(**fields)


@dataclass(frozen=True, slots=True)
class Holdings:
    """What a tenant holds: its users, courses and conversations."""

    users: int
    courses: int
    conversations: int


@dataclass(frozen=True, slots=True)
class TenantUpdate:
    """The tenant before and after `update_tenant`."""

    before: Tenant
    after: Tenant


class TenantExistsError(StorageError):
    """A tenant with this id exists already: nothing was written."""


class TenantStore:
    """The operator's tenant queries over the product's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def add_tenant(self, tenant_id: str, name: str) -> Tenant:
        """Create the tenant with its defaults; `TenantExistsError` if it exists."""
        row = await self.pool.fetchrow(
            f"INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
            tenant_id,
            name,
        )
        if row is None:
            raise TenantExistsError(f"tenant {tenant_id!r} exists already: `smartedu tenant set` changes it")
        return _tenant(row)

    async def list_tenants(self) -> list[Tenant]:
        """Every tenant, by id."""
        return [_tenant(row) for row in await self.pool.fetch(f"SELECT {_COLUMNS} FROM tenants ORDER BY id")]

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant, or None if there is no such tenant."""
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE id = $1", tenant_id)
        return _tenant(row) if row else None

    async def count_holdings(self, tenant_id: str) -> Holdings:
        """How many users, courses and conversations the tenant has."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM users WHERE tenant_id = $1) AS users,"
            " (SELECT count(*) FROM courses WHERE tenant_id = $1) AS courses,"
            " (SELECT count(*) FROM conversations WHERE tenant_id = $1) AS conversations",
            tenant_id,
        )
        assert row is not None
        return Holdings(int(row["users"]), int(row["courses"]), int(row["conversations"]))

    async def update_tenant(
        self,
        tenant_id: str,
        settings: Mapping[str, object],
        edit_origins: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
    ) -> TenantUpdate:
        """Set the given `SETTINGS` (None clears one) and the origins `edit_origins` makes of the current ones,
        in one transaction: `NotFoundError` for no such tenant, and what `edit_origins` raises writes nothing."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"not a tenant setting: {', '.join(sorted(unknown))}")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
            if row is None:
                raise NotFoundError(f"there is no tenant {tenant_id!r}: `smartedu tenant add` creates one")
            before = _tenant(row)
            origins = edit_origins(before.allowed_origins) if edit_origins else before.allowed_origins
            names = list(settings)
            assignments = [f"{name} = ${position}" for position, name in enumerate(names, start=3)]
            row = await conn.fetchrow(
                f"UPDATE tenants SET {', '.join(['allowed_origins = $2', *assignments])} WHERE id = $1"
                f" RETURNING {_COLUMNS}",
                tenant_id,
                list(origins),
                *(settings[name] for name in names),
            )
        assert row is not None
        return TenantUpdate(before, _tenant(row))
