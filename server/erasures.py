"""Users erased by `smartedu delete-user` whose tokens may still be valid, known to every replica.

PostgreSQL records each erasure (`erased_users`, written in the deletion's transaction), and the user upsert
of every `hello` and conversation request refuses a token issued before it in the same statement, so an
erased account is never recreated. The endpoints that need no user row (teacher views, documents, cookie
sessions) check the copy each replica keeps in memory instead, which costs them no round trip: read at
start, every `REFRESH_S` seconds, and at once when delete-user announces an erasure on the control channel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.postgres import Database, Erasure, subject_hash

from .auth import Claims
from .errors import account_deleted

REFRESH_S = 10


@dataclass(frozen=True, slots=True)
class _Record:
    deleted_at: float
    expires_at: float


class Erasures:
    """The erasures still recorded, by (tenant, subject hash)."""

    def __init__(self, db: Database):
        self.db = db
        self._records: dict[tuple[str, bytes], _Record] = {}
        self._loaded = False

    async def refresh(self) -> bool:
        """Read the records from PostgreSQL; whether one was new here (its sockets are to be closed)."""
        records = {(e.tenant_id, e.subject): _record(e) for e in await self.db.erasures()}
        new = not records.keys() <= self._records.keys()
        self._records, self._loaded = records, True
        return new

    def add(self, tenant_id: str, external_id: str, deleted_at: float, expires_at: float) -> None:
        """An erasure announced on the control channel (before the next refresh reads it)."""
        self._records[(tenant_id, subject_hash(tenant_id, external_id))] = _Record(deleted_at, expires_at)

    def erased(self, claims: Claims) -> bool:
        """Whether the claims come from a token (or cookie session) issued before their user was erased."""
        if not self._records:  # the usual case: nothing to hash
            return False
        record = self._records.get((claims.tenant, subject_hash(claims.tenant, claims.sub)))
        if record is None or record.expires_at <= time.time():
            return False
        return claims.issued_at is None or claims.issued_at <= record.deleted_at

    async def refuse(self, claims: Claims) -> None:
        """`forbidden` ("account deleted") for claims issued before their user was erased."""
        if not self._loaded:  # the read at start failed (PostgreSQL away): once now, before trusting the copy
            await self.refresh()
        if self.erased(claims):
            raise account_deleted()


def _record(erasure: Erasure) -> _Record:
    return _Record(erasure.deleted_at.timestamp(), erasure.expires_at.timestamp())
