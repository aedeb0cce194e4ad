"""Teacher fan-out: how late does a teacher watching a course see each token its students see?

N students (one process) join a course and ask questions in a closed loop; one teacher (another
process, so its reading does not queue behind the students') sends `watch {course_id}` and receives
every conversation frame of the course wrapped as `event {kind: "frame"}`. Both sides stamp each token
frame with time.monotonic() (one clock for every process on Linux) keyed by (conversation_id, seq);
the lag of a token is teacher time - student time.

    python benchmarks/fanout.py --url ws://127.0.0.1:8080/ws --jwt-secret-file secret.txt \
        --students 200 --duration 30 --think-time 5 --out fanout.json

`--teacher-url` lets the teacher watch through another replica than the students' (Redis pub/sub).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import check_loopback, percentiles, raise_file_limit
from server.auth import mint_token

Key = tuple[str, int]


@dataclass(frozen=True)
class FanoutConfig:
    student_url: str
    teacher_url: str
    secret: str
    students: int = 200
    duration: float = 30.0
    think_time: float = 5.0
    ramp_rate: float = 100.0
    tenant: str = "demo"
    course: str = "algebra-1"
    drain: float = 10.0
    seed: int = 1


async def _teacher(config: FanoutConfig, run_id: str, control: Connection) -> None:
    token = mint_token(
        config.secret, user=f"fanout-teacher-{run_id}", tenant=config.tenant, role="teacher",
        name="Fanout Teacher", courses=[config.course], ttl_s=3600,
    )
    seen: dict[Key, float] = {}
    duplicates = 0
    kinds: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.ws_connect(
        config.teacher_url, max_msg_size=1 << 20
    ) as ws:
        await ws.send_str(orjson.dumps({"type": "hello", "token": token, "course_id": config.course}).decode())
        welcome = orjson.loads((await ws.receive()).data)
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"teacher got {welcome.get('type')!r} instead of welcome: {welcome}")
        await ws.send_str(orjson.dumps({"type": "watch", "course_id": config.course}).decode())
        while True:
            frame = orjson.loads((await ws.receive()).data)
            if frame.get("type") == "snapshot":
                break
            if frame.get("type") == "error":
                raise RuntimeError(f"watch refused: {frame}")
        control.send(("watching", None))
        stop_at = time.monotonic() + config.duration + config.drain + 30
        while time.monotonic() < stop_at:
            if control.poll():
                break
            try:
                msg = await ws.receive(timeout=0.5)
            except TimeoutError:
                continue
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            now = time.monotonic()
            data: str = msg.data
            if not data.startswith('{"type":"event"'):
                continue
            event = orjson.loads(data)
            kind = str(event.get("kind"))
            kinds[kind] += 1
            inner = event.get("frame")
            if kind != "frame" or not isinstance(inner, dict) or inner.get("type") != "token":
                continue
            key = (str(inner["conversation_id"]), int(inner["seq"]))
            if key in seen:
                duplicates += 1
            else:
                seen[key] = now
    control.send(("seen", {"tokens": [[c, s, t] for (c, s), t in seen.items()], "duplicates": duplicates,
                           "kinds": dict(kinds)}))


async def _student(config: FanoutConfig, index: int, run_id: str, session: aiohttp.ClientSession,
                   start_at: float, seen: dict[Key, float], counts: Counter[str]) -> None:
    rng = random.Random(config.seed * 100_003 + index)
    token = mint_token(
        config.secret, user=f"fanout-student-{run_id}-{index}", tenant=config.tenant, role="student",
        name=f"Fanout Student {index}", courses=[config.course], ttl_s=3600,
    )
    await asyncio.sleep(max(0.0, start_at + index / config.ramp_rate - time.monotonic()))
    end_at = start_at + config.duration
    try:
        ws = await session.ws_connect(config.student_url, max_msg_size=1 << 20)
    except (aiohttp.ClientError, OSError):
        counts["connect_failures"] += 1
        return
    async with ws:
        await ws.send_str(orjson.dumps({"type": "hello", "token": token, "course_id": config.course}).decode())
        welcome = orjson.loads((await ws.receive()).data)
        if welcome.get("type") != "welcome":
            counts["connect_failures"] += 1
            return
        counts["connected"] += 1
        turn = 0
        while True:
            pause = rng.expovariate(1.0 / config.think_time) if config.think_time > 0 else 0.0
            if time.monotonic() + pause >= end_at:
                break
            await asyncio.sleep(pause)
            turn += 1
            question = f"fanout question {turn} from student {index}: what is a prime number?"
            await ws.send_str(orjson.dumps({"type": "message", "id": f"f{run_id}-{turn}", "text": question}).decode())
            counts["questions"] += 1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=60)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    counts["disconnects"] += 1
                    return
                now = time.monotonic()
                frame = orjson.loads(msg.data)
                kind = frame.get("type")
                if kind == "token":
                    seen[(str(frame["conversation_id"]), int(frame["seq"]))] = now
                elif kind == "done":
                    counts["answers"] += 1
                    break
                elif kind == "error":
                    counts["errors"] += 1
                    break


async def _students(config: FanoutConfig, run_id: str, control: Connection) -> None:
    seen: dict[Key, float] = {}
    counts: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start_at = time.monotonic() + 0.2
        tasks = [
            asyncio.create_task(_student(config, i, run_id, session, start_at, seen, counts))
            for i in range(config.students)
        ]
        try:
            async with asyncio.timeout(config.duration + config.drain + 60):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    control.send(("seen", {"tokens": [[c, s, t] for (c, s), t in seen.items()], "counts": dict(counts)}))


def _run_teacher(config: FanoutConfig, run_id: str, control: Connection) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_teacher(config, run_id, control))


def _run_students(config: FanoutConfig, run_id: str, control: Connection) -> None:
    raise_file_limit(config.students + 256)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_students(config, run_id, control))


def _receive(conn: Connection, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no {kind!r} report within {timeout:.0f} s")
    got, payload = conn.recv()
    if got != kind:
        raise RuntimeError(f"expected {kind!r}, got {got!r}")
    return payload


def run_fanout(config: FanoutConfig) -> dict[str, Any]:
    """Run the scenario; returns lag percentiles (ms) and the counts that prove nothing was lost."""
    check_loopback(config.student_url)
    check_loopback(config.teacher_url)
    run_id = os.urandom(4).hex()
    context = mp.get_context("fork")
    teacher_end, teacher_child = context.Pipe()
    students_end, students_child = context.Pipe()
    teacher = context.Process(target=_run_teacher, args=(config, run_id, teacher_child), daemon=True)
    students = context.Process(target=_run_students, args=(config, run_id, students_child), daemon=True)
    started = time.monotonic()
    try:
        teacher.start()
        _receive(teacher_end, "watching", 30)
        students.start()
        student_report = _receive(students_end, "seen", config.duration + config.drain + 90)
        time.sleep(1.0)  # the last frames' copies are still on their way to the teacher
        teacher_end.send(("stop", None))
        teacher_report = _receive(teacher_end, "seen", 30)
    finally:
        for process in (teacher, students):
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        teacher_end.close()
        students_end.close()
    at_student = {(c, s): t for c, s, t in student_report["tokens"]}
    at_teacher = {(c, s): t for c, s, t in teacher_report["tokens"]}
    lags = [(at_teacher[key] - t) * 1000 for key, t in at_student.items() if key in at_teacher]
    missing = sum(1 for key in at_student if key not in at_teacher)
    wall = time.monotonic() - started
    return {
        "students": config.students,
        "duration_s": config.duration,
        "think_time_s": config.think_time,
        "counts": student_report["counts"],
        "student_tokens": len(at_student),
        "teacher_tokens": len(at_teacher),
        "teacher_token_rate_per_s": len(at_teacher) / config.duration,
        "missing_at_teacher": missing,
        "teacher_only": sum(1 for key in at_teacher if key not in at_student),
        "teacher_duplicates": teacher_report["duplicates"],
        "teacher_events": teacher_report["kinds"],
        "lag_ms": percentiles(lags),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Teacher fan-out lag: student token -> teacher's copy.")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="students' endpoint")
    parser.add_argument("--teacher-url", help="teacher's endpoint (default: --url)")
    parser.add_argument("--jwt-secret-file", type=Path, required=True)
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--think-time", type=float, default=5.0, help="mean of the exponential pause (s)")
    parser.add_argument("--ramp-rate", type=float, default=100.0, help="students started per second")
    parser.add_argument("--tenant", default="demo")
    parser.add_argument("--course", default="algebra-1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.students <= 5000 or not 1 <= args.duration <= 3600:
        parser.error("--students must be 1..5000 and --duration 1..3600")
    config = FanoutConfig(
        args.url, args.teacher_url or args.url, args.jwt_secret_file.read_text().strip(), args.students,
        args.duration, args.think_time, args.ramp_rate, args.tenant, args.course, seed=args.seed,
    )
    result = run_fanout(config)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if result["missing_at_teacher"] == 0 and result["teacher_duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
