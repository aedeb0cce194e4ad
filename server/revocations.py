"""Logged-out cookie sessions, kept in PostgreSQL and copied in Redis.

Each request carrying a session cookie asks Redis (one round trip, as before). Redis may lose its data (a
restart without persistence, a flush): a marker key, set once Redis holds every logout PostgreSQL has,
goes with it. A replica that finds the marker gone copies the unexpired logouts from PostgreSQL back into
Redis once, under a lock, before it trusts Redis again; while another replica holds the lock, it asks
PostgreSQL about that one session. So a logged-out cookie never works again, and PostgreSQL is asked only
after Redis lost its data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from storage.postgres import Database
from storage.redis_store import RedisStore

log = logging.getLogger(__name__)

# How long one replica may take to copy the logouts before another may try.
RESTORE_LOCK_S = 30


class Revocations:
    """Logging out and asking whether a cookie session was logged out."""

    def __init__(self, db: Database, store: RedisStore):
        self.db = db
        self.store = store
        self._restoring = asyncio.Lock()  # this replica's requests wait for its one copy

    async def revoke(self, tenant_id: str, session_id: str, remaining_s: int) -> None:
        """Record the logout in PostgreSQL, then in Redis (which tells every replica), until the session would
        have expired."""
        expires_at = datetime.now(UTC) + timedelta(seconds=remaining_s)
        await self.db.revoke_session(tenant_id, session_id, expires_at)
        await self.store.revoke_session(session_id, remaining_s)

    async def revoked(self, tenant_id: str, session_id: str) -> bool:
        """Whether the tenant's cookie session was logged out."""
        found = await self.store.session_revoked(session_id)
        if found is None:
            return session_id in await self.revoked_among({session_id: tenant_id})
        return found

    async def revoked_among(self, sessions: Mapping[str, str]) -> set[str]:
        """Which of these cookie sessions (id -> tenant) were logged out."""
        found = await self.store.revoked_sessions(list(sessions))
        if found is None and await self._restore():
            found = await self.store.revoked_sessions(list(sessions))
        if found is not None:
            return found
        revoked: set[str] = set()
        by_tenant: dict[str, list[str]] = {}
        for session_id, tenant_id in sessions.items():
            by_tenant.setdefault(tenant_id, []).append(session_id)
        for tenant_id, session_ids in by_tenant.items():
            revoked |= await self.db.revoked_sessions(tenant_id, session_ids)
        return revoked

    async def _restore(self) -> bool:
        """Copy the unexpired logouts from PostgreSQL into Redis; False if another replica is doing it."""
        async with self._restoring:
            if await self.store.revocations_loaded():  # done meanwhile, here or elsewhere
                return True
            if not await self.store.lock_revocations(RESTORE_LOCK_S):
                return False
            try:
                sessions = await self.db.unexpired_revocations()
                await self.store.restore_revocations(sessions)
            finally:
                await self.store.unlock_revocations()
        log.info("logged-out sessions copied back into Redis", extra={"sessions": len(sessions)})
        return True
