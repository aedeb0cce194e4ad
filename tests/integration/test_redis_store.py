"""RedisStore operations that the socket tests only exercise indirectly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from server.settings import Settings
from storage.keys import Keys
from storage.redis_store import (
    BUDGET_TTL_S,
    PRESENCE_KEY_TTLS,
    RedisStore,
    TokenAdjustment,
    connect_redis,
    now_ms,
    pack,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    assert settings.redis_url is not None
    client = await connect_redis(settings.redis_url)
    store = RedisStore(client, Keys(settings.redis_prefix))
    yield store
    await store.close()
    await client.aclose()


async def test_heartbeat_renews_known_sessions_per_course_and_adds_none(store: RedisStore) -> None:
    for course, session in (("alg-1", "s1"), ("alg-1", "s2"), ("geo-1", "s3")):
        await store.announce("school-a", course, session, b'{"session_id": "%b"}' % session.encode(), ttl_ms=50)
    before = now_ms()
    await store.heartbeat([("school-a", "alg-1", "s1"), ("school-a", "alg-1", "s2"),
                           ("school-a", "geo-1", "s3"), ("school-a", "geo-1", "gone")], ttl_ms=60_000)
    alg = dict(await store.client.zrange(store.keys.presence("school-a", "alg-1"), 0, -1, withscores=True))
    geo = dict(await store.client.zrange(store.keys.presence("school-a", "geo-1"), 0, -1, withscores=True))
    assert set(alg) == {b"s1", b"s2"} and set(geo) == {b"s3"}  # "gone" was not announced: not added
    assert all(score >= before + 59_000 for score in (*alg.values(), *geo.values()))


async def test_presence_keys_expire_unless_a_replica_renews_them(store: RedisStore) -> None:
    """A crashed replica never takes its sessions off: the keys of a course no one renews must go."""
    zset, info = store.keys.presence("school-a", "alg-1"), store.keys.presence_info("school-a", "alg-1")
    await store.announce("school-a", "alg-1", "s1", b'{"session_id": "s1"}', ttl_ms=1000)
    assert all(0 < ttl <= PRESENCE_KEY_TTLS * 1000 for ttl in (await store.client.pttl(zset),
                                                              await store.client.pttl(info)))
    await store.heartbeat([("school-a", "alg-1", "s1")], ttl_ms=60_000)
    assert all(ttl > 1000 * PRESENCE_KEY_TTLS for ttl in (await store.client.pttl(zset),
                                                         await store.client.pttl(info)))


async def test_hold_and_release_a_conversation(store: RedisStore) -> None:
    await store.client.set(store.keys.conversation_seq("c-1"), 7)
    assert await store.hold(["c-1", "c-2"], "node-a") == [7, 0]
    await store.hold(["c-1"], "node-b")
    assert await store.client.smembers(store.keys.conversation_nodes("c-1")) == {b"node-a", b"node-b"}
    assert await store.client.ttl(store.keys.conversation_nodes("c-1")) > 3600
    await store.release(["c-1", "c-2"], "node-a")
    assert await store.client.smembers(store.keys.conversation_nodes("c-1")) == {b"node-b"}
    assert not await store.client.exists(store.keys.conversation_nodes("c-2"))


async def test_emits_survive_a_script_flush_and_a_killed_connection(store: RedisStore) -> None:
    first = await store.emit("c-9", [b'{"type":"token","text":"a"}'], 0, "node-a", lease="lease-1")
    assert first == 1
    await store.client.script_flush()  # Redis forgot the script: it is loaded again and the batch re-sent
    assert await store.emit("c-9", [b'{"type":"token","text":"b"}', b'{"type":"done"}'], 0, "node-a") == 2
    await store.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    # The emit connection was killed under it: this one fails with a connection error (or reconnects).
    with contextlib.suppress(RedisConnectionError):
        await store.emit("c-9", [b'{"type":"token","text":"c"}'], 0, "node-a")
    # The next emit goes through; the lease taken with the first one and the seqs are all there.
    assert await store.emit("c-9", [b'{"type":"done"}'], 0, "node-a", release="lease-1") in (4, 5)
    snapshot = await store.snapshot("c-9")
    assert [seq for seq, _ in snapshot.entries][:3] == [1, 2, 3]
    assert snapshot.entries[1][1] == b'{"type":"token","text":"b","seq":2}'
    assert await store.client.zscore(store.keys.leases(), "lease-1") is None
    await store.close()


async def test_side_commands_of_an_emit_run_once_when_redis_lost_its_scripts(store: RedisStore) -> None:
    """The lease and budget commands ride in the emit's round trip; when the scripts come back NOSCRIPT
    only the scripts go again, so a budget adjustment is not counted twice after a Redis restart."""
    keys = store.keys
    adjust = TokenAdjustment("school-a", "u1", "20261127", tenant_delta=-300, user_delta=-200)
    await store.admit("school-a", "u1", "20261127", per_minute=0, limits=(0, 0), amounts=(400, 300))
    await store.emit("c-7", [b'{"type":"token","text":"a"}'], 0, "node-a", lease="lease-2")
    await store.client.script_flush()
    assert await store.emit("c-7", [b'{"type":"done"}'], 0, "node-a", release="lease-2", adjust=adjust) == 2
    assert await store.client.get(keys.tenant_tokens("school-a", "20261127")) == b"100"
    assert await store.client.get(keys.user_tokens("school-a", "u1", "20261127")) == b"100"
    assert await store.client.zscore(keys.leases(), "lease-2") is None
    await store.client.script_flush()
    assert await store.emit("c-8", [b'{"type":"token","text":"b"}'], 0, "node-a", lease="lease-3") == 1
    assert await store.client.zscore(keys.leases(), "lease-3") is not None
    assert [seq for seq, _ in (await store.snapshot("c-7")).entries] == [1, 2]


async def test_admits_arriving_together_each_keep_their_own_outcome(store: RedisStore) -> None:
    async def admit(user: str, per_minute: int = 2) -> tuple[int, float]:
        return await store.admit("school-a", user, "20261127", per_minute=per_minute, limits=(10_000, 700),
                                 amounts=(400, 300))

    outcomes = await asyncio.gather(*(admit("u1") for _ in range(3)), *(admit("u2", 10) for _ in range(3)))
    assert [code for code, _ in outcomes] == [0, 0, 1, 0, 0, 3]  # u1's third: rate limit; u2's third: budget
    assert 0 < outcomes[2][1] <= 60.0
    assert await store.client.get(store.keys.user_tokens("school-a", "u2", "20261127")) == b"600"
    await store.client.script_flush()  # Redis forgot the script: it is loaded again and the batch re-sent
    assert [code for code, _ in await asyncio.gather(admit("u3"), admit("u4"))] == [0, 0]
    await store.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with contextlib.suppress(RedisConnectionError):  # the admit connection was killed under it
        await admit("u5")
    assert (await admit("u6"))[0] == 0
    await store.close()


async def test_a_task_cancelled_while_it_talks_to_redis_is_stopped(store: RedisStore) -> None:
    """redis-py sends under asyncio.wait_for, which on Python 3.11 can drop a cancellation: cancelled in
    the middle of its pipelines, such a task sometimes carried on into its next sleep. cancel_and_wait
    (server/tasks.py) stops it every time."""
    from server.tasks import cancel_and_wait

    conversations = [f"c-{n}" for n in range(1500)]

    async def maintenance() -> None:
        while True:
            await store.hold(conversations, "node-a")
            await store.release(conversations, "node-a")
            await asyncio.sleep(10)

    for delay in (0.0, 0.002, 0.005, 0.01, 0.02, 0.03):
        task = asyncio.create_task(maintenance())
        await asyncio.sleep(delay)
        await asyncio.wait_for(cancel_and_wait(task), timeout=3.0)
        assert task.done()
    await store.close()


async def test_a_redis_that_never_answers_fails_an_admit_at_the_socket_timeout() -> None:
    """The admit and emit connections send without redis-py's per-send wait_for; their round trips are
    bounded by the socket timeout all the same, and fail with an error the socket turns into `internal`."""
    from redis.asyncio import Redis

    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)  # never answers
    port = silent.sockets[0].getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3")
    store = RedisStore(client, Keys("silent:"))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await store.admit("school-a", "u1", "20261127", per_minute=5, limits=(0, 0), amounts=(1, 1))
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await store.close()
        await client.aclose()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_emitted_frames_reach_redis_byte_for_byte(store: RedisStore) -> None:
    """The emit round trip packs its commands itself (hiredis): text outside ASCII, a multi-byte frame and
    numbers arrive exactly as sent, as redis-py's own packing sends them."""
    frame = '{"type":"token","text":"Größe → 2π, 数学 ✓","n":1}'.encode()
    commands = [("SET", "k", 7), ("EVALSHA", "a" * 40, 1, "ключ", -1, frame)]
    assert pack(commands) == b"".join(Connection().pack_commands(commands))
    first = await store.emit("conv-é", [frame, b'{"type":"done"}'], 0, "node-a")
    snapshot = await store.snapshot("conv-é")
    assert [f for _, f in snapshot.entries] == [
        frame[:-1] + b',"seq":%d}' % first, b'{"type":"done","seq":%d}' % (first + 1)
    ]


async def test_conversation_keys_always_expire_and_are_renewed_once_the_log_ran_down(store: RedisStore) -> None:
    """A conversation's four keys get their expiries when the log or the counter is new, and are renewed only
    once the log's has run down by more than a sixtieth of the ttl: a log never outlives its ttl after the
    last frame, and frames in between cost no EXPIRE."""
    keys, ttl_ms = store.keys, store.log_ttl_s * 1000
    store_keys = [keys.conversation_seq("c-5"), keys.conversation_nodes("c-5"), keys.conversation_log("c-5"),
                  keys.conversation_log_start("c-5")]
    await store.hold(["c-5"], "node-a")
    assert await store.emit("c-5", [b'{"type":"ack"}'], 0, "node-a") == 1
    seq_ttl, nodes_ttl, log_ttl, start_ttl = [await store.client.pttl(key) for key in store_keys]
    assert ttl_ms * 24 - 5000 < seq_ttl <= ttl_ms * 24 and ttl_ms * 24 - 5000 < nodes_ttl <= ttl_ms * 24
    assert ttl_ms - 5000 < log_ttl <= ttl_ms and ttl_ms - 5000 < start_ttl <= ttl_ms
    # Within the sixtieth: left as it is (renewing would set it back to the full ttl).
    await store.client.pexpire(keys.conversation_log("c-5"), ttl_ms - 500)
    assert await store.emit("c-5", [b'{"type":"token"}'], 0, "node-a") == 2
    assert await store.client.pttl(keys.conversation_log("c-5")) <= ttl_ms - 500
    # Run down further: all four renewed.
    for key in store_keys:
        await store.client.pexpire(key, 1000 * 60)
    assert await store.emit("c-5", [b'{"type":"done"}'], 0, "node-a") == 3
    assert [await store.client.pttl(key) > ttl_ms - 5000 for key in store_keys] == [True] * 4
    # A counter Redis lost (evicted, deleted) while its log lives on is created again with an expiry, also
    # when the emitter's floor sets it.
    for floor in (0, 10):
        await store.client.delete(keys.conversation_seq("c-5"))
        await store.emit("c-5", [b'{"type":"ack"}'], floor, "node-a")
        assert ttl_ms * 24 - 5000 < await store.client.pttl(keys.conversation_seq("c-5")) <= ttl_ms * 24
    assert await store.client.get(keys.conversation_seq("c-5")) == b"11"
    # A log Redis lost while its counter lives on starts again with its own expiry and start.
    await store.client.delete(keys.conversation_log("c-5"), keys.conversation_log_start("c-5"))
    assert await store.emit("c-5", [b'{"type":"ack"}'], 0, "node-a") == 12
    assert await store.client.get(keys.conversation_log_start("c-5")) == b"12"
    assert ttl_ms - 5000 < await store.client.pttl(keys.conversation_log("c-5")) <= ttl_ms
    assert ttl_ms - 5000 < await store.client.pttl(keys.conversation_log_start("c-5")) <= ttl_ms


async def test_budget_counters_get_their_expiry_once_and_a_settlement_never_creates_one(store: RedisStore) -> None:
    """A day's budget counters get their two days when the day's first message creates them, and later
    messages leave it; a settlement that finds a counter gone (delete-user deleted it, or Redis lost it)
    leaves it gone, and settles the other."""
    keys, day = store.keys, "20261128"
    tenant, user = keys.tenant_tokens("school-b", day), keys.user_tokens("school-b", "u1", day)

    async def admit(limits: tuple[int, int] = (0, 0)) -> int:
        code, _ = await store.admit("school-b", "u1", day, per_minute=0, limits=limits, amounts=(400, 300))
        return code

    assert await admit() == 0
    assert [BUDGET_TTL_S - 5 < await store.client.ttl(key) <= BUDGET_TTL_S for key in (tenant, user)] == [True] * 2
    for key in (tenant, user):
        await store.client.expire(key, 600)
    assert await admit((10_000, 700)) == 0
    assert await admit((10_000, 700)) == 3  # the user's 700: 600 reserved, 300 more would pass it
    assert await store.client.mget(tenant, user) == [b"800", b"600"]
    assert [0 < await store.client.ttl(key) <= 600 for key in (tenant, user)] == [True] * 2
    # Settled after the user's counter was deleted: with the done's emit, or on its own round trip.
    adjust = TokenAdjustment("school-b", "u1", day, tenant_delta=-300, user_delta=-200)
    await store.client.delete(user)
    await store.emit("c-6", [b'{"type":"done"}'], 0, "node-a", adjust=adjust)
    assert await store.client.mget(tenant, user) == [b"500", None]
    await store.adjust_tokens(adjust)
    assert await store.client.mget(tenant, user) == [b"200", None]
    assert 0 < await store.client.ttl(tenant) <= 600
    # A zero delta on a lost counter creates nothing either; one at 0 that exists is kept.
    await store.client.delete(tenant)
    await store.adjust_tokens(TokenAdjustment("school-b", "u1", day, tenant_delta=0, user_delta=0))
    assert await store.client.exists(tenant, user) == 0
    assert await admit() == 0 and await store.client.mget(tenant, user) == [b"400", b"300"]
    await store.adjust_tokens(TokenAdjustment("school-b", "u1", day, tenant_delta=-400, user_delta=-300))
    assert await store.client.mget(tenant, user) == [b"0", b"0"]
    assert [BUDGET_TTL_S - 5 < await store.client.ttl(key) <= BUDGET_TTL_S for key in (tenant, user)] == [True] * 2
