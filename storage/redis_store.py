"""Redis access (redis.asyncio): conversation sequence numbers, the resumable event log, rate limits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from .keys import Keys

log = logging.getLogger(__name__)

# Assign consecutive seqs to a batch of frames and append them to the conversation's log in one round
# trip. Each frame is a JSON object without its closing brace's seq: the script splices `"seq":N` in.
_EMIT = """
local seq_key, log_key = KEYS[1], KEYS[2]
local floor, maxlen, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', seq_key) == 0 then redis.call('SET', seq_key, floor) end
local first = redis.call('INCRBY', seq_key, #ARGV - 3) - (#ARGV - 3) + 1
for i = 4, #ARGV do
  local seq = first + i - 4
  local frame = string.sub(ARGV[i], 1, -2) .. ',"seq":' .. seq .. '}'
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, '*', 's', seq, 'f', frame)
end
redis.call('EXPIRE', seq_key, ttl * 24)
redis.call('EXPIRE', log_key, ttl)
return first
"""

_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 24)
return redis.call('INCR', KEYS[1])
"""

_APPEND = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 's', ARGV[2], 'f', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""

# Fixed one-minute window per user; returns 0 when allowed, else the milliseconds until the window ends.
_RATE_LIMIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count > tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
  return ttl
end
return 0
"""


def splice_seq(frame: bytes, seq: int) -> bytes:
    """The same splice the emit script does, for frames delivered locally."""
    return b"%b,\"seq\":%d}" % (frame[:-1], seq)


async def connect_redis(url: str, attempts: int = 10) -> Redis:
    """Connect and ping, retrying with a log line per attempt while the server starts."""
    client: Redis = Redis.from_url(url, health_check_interval=30)
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except (RedisConnectionError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise
            log.warning("redis not reachable, retrying", extra={"attempt": attempt, "error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise RuntimeError("unreachable")


class RedisStore:
    """The product's Redis operations; scripts are atomic, so replicas can share them safely."""

    def __init__(self, client: Redis, keys: Keys, *, log_maxlen: int = 2000, log_ttl_s: int = 3600):
        self.client = client
        self.keys = keys
        self.log_maxlen = log_maxlen
        self.log_ttl_s = log_ttl_s
        self._emit = client.register_script(_EMIT)
        self._reserve = client.register_script(_RESERVE)
        self._append = client.register_script(_APPEND)
        self._rate_limit = client.register_script(_RATE_LIMIT)

    async def ping(self) -> None:
        """Raise if Redis cannot answer."""
        await self.client.ping()

    async def emit(self, conversation_id: str, frames: Sequence[bytes], floor: int) -> int:
        """Number `frames` consecutively, log them, and return the first seq."""
        first = await self._emit(
            keys=[self.keys.conversation_seq(conversation_id), self.keys.conversation_log(conversation_id)],
            args=[floor, self.log_maxlen, self.log_ttl_s, *frames],
        )
        return int(first)

    async def reserve_seq(self, conversation_id: str, floor: int) -> int:
        """Take the next seq of the conversation without logging a frame yet."""
        return int(
            await self._reserve(keys=[self.keys.conversation_seq(conversation_id)], args=[floor, self.log_ttl_s])
        )

    async def append(self, conversation_id: str, seq: int, frame: bytes) -> None:
        """Log a frame whose seq was reserved earlier."""
        await self._append(
            keys=[self.keys.conversation_log(conversation_id)], args=[self.log_maxlen, seq, frame, self.log_ttl_s]
        )

    async def current_seq(self, conversation_id: str) -> int | None:
        """The conversation's latest seq, or None when Redis has no counter for it."""
        value = await self.client.get(self.keys.conversation_seq(conversation_id))
        return int(value) if value is not None else None

    async def hit_rate_limit(self, tenant_id: str, user_id: str, limit: int, window_ms: int = 60_000) -> float:
        """Count one message; return 0 if allowed, else seconds until the user may send again."""
        wait_ms = await self._rate_limit(keys=[self.keys.rate_limit(tenant_id, user_id)], args=[limit, window_ms])
        return int(wait_ms) / 1000.0
