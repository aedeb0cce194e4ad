"""Capacity: open N authenticated, idle WebSockets against one replica and measure what they cost it.

A lean client on purpose: a few asyncio processes speaking just enough WebSocket (RFC 6455) to upgrade,
send `hello`, wait for `welcome`, answer pings and close. aiohttp's client costs tens of kilobytes and
real CPU per socket; with the server, PostgreSQL, Redis and the generator on the same two cores, a
heavy generator would measure itself, not the server.

    python benchmarks/idle_sockets.py --url ws://127.0.0.1:8080/ws --jwt-secret-file secret.txt \
        --students 10000 --rate 250 --server-pid 12345 --out idle.json

Students connect on an open-loop schedule (student i at i / rate s), spread over `--procs` processes.
The server's RSS is read from /proc before the ramp and after every socket got its `welcome` and the
process settled; (after - before) / connected is the memory one idle student costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ProcessSample, check_loopback, percentiles, raise_file_limit, read_sample
from server.auth import mint_token

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA


def _mask(payload: bytes) -> bytes:
    """Mask a client frame's payload (RFC 6455 §5.3) with a fresh key; returns key + masked payload."""
    key = os.urandom(4)
    size = len(payload)
    if size == 0:
        return key
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return key + masked


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + _mask(payload)


class LeanSocket(asyncio.Protocol):
    """One idle student: upgrade, hello, welcome, then only pings until closed."""

    def __init__(self, host: str, path: str, hello: bytes, on_welcome: asyncio.Future[bytes]):
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.hello = hello
        self.welcome = on_welcome
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hello_sent = 0.0
        self.buffer = bytearray()
        self.open = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            error = self._check_upgrade(head)
            if error is not None:
                self._fail(error)
                return
            self.open = True
            self.upgraded.set_result(None)
            assert self.transport is not None
            self.hello_sent = time.monotonic()
            self.transport.write(client_frame(_OP_TEXT, self.hello))
        self._parse_frames()

    def _check_upgrade(self, head: str) -> str | None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            return f"http_{parts[1] if len(parts) > 1 else 'bad'}"
        expected = base64.b64encode(hashlib.sha1(self.key + _GUID).digest()).decode()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                return None if value.strip() == expected else "bad_accept"
        return "no_accept"

    def _parse_frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode, size, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    return
                size, start = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                if len(buffer) < 10:
                    return
                size, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + size:
                return
            payload = bytes(buffer[start : start + size])
            del buffer[: start + size]
            self._on_frame(opcode, payload)

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == _OP_TEXT:
            if self.welcome.done():
                return
            if payload.startswith(b'{"type":"welcome"'):
                self.welcome.set_result(payload)
            elif payload.startswith(b'{"type":"error"'):
                code = orjson.loads(payload).get("code", "unknown")
                self.welcome.set_exception(ConnectionError(f"error_{code}"))
        elif opcode == _OP_PING:
            self.transport.write(client_frame(_OP_PONG, payload))
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.welcome.done():
                self.welcome.set_exception(ConnectionError(f"close_{code}"))
            with contextlib.suppress(Exception):
                self.transport.write(client_frame(_OP_CLOSE, payload[:2]))
            self.transport.close()

    def _fail(self, reason: str) -> None:
        for future in (self.upgraded, self.welcome):
            if not future.done():
                future.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection_lost")
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(client_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.closed
        self.transport.close()


@dataclass
class WorkerResult:
    connected: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    connect_ms: list[float] = field(default_factory=list)
    welcome_ms: list[float] = field(default_factory=list)
    lost_while_idle: int = 0


@dataclass(frozen=True)
class WorkerPlan:
    url: str
    secret: str
    tenant: str
    course: str
    indices: tuple[int, ...]
    start_at: float  # time.monotonic(), shared by every process on Linux
    rate: float
    timeout: float
    run_id: str


async def _open_one(plan: WorkerPlan, index: int, token: str, result: WorkerResult) -> LeanSocket | None:
    parts = urlsplit(plan.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    hello = orjson.dumps({"type": "hello", "token": token, "course_id": plan.course})
    welcome: asyncio.Future[bytes] = loop.create_future()
    due = plan.start_at + index / plan.rate
    await asyncio.sleep(max(0.0, due - time.monotonic()))
    started = time.monotonic()
    protocol: LeanSocket | None = None
    try:
        async with asyncio.timeout(plan.timeout):
            _, protocol = await loop.create_connection(
                lambda: LeanSocket(f"{host}:{port}", parts.path or "/ws", hello, welcome), host, port
            )
            await protocol.upgraded
            upgraded = time.monotonic()
            await welcome
            done = time.monotonic()
    except TimeoutError:
        result.failures["timeout"] += 1
    except (ConnectionError, OSError) as exc:
        result.failures[str(exc) if isinstance(exc, ConnectionError) and str(exc) else type(exc).__name__] += 1
    else:
        assert protocol is not None
        result.connected += 1
        result.connect_ms.append((upgraded - started) * 1000)
        result.welcome_ms.append((done - protocol.hello_sent) * 1000)
        return protocol
    if protocol is not None and protocol.transport is not None:
        protocol.transport.close()
    return None


async def _worker_main(plan: WorkerPlan, control: Connection) -> None:
    tokens = {
        i: mint_token(
            plan.secret, user=f"idle-{plan.run_id}-{i}", tenant=plan.tenant, role="student",
            name=f"Idle Student {i}", courses=[plan.course], ttl_s=3600,
        )
        for i in plan.indices
    }
    result = WorkerResult()
    sockets = await asyncio.gather(*(_open_one(plan, i, tokens[i], result) for i in plan.indices))
    alive = [s for s in sockets if s is not None]
    control.send(("ramped", _result_dict(result)))
    loop = asyncio.get_running_loop()
    # Hold until the parent says close (a blocking read, so off the loop).
    await loop.run_in_executor(None, control.recv)
    result.lost_while_idle = sum(1 for s in alive if s.closed.done())
    await asyncio.gather(*(s.close() for s in alive))
    control.send(("closed", _result_dict(result)))


def _result_dict(result: WorkerResult) -> dict[str, Any]:
    return {
        "connected": result.connected,
        "failures": dict(result.failures),
        "connect_ms": result.connect_ms,
        "welcome_ms": result.welcome_ms,
        "lost_while_idle": result.lost_while_idle,
    }


def _worker(plan: WorkerPlan, control: Connection, files: int) -> None:
    raise_file_limit(files)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_worker_main(plan, control))


@dataclass(frozen=True)
class IdleConfig:
    url: str
    secret: str
    students: int
    rate: float
    procs: int = 2
    tenant: str = "demo"
    course: str = "algebra-1"
    timeout: float = 30.0
    settle: float = 5.0
    hold: float = 0.0


def run_idle(config: IdleConfig, server_pid: int | None) -> dict[str, Any]:
    """Ramp `students` idle sockets up, measure the server, close them; returns the results."""
    check_loopback(config.url)
    per_proc = -(-config.students // config.procs)
    raise_file_limit(per_proc + 256)
    before: ProcessSample | None = read_sample(server_pid) if server_pid else None
    start_at = time.monotonic() + 1.0 + 0.00003 * per_proc  # after every worker minted its tokens
    run_id = os.urandom(4).hex()
    context = mp.get_context("fork")
    workers: list[tuple[Any, Connection]] = []
    results: list[dict[str, Any]] = []
    try:
        for w in range(config.procs):
            parent_end, child_end = context.Pipe()
            plan = WorkerPlan(
                config.url, config.secret, config.tenant, config.course,
                tuple(range(w, config.students, config.procs)), start_at, config.rate, config.timeout, run_id,
            )
            process = context.Process(target=_worker, args=(plan, child_end, per_proc + 256), daemon=True)
            process.start()
            workers.append((process, parent_end))
        ramped = [_expect(conn, "ramped", config.students / config.rate + config.timeout + 60) for _, conn in workers]
        ramp_end = time.monotonic()
        during: ProcessSample | None = read_sample(server_pid) if server_pid else None
        time.sleep(config.settle)
        after: ProcessSample | None = read_sample(server_pid) if server_pid else None
        if config.hold > 0:
            time.sleep(config.hold)
        held: ProcessSample | None = read_sample(server_pid) if server_pid else None
        for _, conn in workers:
            conn.send("close")
        results = [_expect(conn, "closed", 60) for _, conn in workers]
    finally:
        for process, conn in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            conn.close()
    connected = sum(r["connected"] for r in ramped)
    failures: Counter[str] = Counter()
    for r in ramped:
        failures.update(r["failures"])
    out: dict[str, Any] = {
        "students": config.students,
        "rate": config.rate,
        "procs": config.procs,
        "connected": connected,
        "failures": dict(failures),
        "failed": sum(failures.values()),
        "ramp_s": ramp_end - start_at,
        "connect_ms": percentiles([x for r in ramped for x in r["connect_ms"]]),
        "welcome_ms": percentiles([x for r in ramped for x in r["welcome_ms"]]),
        "lost_while_idle": sum(r["lost_while_idle"] for r in results),
    }
    if before is not None and after is not None and during is not None and held is not None:
        out["server"] = {
            "rss_before_kb": before.rss_kb,
            "rss_after_kb": after.rss_kb,
            "rss_held_kb": held.rss_kb,
            "rss_hwm_kb": held.hwm_kb,
            "fds_before": before.fds,
            "fds_after": after.fds,
            "cpu_s_ramp": during.cpu_s - before.cpu_s,
            "cpu_cores_ramp": (during.cpu_s - before.cpu_s) / max(during.at - before.at, 1e-9),
            "rss_per_connection_kb": (after.rss_kb - before.rss_kb) / connected if connected else None,
        }
    return out


def _expect(conn: Connection, kind: str, timeout: float) -> dict[str, Any]:
    if not conn.poll(timeout):
        raise TimeoutError(f"a load process did not report {kind!r} within {timeout:.0f} s")
    got, payload = conn.recv()
    if got != kind:
        raise RuntimeError(f"a load process reported {got!r}, expected {kind!r}")
    result: dict[str, Any] = payload
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Open N idle authenticated sockets and measure the server's RSS.")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--jwt-secret-file", type=Path, required=True)
    parser.add_argument("--students", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="connects per second (open loop)")
    parser.add_argument("--procs", type=int, default=2, help="load processes")
    parser.add_argument("--tenant", default="demo")
    parser.add_argument("--course", default="algebra-1")
    parser.add_argument("--timeout", type=float, default=30.0, help="upgrade + welcome timeout per socket")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between the last welcome and RSS 'after'")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep the sockets open afterwards")
    parser.add_argument("--server-pid", type=int, help="read this process's RSS and CPU from /proc")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.students <= 50_000 or args.rate <= 0 or not 1 <= args.procs <= 16:
        parser.error("--students must be 1..50000, --rate positive, --procs 1..16")
    config = IdleConfig(
        args.url, args.jwt_secret_file.read_text().strip(), args.students, args.rate, args.procs,
        args.tenant, args.course, args.timeout, args.settle, args.hold,
    )
    result = run_idle(config, args.server_pid)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
