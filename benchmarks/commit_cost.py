"""What committing a turn costs PostgreSQL and the replica, by how many turns are in flight at once.

Each simulated turn is what the chat core commits for a question and its answer: `save_question` (the
question, its placeholder, its history) then `finish_reply` (the answer, its usage row, the seqs), through
`storage.postgres.Database`, the replica's own code. Students work in parallel, each in a conversation of
its own, so with N in flight the group commit can put up to N questions (or answers) in one statement.

Reported per turn: CPU of every PostgreSQL process on this machine (backends, WAL writer, ...; run it on
an otherwise idle machine), CPU of this process (asyncpg and our storage code), and wall time.

    .venv/bin/python benchmarks/commit_cost.py --database-url postgresql://postgres@127.0.0.1/postgres
    .venv/bin/python benchmarks/commit_cost.py --code-dir /tmp/old-checkout ...   # the same, older code

It creates a scratch database next to the one given, and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, read_sample, with_database


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every process named `postgres` on this machine."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):  # a process that ended meanwhile
                if (entry / "comm").read_text().strip() == "postgres":
                    total += read_sample(int(entry.name)).cpu_s
    return total


async def measure(storage: Any, url: str, in_flight: int, turns: int) -> dict[str, float]:
    pool = await storage.connect_pool(url, min_size=2, max_size=10)
    try:
        db = storage.Database(pool)
        await pool.execute("INSERT INTO tenants (id, name) VALUES ('bench', 'Bench') ON CONFLICT DO NOTHING")
        user = await db.upsert_user("bench", f"student-{uuid.uuid4().hex[:8]}", "student", "Student")
        conversations = [await db.create_conversation("bench", user.id, None) for _ in range(in_flight)]
        for conversation in conversations:  # the title and first rows, outside the measurement
            await db.save_question("bench", conversation.id, "warm-up", "warm up", user.id, history=20)

        async def student(conversation_id: str, count: int) -> None:
            for _ in range(count):
                saved = await db.save_question(
                    "bench", conversation_id, uuid.uuid4().hex, "What is a derivative?", user.id, history=20
                )
                await db.finish_reply(
                    "bench", user.id, conversation_id, saved.reply.id, "It measures change. " * 12, "complete",
                    3, None, question=(saved.message.id, 2),
                )

        each = max(1, turns // in_flight)
        pg0, me0, wall0 = postgres_cpu_s(), time.process_time(), time.perf_counter()
        await asyncio.gather(*(student(c.id, each) for c in conversations))
        pg1, me1, wall1 = postgres_cpu_s(), time.process_time(), time.perf_counter()
        done = each * in_flight
        return {
            "in_flight": in_flight,
            "turns": done,
            "postgres_ms": (pg1 - pg0) * 1000 / done,
            "client_ms": (me1 - me0) * 1000 / done,
            "wall_ms": (wall1 - wall0) * 1000 / done,
        }
    finally:
        await pool.close()


async def run(args: argparse.Namespace) -> None:
    code = (args.code_dir or ROOT).resolve()
    sys.path.insert(0, str(code))
    storage = importlib.import_module("storage.postgres")
    admin = await asyncpg.connect(args.database_url)
    name = f"smartedu_commit_cost_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(args.database_url, name)
    try:
        pool = await storage.connect_pool(url, min_size=1, max_size=1)
        await storage.Database(pool).migrate()
        await pool.close()
        print(f"code: {code}; {args.turns} turns per level", flush=True)
        print("in flight | PostgreSQL CPU ms/turn | client CPU ms/turn | wall ms/turn", flush=True)
        for level in args.in_flight:
            result = await measure(storage, url, level, args.turns)
            print(f"{level:9d} | {result['postgres_ms']:22.2f} | {result['client_ms']:18.2f} | "
                  f"{result['wall_ms']:12.2f}", flush=True)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1/postgres",
                        help="a database on this machine's PostgreSQL (its processes' CPU is read from /proc)")
    parser.add_argument("--in-flight", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                        help="comma-separated numbers of turns in flight (default 1,4,16)")
    parser.add_argument("--turns", type=int, default=800, help="turns per level (default 800)")
    parser.add_argument("--code-dir", type=Path, help="measure a copy of the project in this directory instead")
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= 100_000 or not all(1 <= n <= 256 for n in args.in_flight):
        parser.error("--turns must be 1..100000 and --in-flight values 1..256")
    if urlsplit(args.database_url).hostname not in (None, "127.0.0.1", "localhost", "::1"):
        parser.error("--database-url must be on this machine: the CPU of its processes is what is measured")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
