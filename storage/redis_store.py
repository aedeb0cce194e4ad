"""Redis access (redis.asyncio): conversation seqs, the resumable event log, fan-out, presence, leases."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hiredis
import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from .errors import AnswerFencedError
from .keys import Keys
from .roundtrips import RoundTrips

log = logging.getLogger(__name__)

# Number a batch of frames with the conversation's next seqs, append them to its log and publish them to
# the other replicas holding a socket in it (its nodes set) and to the course's teachers, atomically: the
# log, the channels and the seqs all agree on one order. Each frame is a JSON object; the script splices
# `"seq":N` in before its closing brace. Envelopes are "<conversation> <seq> <frame>" on node channels and
# "<node> <seq> <frame>" on course channels. The emitting replica delivers to its own sockets itself, so
# nothing is published back to it. The counter never stays below the emitter's floor (the highest seq it
# knows of): after Redis lost a counter, the first emitter's floor may be lower than what another replica
# has already shown its sockets, and that replica's next frames must still go on from its own.
#
# The four keys' expiries are set when the log or the counter is new, and otherwise renewed only once the
# log's has run down by more than a sixtieth of its ttl (a minute of an hour): a log expires between 59 and
# 60 minutes after its conversation's last frame, never later. Renewing them with every frame was 4 of
# the script's 10 commands and 12 of a turn's 44 (docs/benchmarks.md, tenth round).
#
# A frame of an answer (ARGV[8], its step, and KEYS[5], KEYS[6], the answer's text and owner) is logged only
# while the answer is this node's: its owner key holds no other node and no "!" (taken over). Else nothing
# happens and the script returns 0. The steps: "^" an ack, which makes the answer this node's (one
# replica starts an answer); "?<reply id>" the ack of a resend that found its question unacknowledged,
# likewise, and refused too when an ack of the answer is in the log (the first send's, late: its answer may
# even have ended already); "+<text>" a token, whose text is appended to the answer's text (a takeover
# reads it there: the log is capped); "$" the owner's `done`, which drops both keys; "!" a takeover's
# `done`, which drops the text and leaves the owner key saying "taken over" until it expires. The text key
# gets its expiry when a token creates it, and both answer keys have theirs renewed with the log's (above).
_EMIT = """
local seq_key, log_key, start_key, nodes_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local floor, maxlen, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local node, node_prefix, course_channel, conversation = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local step = ARGV[8]
local token, token_owner = false, false  -- a token's answer keys: their expiries are renewed with the log's
if step ~= '' then
  local text_key, owner_key, kind = KEYS[5], KEYS[6], string.sub(step, 1, 1)
  local owner = redis.call('GET', owner_key)
  if kind ~= '!' and owner and owner ~= node then return 0 end
  if kind == '?' then
    local needle = ',"reply_id":' .. string.sub(step, 2) .. ','
    for _, entry in ipairs(redis.call('XRANGE', log_key, '-', '+')) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'f' and string.sub(fields[i + 1], 1, 13) == '{"type":"ack"'
            and string.find(fields[i + 1], needle, 1, true) then return 0 end
      end
    end
  end
  if kind == '^' or kind == '?' then
    redis.call('SET', owner_key, node, 'EX', ttl)
  elseif kind == '+' then
    local piece = string.sub(step, 2)
    if redis.call('APPEND', text_key, piece) == #piece then redis.call('EXPIRE', text_key, ttl) end
    token, token_owner = true, owner
  elseif kind == '$' then
    redis.call('DEL', text_key, owner_key)
  else
    redis.call('DEL', text_key)
  end
end
local count = #ARGV - 8
local last = redis.call('INCRBY', seq_key, count)
local renew = last == count  -- a new counter (or one at 0)
local first = last - count + 1
if first <= floor then
  first = floor + 1
  last = floor + count
  redis.call('SET', seq_key, last)
end
local ttl_ms = ttl * 1000
local log_ttl = redis.call('PTTL', log_key)
if log_ttl == -2 then redis.call('SET', start_key, first) end
local targets = {}
for _, other in ipairs(redis.call('SMEMBERS', nodes_key)) do
  if other ~= node then targets[#targets + 1] = node_prefix .. other end
end
for i = 9, #ARGV do
  local seq = first + i - 9
  local frame = string.sub(ARGV[i], 1, -2) .. ',"seq":' .. seq .. '}'
  redis.call('XADD', log_key, 'MAXLEN', maxlen, '*', 's', seq, 'f', frame, 'n', node)
  if #targets > 0 then
    local envelope = conversation .. ' ' .. seq .. ' ' .. frame
    for _, channel in ipairs(targets) do redis.call('PUBLISH', channel, envelope) end
  end
  if course_channel ~= '' then redis.call('PUBLISH', course_channel, node .. ' ' .. seq .. ' ' .. frame) end
end
if renew or log_ttl < ttl_ms - math.floor(ttl_ms / 60) then
  redis.call('PEXPIRE', seq_key, ttl_ms * 24)
  redis.call('PEXPIRE', nodes_key, ttl_ms * 24)
  redis.call('PEXPIRE', log_key, ttl_ms)
  redis.call('PEXPIRE', start_key, ttl_ms)
  if token then redis.call('PEXPIRE', KEYS[5], ttl_ms) end
  if token_owner then redis.call('PEXPIRE', KEYS[6], ttl_ms) end
end
return first
"""

# A takeover: from now on no replica logs the answer's frames (its owner key says "taken over"); the text its
# tokens carried so far (nil when none was logged with its text, e.g. by a replica of an older release).
_SEAL = """
redis.call('SET', KEYS[2], '!', 'EX', ARGV[1])
return redis.call('GET', KEYS[1])
"""

# An answer started without its ack's step (the ack failed, or a teacher resumed the AI): make it this
# node's unless another node started it or it was taken over; 1 when it is this node's.
_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# The conversation's current seq and its whole log, read atomically, plus whether the log is complete
# back to its start (a log at its cap may have lost its oldest frames).
_SNAPSHOT = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = tonumber(redis.call('GET', KEYS[3]) or '0')
local length = redis.call('XLEN', KEYS[2])
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local out = {seq, start, length}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  local s, f, n = '0', '{}', ''
  for i = 1, #fields, 2 do
    if fields[i] == 's' then s = fields[i + 1] elseif fields[i] == 'f' then f = fields[i + 1]
    elseif fields[i] == 'n' then n = fields[i + 1] end
  end
  out[#out + 1] = s
  out[#out + 1] = f
  out[#out + 1] = n
end
return out
"""

# Admit one student message: count it against the per-minute rate limit, then reserve tokens against
# the tenant's and the user's daily budgets (0 = unlimited), all or nothing.
# Returns {0, 0} when admitted, {1, wait_ms} when rate limited, {2, 0} / {3, 0} when the tenant's / the
# user's budget is spent.
# A budget counter is read only when its budget is limited, and its expiry (ARGV[7], two days) is set
# when it is created, the day's first message: renewing it with every message was 2 of a turn's Redis
# commands, reading unlimited ones 2 more (docs/benchmarks.md, tenth round). Only this script creates
# counters (a settlement never does: `_SETTLE`).
_ADMIT = """
local rate_key, tenant_key, user_key = KEYS[1], KEYS[2], KEYS[3]
local rate_limit, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local tenant_limit, user_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local tenant_amount, user_amount = tonumber(ARGV[5]), tonumber(ARGV[6])
local budget_ttl = ARGV[7]
if rate_limit > 0 then
  local count = redis.call('INCR', rate_key)
  if count == 1 then redis.call('PEXPIRE', rate_key, window_ms) end
  if count > rate_limit then
    local ttl = redis.call('PTTL', rate_key)
    if ttl < 0 then redis.call('PEXPIRE', rate_key, window_ms); ttl = window_ms end
    return {1, ttl}
  end
end
if tenant_limit > 0 and tonumber(redis.call('GET', tenant_key) or '0') + tenant_amount > tenant_limit then
  return {2, 0}
end
if user_limit > 0 and tonumber(redis.call('GET', user_key) or '0') + user_amount > user_limit then
  return {3, 0}
end
if redis.call('INCRBY', tenant_key, tenant_amount) == tenant_amount then
  redis.call('EXPIRE', tenant_key, budget_ttl)
end
if redis.call('INCRBY', user_key, user_amount) == user_amount then redis.call('EXPIRE', user_key, budget_ttl) end
return {0, 0}
"""

# A day's budget counters live this long after the day's first message (they are read during that day only).
BUDGET_TTL_S = 172800

# Settle an answer's reservation: add each delta (ARGV) to its day's budget counter (KEYS: the tenant's and
# the user's, one hash tag) only while that counter exists. One gone since the admit was deleted by
# `smartedu delete-user` (the user was erased) or lost with Redis's data: created again, it would keep an
# erased user's id for two days, or count only the difference. The admit creates every counter with its
# expiry, so one that this INCRBY created has none, which tells it apart without an EXISTS before each.
_SETTLE = """
for i, key in ipairs(KEYS) do
  local delta = tonumber(ARGV[i])
  if redis.call('INCRBY', key, delta) == delta and redis.call('PTTL', key) == -1 then redis.call('DEL', key) end
end
return 0
"""


# An answer's steps in the emit script (the text of a token follows its "+").
ANSWER_START = "^"
ANSWER_START_RESENT = "?"  # followed by the reply id
ANSWER_TOKEN = "+"
ANSWER_END = "$"
ANSWER_END_TAKEN_OVER = "!"


def splice_seq(frame: bytes, seq: int) -> bytes:
    """The same splice the emit script does, for frames delivered locally."""
    return b'%b,"seq":%d}' % (frame[:-1], seq)


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """Commands in Redis's wire protocol, packed by hiredis in C. redis-py's asyncio connections pack in
    Python, which took 6-9 % of the replica's CPU while answers stream (one `EVALSHA` per frame; the
    profiles in docs/benchmarks.md)."""
    return b"".join([hiredis.pack_command(command) for command in commands])


def _course_envelope(node: str, frame: bytes) -> bytes:
    """A course-level event on a course channel: "<node> 0 <frame>" (seq 0: not a conversation frame)."""
    return b"%b 0 %b" % (node.encode(), frame)


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Pipelines of bounded size: a replica holding 10,000 conversations does not build one of 30,000."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _closed_by_server(conn: AbstractConnection) -> bool:
    """True when the server has closed this idle connection (its end of stream has arrived): an attribute
    check, no round trip."""
    reader = getattr(conn, "_reader", None)
    return bool(conn.is_connected and reader is not None and reader.at_eof())


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class TokenAdjustment:
    """Tokens to add to (or, negative, give back to) a tenant's and a user's budgets for one day."""

    tenant_id: str
    user_id: str
    day: str
    tenant_delta: int
    user_delta: int


@dataclass(slots=True)
class _Emit:
    """One emit waiting for the next pipeline."""

    keys: tuple[str, ...]
    args: tuple[bytes | str | int, ...]
    lease: str | None
    release: str | None
    lease_ttl_ms: int
    adjust: TokenAdjustment | None = None


# An admit script's (keys, args).
_Admit = tuple[tuple[str, str, str], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class LogSnapshot:
    """A conversation's seq and logged frames at one instant."""

    seq: int
    entries: list[tuple[int, bytes]]
    complete_after: int  # every frame with a seq above this is in `entries`
    nodes: list[str] = field(default_factory=list)  # the replica that emitted each entry

    def covers(self, after: int, durable: int = 0) -> bool:
        """True when every frame with seq > `after` is in the log. False for an `after` beyond the counter
        (numbered before Redis lost the conversation's counter, or made up), and while the counter is
        behind `durable`, the conversation's last seq committed to PostgreSQL (Redis lost its state)."""
        if after > self.seq or self.seq < durable:
            return False
        return after >= self.complete_after


RedisClient = Redis | RedisCluster

# redis-py's default asyncio pool raises MaxConnectionsError as soon as 100 commands are in flight, which
# under load failed turns and lost tokens (benchmarks/, docs/benchmarks.md). A blocking pool makes a
# command wait for a free connection instead; Redis runs one command at a time, so more sockets than this
# would not answer sooner.
POOL_SIZE = 64
POOL_TIMEOUT_S = 10.0
# The longest an emit or admit round trip may take (redis-py's default socket timeout, 5 s).
DEFAULT_ROUND_TRIP_TIMEOUT_S = 5.0
# A course's presence keys live this many presence ttls after their last announce or heartbeat: a replica
# that crashed never takes its sessions off, and a course no teacher opens is never cleaned by `online`.
PRESENCE_KEY_TTLS = 4


def _client(url: str) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_TIMEOUT_S, health_check_interval=30
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PREFIXES = tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES)
# What a cluster URL's query may set: the options of redis-py's cluster client that a URL can carry (the
# same names a single node's `rediss://...?ssl_ca_certs=...` takes), anything else is a typo.
_CLUSTER_URL_OPTIONS = frozenset({
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "socket_read_size", "health_check_interval",
    "max_connections", "client_name", "protocol", "ssl_ca_certs", "ssl_ca_data", "ssl_cert_reqs", "ssl_certfile",
    "ssl_keyfile", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
    "ssl_include_verify_flags", "ssl_exclude_verify_flags",
})


def cluster_options(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`redis+cluster://[user:password@]host:port,host:port[/?options]` (`rediss+cluster://` for TLS) -> the
    seeds and the cluster client's options. Credentials and options are parsed as redis-py parses a single
    node's URL, so TLS settings (`?ssl_ca_certs=...&ssl_certfile=...`) read the same. ValueError if malformed;
    its message never holds the password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"must start with {' or '.join(CLUSTER_PREFIXES)}")
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    userinfo, at, hosts = rest[:end].rpartition("@")
    seeds = [_seed(item.strip()) for item in hosts.split(",")]
    node_url = f"{scheme.removesuffix('+cluster')}://{userinfo}{at}{hosts.split(',')[0].strip()}{rest[end:]}"
    options: dict[str, Any] = dict(parse_url(node_url))
    for name in ("host", "port"):
        options.pop(name, None)
    if options.pop("db", 0):
        raise ValueError("a Redis Cluster has only database 0")
    tls = options.pop("connection_class", None) is SSLConnection
    unknown = sorted(set(options) - _CLUSTER_URL_OPTIONS - {"username", "password"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    if not tls and any(name.startswith("ssl_") for name in options):
        raise ValueError("ssl_* options need rediss+cluster://")
    if tls:
        options["ssl"] = True
    return seeds, options


def _seed(item: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{item}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = None
    if not host:
        raise ValueError(f"{item!r} is not host:port")
    return host, port or 6379


def _cluster_client(url: str) -> RedisCluster:
    seeds, options = cluster_options(url)
    options.setdefault("health_check_interval", 30)
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in seeds], **options)


async def connect_redis(url: str, attempts: int = 10) -> RedisClient:
    """Connect (a `redis+cluster://` or `rediss+cluster://` URL selects Redis Cluster) and ping, retrying
    while the server starts; refused credentials fail at once."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        client: RedisClient = _cluster_client(url) if url.startswith(CLUSTER_PREFIXES) else _client(url)
        try:
            if isinstance(client, RedisCluster):
                await client.initialize()
            await client.ping()
            return client
        except (RedisConnectionError, RedisClusterException, OSError) as exc:
            await client.aclose()
            if attempt == attempts or _refused_credentials(exc):
                raise
            log.warning("redis not reachable, retrying", extra={"attempt": attempt, "error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise RuntimeError("unreachable")


def _refused_credentials(exc: BaseException) -> bool:
    """A wrong or missing password or user (the cluster client wraps it): waiting will not help."""
    return isinstance(exc, AuthenticationError | AuthorizationError) or isinstance(
        exc.__cause__, AuthenticationError | AuthorizationError
    )


class RedisStore:
    """The product's Redis operations; scripts are atomic, so replicas can share them safely."""

    def __init__(self, client: RedisClient, keys: Keys, *, log_maxlen: int = 2000, log_ttl_s: int = 3600):
        self.client = client
        self.keys = keys
        self.log_maxlen = log_maxlen
        self.log_ttl_s = log_ttl_s
        self._emit = client.register_script(_EMIT)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._admit = client.register_script(_ADMIT)
        self._seal = client.register_script(_SEAL)
        self._claim = client.register_script(_CLAIM)
        self._emits: RoundTrips[_Emit, int] = RoundTrips(self._run_emits, "redis-emit-flusher")
        # Messages arriving together share the admit's round trip too.
        self._admits: RoundTrips[_Admit, Any] = RoundTrips(self._run_admits, "redis-admits", limit=256)
        self._node_prefix = keys.node_channel("")  # the emit script appends each target node's id
        # The emit flusher's own connection (single-node Redis; on a cluster each emit is a call of its own):
        # a burst of other commands, say a thousand sockets closing at once, cannot hold up the answers.
        self._emit_conn: AbstractConnection | None = None
        # Likewise the admits': the first step of every message, it does not queue behind a pool checkout.
        self._admit_conn: AbstractConnection | None = None
        # Their round trips are bounded by `_round_trip` itself: without a socket timeout, redis-py sends
        # directly instead of under asyncio.wait_for, which costs a task per send and, on Python 3.11, can
        # drop a cancellation (server/tasks.py).
        self._round_trip_timeout_s = DEFAULT_ROUND_TRIP_TIMEOUT_S
        if isinstance(client, Redis):
            pool = client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            self._round_trip_timeout_s = kwargs.get("socket_timeout") or DEFAULT_ROUND_TRIP_TIMEOUT_S
            kwargs["socket_timeout"] = None
            self._emit_conn = pool.connection_class(**kwargs)
            self._admit_conn = pool.connection_class(**kwargs)

    async def ping(self) -> None:
        """Raise if Redis cannot answer."""
        await self.client.ping()

    # -- conversation events --------------------------------------------------------------------

    async def emit(
        self,
        conversation_id: str,
        frames: Sequence[bytes],
        floor: int,
        node: str,
        course_channel: str = "",
        *,
        lease: str | None = None,
        release: str | None = None,
        lease_ttl_ms: int = 6000,
        adjust: TokenAdjustment | None = None,
        answer: tuple[int, str] | None = None,
    ) -> int:
        """Number `frames` consecutively, log and publish them; return the first seq.

        `lease` / `release` take or drop an answer's lease, and `adjust` settles its token reservation, in
        the same round trip. `answer` = (reply id, step): frames of that answer, logged only while it is
        this node's (`AnswerFencedError` otherwise, and nothing is logged; the side commands still run).
        Emits from every answer of this process share round trips: while one pipeline is on its way to
        Redis, the next ones queue up and go together (so a busy replica pays one write and one read for
        many frames).
        """
        keys = self.keys
        step = ""
        conversation_keys: tuple[str, ...] = (
            keys.conversation_seq(conversation_id),
            keys.conversation_log(conversation_id),
            keys.conversation_log_start(conversation_id),
            keys.conversation_nodes(conversation_id),
        )
        if answer is not None:
            reply_id, step = answer
            conversation_keys += (
                keys.answer_text(conversation_id, reply_id), keys.answer_owner(conversation_id, reply_id)
            )
        call = _Emit(
            keys=conversation_keys,
            args=(
                floor, self.log_maxlen, self.log_ttl_s, node, self._node_prefix, course_channel,
                conversation_id, step, *frames,
            ),
            lease=lease,
            release=release,
            lease_ttl_ms=lease_ttl_ms,
            adjust=adjust,
        )
        if isinstance(self.client, RedisCluster):
            # Scripts cannot ride in a cluster pipeline here: one call each.
            first = int(await self._emit(keys=call.keys, args=call.args))
            for command in self._side_commands([call]):
                await self.client.execute_command(*command)
        else:
            first = await self._emits.submit(call)
        if first == 0:
            raise AnswerFencedError(f"answer {answer[0] if answer else '?'} is no longer this replica's")
        return first

    async def seal_answer(self, conversation_id: str, reply_id: int) -> str | None:
        """Take an answer over: from now on no replica logs its frames. The text its tokens carried (None when
        none was logged with its text: no token yet, or a replica of an older release generated it)."""
        text = await self._seal(
            keys=[self.keys.answer_text(conversation_id, reply_id), self.keys.answer_owner(conversation_id, reply_id)],
            args=[self.log_ttl_s],
        )
        return None if text is None else bytes(text).decode()

    async def drop_answer(self, conversation_id: str, reply_id: int, *, keep_owner: bool = False) -> None:
        """Delete what Redis keeps of an answer that ended without its own `done` (another replica ended it, or
        its conversation was deleted): its text is personal data, and no takeover needs it any more.
        `keep_owner`: a takeover's mark stays, so that its former replica still logs nothing of it."""
        keys = [self.keys.answer_text(conversation_id, reply_id)]
        if not keep_owner:
            keys.append(self.keys.answer_owner(conversation_id, reply_id))
        await self.client.delete(*keys)  # one hash slot: a Redis Cluster takes it

    async def claim_answer(self, conversation_id: str, reply_id: int, node: str) -> bool:
        """Make an answer started without its ack's step `node`'s; False when another replica started it or
        it was taken over."""
        mine = await self._claim(keys=[self.keys.answer_owner(conversation_id, reply_id)], args=[node, self.log_ttl_s])
        return bool(mine)

    async def _run_emits(self, batch: list[_Emit]) -> list[int]:
        """One round trip on the emit connection: every emit script of the batch, then the side commands."""
        sha = self._emit.sha
        commands: list[tuple[Any, ...]] = [("EVALSHA", sha, len(c.keys), *c.keys, *c.args) for c in batch]
        side = self._side_commands(batch)
        results = await self._scripts_round_trip(commands + side, self._emit_conn, _EMIT, len(batch))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [int(r) for r in results[: len(batch)]]

    async def _scripts_round_trip(
        self, commands: list[tuple[Any, ...]], conn: AbstractConnection | None, source: str, scripts: int
    ) -> list[Any]:
        """`_round_trip` of commands whose first `scripts` are `EVALSHA`s of `source`. If Redis lost its
        script cache (restart, SCRIPT FLUSH), those scripts did not run: the script is loaded and they go
        again. The other commands did run (each budget settlement counts once), so they are not sent again."""
        results = await self._round_trip(commands, conn)
        missed = [i for i, result in enumerate(results[:scripts]) if isinstance(result, NoScriptError)]
        if missed:
            await self.client.script_load(source)
            again = await self._round_trip([commands[i] for i in missed], conn)
            for i, result in zip(missed, again, strict=True):
                results[i] = result
        return results

    async def _round_trip(self, commands: list[tuple[Any, ...]], conn: AbstractConnection | None) -> list[Any]:
        """Send commands in one write and read every reply (an error reply in its place) on `conn`, the emit
        or the admit connection, each used by one flusher only (one batch at a time): no pool checkout, no
        pipeline object per batch. A connection error, a timeout or a cancellation drops the connection;
        the next batch reconnects."""
        assert conn is not None  # emits and admits on a cluster do not come here
        if _closed_by_server(conn):
            # Redis restarted (or dropped the connection) while it was idle: reconnect before sending, as
            # pool checkouts do, instead of failing the next message or answer on a dead connection. Only
            # a close seen before sending: a batch that may have run is never sent twice.
            await conn.disconnect()
        try:
            async with asyncio.timeout(self._round_trip_timeout_s):
                await conn.send_packed_command(pack(commands))
                results: list[Any] = []
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
            return results
        except BaseException:
            await conn.disconnect()
            raise

    def _side_commands(self, calls: Sequence[_Emit]) -> list[tuple[Any, ...]]:
        """The lease and budget changes that ride along with emits."""
        leases = self.keys.leases()
        expiry = now_ms()
        commands: list[tuple[Any, ...]] = []
        taken = [(expiry + c.lease_ttl_ms, c.lease) for c in calls if c.lease is not None]
        if taken:
            commands.append(("ZADD", leases, *(part for pair in taken for part in pair)))
        dropped = [c.release for c in calls if c.release is not None]
        if dropped:
            commands.append(("ZREM", leases, *dropped))
        commands += [self._adjust(call.adjust) for call in calls if call.adjust is not None]
        return commands

    def _adjust(self, adjust: TokenAdjustment) -> tuple[Any, ...]:
        """The settling script's call. EVAL, not EVALSHA: it rides in pipelines that resend only the emit
        scripts when Redis lost its script cache, and it is one call per answer."""
        keys = self.keys
        return (
            "EVAL", _SETTLE, 2, keys.tenant_tokens(adjust.tenant_id, adjust.day),
            keys.user_tokens(adjust.tenant_id, adjust.user_id, adjust.day), adjust.tenant_delta, adjust.user_delta,
        )

    async def close(self) -> None:
        """Wait for emits and admits already queued (their callers are waiting for them), then close their
        connections."""
        await self._emits.wait()
        await self._admits.wait()
        for conn in (self._emit_conn, self._admit_conn):
            if conn is not None:
                await conn.disconnect()

    async def snapshot(self, conversation_id: str) -> LogSnapshot:
        """The conversation's current seq and every frame still in its log."""
        keys = self.keys
        raw = await self._snapshot(
            keys=[
                keys.conversation_seq(conversation_id),
                keys.conversation_log(conversation_id),
                keys.conversation_log_start(conversation_id),
            ]
        )
        seq, start, length = int(raw[0]), int(raw[1]), int(raw[2])
        entries = [(int(raw[i]), bytes(raw[i + 1])) for i in range(3, len(raw), 3)]
        nodes = [bytes(raw[i + 2]).decode() for i in range(3, len(raw), 3)]
        if not entries:
            complete_after = seq
        elif length >= self.log_maxlen:
            complete_after = entries[0][0] - 1  # the cap may have dropped older frames
        else:
            complete_after = (start if start > 0 else entries[0][0]) - 1
        return LogSnapshot(seq, entries, complete_after, nodes)

    async def hold(self, conversation_ids: Sequence[str], node: str) -> list[int]:
        """Ask for other replicas' frames of these conversations on `node`'s channel; their current seqs.

        Frames emitted after this returns are published to the node (0 = no counter yet).
        """
        if not conversation_ids:
            return []
        ttl = self.log_ttl_s * 24
        seqs: list[int] = []
        for chunk in _chunks(conversation_ids):
            async with self.client.pipeline(transaction=False) as pipe:
                for conversation_id in chunk:
                    nodes = self.keys.conversation_nodes(conversation_id)
                    pipe.sadd(nodes, node)
                    pipe.expire(nodes, ttl)
                    pipe.get(self.keys.conversation_seq(conversation_id))
                results = await pipe.execute()
            seqs.extend(int(value) if value is not None else 0 for value in results[2::3])
        return seqs

    async def seqs(self, conversation_ids: Sequence[str]) -> list[int]:
        """The conversations' current seqs (0 = no counter yet)."""
        seqs: list[int] = []
        for chunk in _chunks(conversation_ids):
            async with self.client.pipeline(transaction=False) as pipe:
                for conversation_id in chunk:
                    pipe.get(self.keys.conversation_seq(conversation_id))
                results = await pipe.execute()
            seqs.extend(int(value) if value is not None else 0 for value in results)
        return seqs

    async def release(self, conversation_ids: Sequence[str], node: str) -> None:
        """Stop publishing these conversations' frames to `node` (no socket there needs them any more)."""
        for chunk in _chunks(conversation_ids):
            async with self.client.pipeline(transaction=False) as pipe:
                for conversation_id in chunk:
                    pipe.srem(self.keys.conversation_nodes(conversation_id), node)
                await pipe.execute()

    async def forget_conversations(
        self, conversation_ids: Sequence[str], answers: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Delete what Redis keeps of these conversations (deleted from PostgreSQL): their stream logs, which
        hold questions and answers, their seq counters and nodes sets, and the text and owner keys (or a
        takeover's mark) of their `answers` (conversation, reply id)."""
        keys = self.keys
        doomed = [
            key
            for conversation_id in conversation_ids
            for key in (
                keys.conversation_log(conversation_id),
                keys.conversation_log_start(conversation_id),
                keys.conversation_seq(conversation_id),
                keys.conversation_nodes(conversation_id),
            )
        ]
        doomed += [
            key
            for conversation_id, reply_id in answers
            for key in (keys.answer_text(conversation_id, reply_id), keys.answer_owner(conversation_id, reply_id))
        ]
        for chunk in _chunks(doomed, 2000):
            async with self.client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.delete(key)  # one DEL per key: on a Redis Cluster a multi-key DEL must stay within one slot
                await pipe.execute()

    async def forget_presence(self, tenant_id: str, course_ids: Sequence[str], external_id: str) -> int:
        """Take the user's entries (which hold their name) off these courses' presence lists, also those a
        crashed replica left behind; how many there were."""
        removed = 0
        for course_id in course_ids:
            zkey, hkey = self.keys.presence(tenant_id, course_id), self.keys.presence_info(tenant_id, course_id)
            entries = await self.client.hgetall(hkey)
            theirs = [s for s, info in entries.items() if orjson.loads(info).get("user_id") == external_id]
            if theirs:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.zrem(zkey, *theirs)
                    pipe.hdel(hkey, *theirs)
                    await pipe.execute()
                removed += len(theirs)
        return removed

    async def forget_user_counters(self, tenant_id: str, user_id: str, days: Sequence[str]) -> None:
        """Delete an erased user's rate-limit counter and token budgets of these days (keyed by their id)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.rate_limit(tenant_id, user_id))
            for day in days:
                pipe.delete(self.keys.user_tokens(tenant_id, user_id, day))
            await pipe.execute()

    async def publish_control(self, message: dict[str, object]) -> None:
        """Tell every replica something (e.g. cancel an answer that another replica generates)."""
        await self.client.publish(self.keys.control_channel(), orjson.dumps(message))

    async def revoke_session(self, session_id: str, ttl_s: int) -> None:
        """Mark a cookie session as logged out until it would have expired, and tell every replica."""
        await self.client.set(self.keys.revoked_session(session_id), b"1", ex=max(1, ttl_s))
        await self.publish_control({"op": "revoke_session", "session": session_id, "until": time.time() + ttl_s})

    async def revoked_sessions(self, session_ids: Sequence[str]) -> set[str] | None:
        """Which of these cookie sessions were logged out (one pipelined round trip); None when Redis lost the
        logouts (PostgreSQL has them: `restore_revocations`)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.revocations_loaded())
            for session_id in session_ids:
                pipe.exists(self.keys.revoked_session(session_id))
            loaded, *found = await pipe.execute()
        revoked = {session_id for session_id, hit in zip(session_ids, found, strict=True) if hit}
        return revoked if loaded or revoked else None

    async def session_revoked(self, session_id: str) -> bool | None:
        """Whether a cookie session was logged out (one round trip: on HTTP requests and socket upgrades); None
        when Redis lost the logouts."""
        # One EXISTS, as cheap as asking about the session alone: the session's key is counted twice, so the
        # count says both (0 neither, 1 the marker, 2 the session, 3 both). On a cluster redis-py splits it by
        # slot and adds up the counts.
        key = self.keys.revoked_session(session_id)
        count = int(await self.client.exists(self.keys.revocations_loaded(), key, key))
        return True if count >= 2 else (False if count == 1 else None)

    async def revocations_loaded(self) -> bool:
        return bool(await self.client.exists(self.keys.revocations_loaded()))

    async def lock_revocations(self, ttl_s: int) -> bool:
        """Take the right to restore the logouts (one replica at a time, for at most `ttl_s`)."""
        return bool(await self.client.set(self.keys.revocations_loading(), b"1", nx=True, ex=ttl_s))

    async def unlock_revocations(self) -> None:
        await self.client.delete(self.keys.revocations_loading())

    async def restore_revocations(self, sessions: Sequence[tuple[str, float]]) -> None:
        """Put back the logged-out sessions (id, seconds left) of PostgreSQL, then mark Redis as holding them."""
        for chunk in _chunks(sessions):
            async with self.client.pipeline(transaction=False) as pipe:
                for session_id, left_s in chunk:
                    pipe.set(self.keys.revoked_session(session_id), b"1", px=max(1, int(left_s * 1000)))
                await pipe.execute()
        await self.client.set(self.keys.revocations_loaded(), b"1")

    async def publish_course_event(self, tenant_id: str, course_id: str, node: str, frame: bytes) -> None:
        """A course-level event (students joining or leaving) for teachers watching on any replica."""
        await self.client.publish(self.keys.course_channel(tenant_id, course_id), _course_envelope(node, frame))

    # -- token budgets --------------------------------------------------------------------------

    async def admit(
        self,
        tenant_id: str,
        user_id: str,
        day: str,
        *,
        per_minute: int,
        limits: tuple[int, int],
        amounts: tuple[int, int],
    ) -> tuple[int, float]:
        """Rate-limit one message (unless `per_minute` is 0) and reserve (tenant, user) tokens for it, atomically.

        Returns (0, 0) when admitted, (1, seconds to wait) when rate limited, (2, 0) when the tenant's
        daily budget is spent and (3, 0) when the user's is.
        """
        keys = self.keys
        call = (
            (
                keys.rate_limit(tenant_id, user_id),
                keys.tenant_tokens(tenant_id, day),
                keys.user_tokens(tenant_id, user_id, day),
            ),
            (per_minute, 60_000, limits[0], limits[1], amounts[0], amounts[1], BUDGET_TTL_S),
        )
        if isinstance(self.client, RedisCluster):
            reply = await self._admit(keys=call[0], args=call[1])
        else:
            reply = await self._admits.submit(call)
        code, wait_ms = reply
        return int(code), int(wait_ms) / 1000.0

    async def _run_admits(self, batch: list[_Admit]) -> list[Any]:
        """The admit scripts of messages that arrived together, in one round trip on the admit connection;
        an error reply fails only its own message."""
        commands = [("EVALSHA", self._admit.sha, 3, *keys, *args) for keys, args in batch]
        return await self._scripts_round_trip(commands, self._admit_conn, _ADMIT, len(commands))

    async def adjust_tokens(self, adjust: TokenAdjustment) -> None:
        """Reconcile a reservation with what the answer really used (counters that still exist only)."""
        await self.client.execute_command(*self._adjust(adjust))

    async def tokens_used(self, tenant_id: str, user_id: str, day: str) -> tuple[int, int]:
        tenant, user = await self.client.mget(
            [self.keys.tenant_tokens(tenant_id, day), self.keys.user_tokens(tenant_id, user_id, day)]
        )
        return int(tenant or 0), int(user or 0)

    # -- leases on answers being generated ------------------------------------------------------

    async def renew_leases(self, members: Sequence[str], ttl_ms: int) -> None:
        """Extend the lease of every answer this replica owns."""
        if members:
            expiry = now_ms() + ttl_ms
            await self.client.zadd(self.keys.leases(), {m: expiry for m in members})

    async def release_lease(self, member: str) -> None:
        await self.client.zrem(self.keys.leases(), member)

    async def lease_if_free(self, member: str, ttl_ms: int) -> bool:
        """Take the lease of an answer that holds none (an expired one still counts as held: its takeover is
        due); whether it was taken."""
        return bool(await self.client.zadd(self.keys.leases(), {member: now_ms() + ttl_ms}, nx=True))

    async def lease_unleased(self, members: Sequence[str]) -> int:
        """Give each of these answers that holds no lease an expired one (a lease held is left as it is), so
        that `claim_expired_leases` hands it to one replica; how many were given one."""
        if not members:
            return 0
        added = await self.client.zadd(self.keys.leases(), dict.fromkeys(members, 0), nx=True)
        return int(added or 0)

    async def claim_expired_leases(self, limit: int = 50) -> list[str]:
        """Take over answers whose owner stopped renewing; each is returned to exactly one caller."""
        expired = await self.client.zrangebyscore(self.keys.leases(), "-inf", now_ms(), start=0, num=limit)
        claimed: list[str] = []
        for raw in expired:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            if await self.client.zrem(self.keys.leases(), member):
                claimed.append(member)
        return claimed

    # -- presence -------------------------------------------------------------------------------

    async def announce(
        self,
        tenant_id: str,
        course_id: str,
        session_id: str,
        info: bytes,
        ttl_ms: int,
        event: tuple[str, bytes] | None = None,
    ) -> None:
        """Mark a session online in its course until the ttl runs out (renewed by heartbeats); `event`, a
        (node, frame) course event for teachers on any replica, is published in the same round trip."""
        cluster = isinstance(self.client, RedisCluster)
        zset, hash_ = self.keys.presence(tenant_id, course_id), self.keys.presence_info(tenant_id, course_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(zset, {session_id: now_ms() + ttl_ms})
            pipe.hset(hash_, session_id, info)
            pipe.pexpire(zset, ttl_ms * PRESENCE_KEY_TTLS)
            pipe.pexpire(hash_, ttl_ms * PRESENCE_KEY_TTLS)
            if event is not None and not cluster:  # a cluster pipeline routes commands by key; PUBLISH has none
                pipe.publish(self.keys.course_channel(tenant_id, course_id), _course_envelope(*event))
            await pipe.execute()
        if event is not None and cluster:
            await self.publish_course_event(tenant_id, course_id, *event)

    async def heartbeat(self, sessions: Sequence[tuple[str, str, str]], ttl_ms: int) -> None:
        """Renew (tenant, course, session) presence entries, and their course's keys, in one round trip: one
        ZADD per course, since building a command per session held the event loop for milliseconds with a
        thousand of them."""
        if not sessions:
            return
        expiry = now_ms() + ttl_ms
        courses: dict[tuple[str, str], dict[str, int]] = {}
        for tenant_id, course_id, session_id in sessions:
            courses.setdefault((tenant_id, course_id), {})[session_id] = expiry
        async with self.client.pipeline(transaction=False) as pipe:
            for (tenant_id, course_id), members in courses.items():
                zset = self.keys.presence(tenant_id, course_id)
                pipe.zadd(zset, members, xx=True)
                pipe.pexpire(zset, ttl_ms * PRESENCE_KEY_TTLS)
                pipe.pexpire(self.keys.presence_info(tenant_id, course_id), ttl_ms * PRESENCE_KEY_TTLS)
            await pipe.execute()

    async def depart(self, departures: Sequence[tuple[str, str, str, bytes]], node: str) -> None:
        """Take (tenant, course, session) entries off the presence lists and publish each one's `left` event
        frame to the course's teachers, in one round trip (sockets tend to close in crowds)."""
        cluster = isinstance(self.client, RedisCluster)
        async with self.client.pipeline(transaction=False) as pipe:
            for tenant_id, course_id, session_id, frame in departures:
                pipe.zrem(self.keys.presence(tenant_id, course_id), session_id)
                pipe.hdel(self.keys.presence_info(tenant_id, course_id), session_id)
                if not cluster:  # as in `announce`
                    pipe.publish(self.keys.course_channel(tenant_id, course_id), _course_envelope(node, frame))
            await pipe.execute()
        if cluster:
            for tenant_id, course_id, _, frame in departures:
                await self.publish_course_event(tenant_id, course_id, node, frame)

    async def _zmembers(self, key: str, minimum: int) -> list[Any]:
        return list(await self.client.zrangebyscore(key, minimum, "+inf"))

    async def online(self, tenant_id: str, course_id: str) -> list[dict[str, object]]:
        """Sessions online in the course, dropping the ones whose heartbeats stopped."""
        zkey, hkey = self.keys.presence(tenant_id, course_id), self.keys.presence_info(tenant_id, course_id)
        now = now_ms()
        stale = await self.client.zrangebyscore(zkey, "-inf", now)
        if stale:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(zkey, "-inf", now)
                pipe.hdel(hkey, *stale)
                await pipe.execute()
        live = [bytes(m) if not isinstance(m, str) else m.encode() for m in await self._zmembers(zkey, now)]
        if not live:
            return []
        infos = await self.client.hmget(hkey, live)
        return [orjson.loads(info) for info in infos if info is not None]
