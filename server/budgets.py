"""Per-minute rate limits and daily token budgets, shared by all replicas through Redis.

A message reserves the most its answer could cost before it is committed (one atomic script with the
rate limit); when the answer is committed the reservation is replaced by what it really used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from ai.base import estimate_tokens
from storage.models import TenantSettings
from storage.redis_store import RedisStore, TokenAdjustment

from .errors import ChatError, ErrorCode
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


def budget_day(at: float) -> str:
    """The UTC day (YYYYmmdd) whose token budgets a message sent at `at` counts against."""
    return time.strftime("%Y%m%d", time.gmtime(at))


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens reserved against today's budgets before an answer, settled after it."""

    tenant_id: str
    user_id: str
    day: str
    tenant_tokens: int
    user_tokens: int


class Budgets:
    """Admits messages against the limits and settles their reservations."""

    def __init__(self, settings: Settings, store: RedisStore, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.metrics = metrics

    async def admit(
        self, tenant: TenantSettings, user_id: str, text: str, client_id: str, *, rate_limited: bool = True
    ) -> Reservation:
        """Rate limit (unless not `rate_limited`) and token budgets, checked and reserved in one Redis round
        trip."""
        settings = self.settings
        tenant_limit, user_limit = tenant.daily_token_budget, tenant.user_daily_token_budget
        limits = (
            tenant_limit if tenant_limit is not None else settings.tenant_daily_tokens,
            user_limit if user_limit is not None else settings.user_daily_tokens,
        )
        output = settings.output_reserve
        amounts = (output + estimate_tokens(text) + 1000, output)
        day = budget_day(time.time())
        code, wait = await self.store.admit(
            tenant.id, user_id, day,
            per_minute=settings.messages_per_minute if rate_limited else 0, limits=limits, amounts=amounts,
        )
        if code:
            self.metrics.refusals.labels(reason="rate_limited" if code == 1 else "quota_exceeded").inc()
        if code == 1:
            raise ChatError(ErrorCode.RATE_LIMITED, "too many messages; wait a moment", client_id, retry_after=wait)
        if code in (2, 3):
            whose = "your school's" if code == 2 else "your"
            raise ChatError(
                ErrorCode.QUOTA_EXCEEDED, f"{whose} daily tutor budget is used up", client_id,
                retry_after=_seconds_to_midnight(),
            )
        return Reservation(tenant.id, user_id, day, amounts[0], amounts[1])

    @staticmethod
    def adjustment(reservation: Reservation | None, total_tokens: int, output_tokens: int) -> TokenAdjustment | None:
        """What replaces a reservation by what was really used (to ride along with the answer's `done`)."""
        if reservation is None:
            return None
        return TokenAdjustment(
            reservation.tenant_id, reservation.user_id, reservation.day,
            total_tokens - reservation.tenant_tokens, output_tokens - reservation.user_tokens,
        )

    async def reserved_for(self, reservation: Reservation, make: Awaitable[T | None]) -> T | None:
        """What `make` makes (an answer's placeholder); when it fails or makes nothing, no answer will use
        the reservation, so it is given back at once."""
        try:
            made = await make
        except Exception:
            await self.settle(reservation, 0, 0)
            raise
        if made is None:
            await self.settle(reservation, 0, 0)
        return made

    async def settle(self, reservation: Reservation | None, total_tokens: int, output_tokens: int) -> None:
        """Replace a reservation by what was really used, on its own round trip."""
        adjust = self.adjustment(reservation, total_tokens, output_tokens)
        if adjust is None:
            return
        try:
            await self.store.adjust_tokens(adjust)
        except Exception:
            log.exception("could not reconcile a token reservation")


def _seconds_to_midnight() -> float:
    now = time.time()
    return 86400 - now % 86400
