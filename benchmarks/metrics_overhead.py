"""What the Prometheus instrumentation costs on the token hot path.

The only metric work per token frame is the timing wrapper around RedisStore.emit (one histogram
observation); everything else is counted once per answer. This measures that wrapper against a bare
call, and against the emit round trip it wraps (to a real Redis), on this machine.

    python benchmarks/metrics_overhead.py [--redis-url redis://127.0.0.1:6379/0] [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import orjson


async def _noop() -> None:
    return None


async def _per_call(call: object, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()  # type: ignore[operator]
    return (time.perf_counter() - started) / calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from server.metrics import Metrics
    from storage.keys import Keys
    from storage.redis_store import RedisStore, connect_redis

    metrics = Metrics("bench")
    wrapped = metrics.timed(metrics.redis_ops, "emit", _noop)
    bare, timed = [], []
    for _ in range(args.runs):
        bare.append(await _per_call(_noop, args.calls))
        timed.append(await _per_call(wrapped, args.calls))
    overhead_us = (statistics.median(timed) - statistics.median(bare)) * 1e6

    client = await connect_redis(args.redis_url)
    try:
        store = RedisStore(client, Keys(f"bench:{uuid.uuid4().hex[:8]}:"))
        frame = orjson.dumps({"type": "token", "reply_id": 1, "conversation_id": "c", "offset": 0, "text": "word "})
        conversation = uuid.uuid4().hex

        async def emit() -> None:
            await store.emit(conversation, [frame], 0, "bench")

        emits = [await _per_call(emit, max(1, args.calls // 10)) for _ in range(args.runs)]
        await client.delete(*[k async for k in client.scan_iter(match=f"{store.keys.prefix}*")])
    finally:
        await client.aclose()
    emit_us = statistics.median(emits) * 1e6
    print(f"timing wrapper + histogram observe: {overhead_us:.2f} us per call (median of {args.runs} runs)")
    print(f"emit round trip to Redis:           {emit_us:.1f} us per frame")
    print(f"instrumentation share of a frame:   {100 * overhead_us / emit_us:.1f} %")


if __name__ == "__main__":
    asyncio.run(main())
