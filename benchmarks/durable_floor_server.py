"""The durable floor: the floor plus the least work a server keeping this product's promises must do a turn.

`floor_server.py` measures the WebSocket alone. This one adds, as cheaply as it can be done, what no
design of this product can leave out, and nothing else:

- the question is committed to PostgreSQL before its `ack` (an acknowledged message is durable), and the
  answer before its `done`; turns in flight share statements and commits (group commit, the replica's own
  `storage.roundtrips.RoundTrips`), one `INSERT ... SELECT FROM unnest(...)` per batch into a table with a
  primary key and the (tenant, conversation) index that the last-ten-turns read needs;
- the answer's frames are appended to a Redis stream before they are sent (replicas share resumable
  streams), and every question counts against a per-student rate-limit counter in Redis (limits are shared
  by replicas); all of it in one pipeline per batch.

Left out because a real server can avoid it or because it is not a turn's: token verification (once per
socket), history reads (kept in this process: the least possible, since a conversation stays on its
replica), the teacher fan-out, budgets, metrics, logs, JSON validation, the AI provider. So its limit is an
upper bound for any Python server of this product on the same machine, and ours / durable floor says how
much of the gap to the floor is ours.

    python benchmarks/durable_floor_server.py --port 8098 --tokens 1 \\
        --database-url postgresql://postgres@127.0.0.1/bench --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import redis.asyncio as redis
import uvloop
from aiohttp import web

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_server import answer_frames, protocol_loop
from storage.roundtrips import RoundTrips

log = logging.getLogger("smartedu.durable_floor")

SCHEMA = """
CREATE TABLE IF NOT EXISTS durable_floor_messages (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    conversation_id text NOT NULL,
    role text NOT NULL,
    text text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS durable_floor_messages_recent
    ON durable_floor_messages (tenant_id, conversation_id, created_at);
"""
INSERT = (
    "INSERT INTO durable_floor_messages (id, tenant_id, conversation_id, role, text)"
    " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])"
)
TENANT = "floor"
LOG_MAXLEN = 2000  # the stream log's cap, as the real server's `stream_maxlen`
LOG_TTL_S = 3600
RATE_WINDOW_S = 60
RATE_LIMIT = 1_000_000  # counted and checked, never reached in a benchmark


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    conversation_id: str
    role: str
    text: str


@dataclass(frozen=True)
class RedisWork:
    """One turn's Redis part: count a question (`frames` empty), or log an answer's frames."""

    conversation_id: str
    frames: Sequence[bytes] = ()


class Durable:
    """The batched PostgreSQL and Redis writes of every turn in this process."""

    def __init__(self, connections: Sequence[asyncpg.Connection], client: redis.Redis, prefix: str):
        self._redis = client
        self._prefix = prefix
        self._logs_with_expiry: set[str] = set()
        # A batch a connection (no pool: nothing to acquire or reset), and two in flight on each side: under
        # load one fills while the other is on its way.
        self._rows = itertools.cycle(
            [RoundTrips(functools.partial(self._insert, conn), "durable-floor-pg") for conn in connections]
        )
        self._work = itertools.cycle([RoundTrips(self._pipeline, "durable-floor-redis") for _ in range(2)])

    # Futures, not coroutines: a turn waits for its PostgreSQL and Redis parts at once without a task each.
    def save(self, row: Row) -> asyncio.Future[None]:
        return next(self._rows).enqueue(row)

    def count_question(self, conversation_id: str) -> asyncio.Future[int]:
        return next(self._work).enqueue(RedisWork(conversation_id))

    def log_frames(self, conversation_id: str, frames: Sequence[bytes]) -> asyncio.Future[int]:
        return next(self._work).enqueue(RedisWork(conversation_id, frames))

    @staticmethod
    async def _insert(conn: asyncpg.Connection, rows: list[Row]) -> list[None]:
        columns = (
            [r.id for r in rows],
            [TENANT] * len(rows),
            [r.conversation_id for r in rows],
            [r.role for r in rows],
            [r.text for r in rows],
        )
        await conn.execute(INSERT, *columns)
        return [None] * len(rows)

    async def _pipeline(self, work: list[RedisWork]) -> list[int]:
        pipe = self._redis.pipeline(transaction=False)
        results_at: list[int | None] = []  # where each item's result is among the replies (None: no result)
        replies = 0
        for item in work:
            if not item.frames:
                key = f"{self._prefix}rate:{{{item.conversation_id}}}"
                # The window starts with the first question (SET NX EX: EXPIRE NX needs Redis 7).
                pipe.set(key, 0, ex=RATE_WINDOW_S, nx=True)
                pipe.incr(key)
                results_at.append(replies + 1)
                replies += 2
                continue
            key = f"{self._prefix}log:{{{item.conversation_id}}}"
            for frame in item.frames:
                pipe.xadd(key, {"f": frame}, maxlen=LOG_MAXLEN, approximate=True)
            replies += len(item.frames)
            if key not in self._logs_with_expiry:
                self._logs_with_expiry.add(key)
                pipe.expire(key, LOG_TTL_S)
                replies += 1
            results_at.append(None)
        answers = await pipe.execute()
        return [0 if at is None else int(answers[at]) for at in results_at]


DURABLE_KEY = web.AppKey("durable", Durable)
TOKENS_KEY = web.AppKey("tokens", int)


def create_app(database_url: str, redis_url: str, tokens: int = 1, prefix: str | None = None) -> web.Application:
    app = web.Application()
    app[TOKENS_KEY] = tokens
    prefix = prefix or f"durable-floor:{uuid.uuid4().hex[:8]}:"

    async def backends(app: web.Application) -> AsyncIterator[None]:
        connections: list[asyncpg.Connection] = []
        client = redis.Redis.from_url(redis_url)
        try:
            for _ in range(2):
                connections.append(await asyncpg.connect(database_url))
            await connections[0].execute(SCHEMA)
            app[DURABLE_KEY] = Durable(connections, client, prefix)
            yield
        finally:
            await client.aclose()
            for conn in connections:
                await conn.close()

    app.cleanup_ctx.append(backends)
    app.router.add_get("/ws", handle_ws)
    return app


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    durable = request.app[DURABLE_KEY]
    tokens = request.app[TOKENS_KEY]

    async def answer(ws: web.WebSocketResponse, frame: dict[str, object], conversation_id: str, seq: int) -> int:
        text = frame.get("text")
        question = Row(uuid.uuid4(), conversation_id, "user", text if isinstance(text, str) else "")
        reply_id = uuid.uuid4()
        frames = answer_frames(frame.get("id"), str(question.id), str(reply_id), conversation_id, seq, tokens)
        encoded = [orjson.dumps(f) for f in frames]
        counted, saved = durable.count_question(conversation_id), durable.save(question)
        await saved
        if await counted > RATE_LIMIT:  # never here; a real server checks before it saves (latency, not CPU)
            await ws.send_str(orjson.dumps({"type": "error", "id": frame.get("id"), "code": "rate_limited"}).decode())
            return seq
        await ws.send_str(encoded[0].decode())  # the ack: the question is durable
        answer = "".join(str(f.get("text", "")) for f in frames[1:-1])
        logged = durable.log_frames(conversation_id, encoded[1:])
        await durable.save(Row(reply_id, conversation_id, "assistant", answer))
        await logged
        for data in encoded[1:]:
            await ws.send_str(data.decode())
        return seq + len(frames)

    return await protocol_loop(request, answer)


async def serve(host: str, port: int, app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        log.warning("durable floor listening on ws://%s:%d/ws", host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The floor plus the least durable work a turn of this product needs (PostgreSQL, Redis)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8098, help="port (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=1, help="token frames per answer (default %(default)s)")
    parser.add_argument("--database-url", required=True, help="PostgreSQL to write to (a table is created)")
    parser.add_argument("--redis-url", required=True, help="Redis for the stream logs and rate counters")
    parser.add_argument("--prefix", help="Redis key prefix (default: a new random one)")
    args = parser.parse_args(argv)
    if args.tokens < 0:
        parser.error("--tokens must not be negative")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    app = create_app(args.database_url, args.redis_url, args.tokens, args.prefix)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, app))
    return 0


if __name__ == "__main__":
    sys.exit(main())
