"""The benchmark floor: a bare aiohttp WebSocket server speaking just enough of protocol v1.

No database, no Redis, no AI: `hello` gets a `welcome`, each `message` gets an `ack`, N `token` frames
(with `offset`) and a `done` (with `length`), and nothing else happens. Whatever the real server
measures above this floor is the cost of its own work.

    python benchmarks/floor_server.py --port 8099 --tokens 50
    smartedu loadtest --url ws://127.0.0.1:8099/ws --jwt-secret-file secret.txt ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable

import orjson
import uvloop
from aiohttp import WSMsgType, web

log = logging.getLogger("smartedu.floor")

TOKENS_KEY = web.AppKey("tokens", int)
IDS_KEY = web.AppKey("ids", itertools.count)


def create_app(tokens: int = 50) -> web.Application:
    app = web.Application()
    app[TOKENS_KEY] = tokens
    app[IDS_KEY] = itertools.count(1)
    app.router.add_get("/ws", handle_ws)
    return app


def _dumps(frame: dict[str, object]) -> str:
    return orjson.dumps(frame).decode()


def welcome_frame(frame: dict[str, object], conversation_id: str, seq: int) -> dict[str, object]:
    """The `welcome` to a `hello`: no user data, no history (nothing is kept)."""
    welcome: dict[str, object] = {
        "type": "welcome",
        "session_id": uuid.uuid4().hex,
        "user": {"id": "floor", "role": "student", "tenant": "floor", "name": "Floor"},
        "conversation_id": conversation_id,
        "course_id": frame.get("course_id"),
        "history": [],
        "seq": seq,
    }
    if "resume_from" in frame:
        welcome["resumed"] = False  # nothing is kept, so nothing can be replayed
    return welcome


def answer_frames(
    client_id: object, message_id: object, reply_id: object, conversation_id: str, seq: int, tokens: int
) -> list[dict[str, object]]:
    """What a question gets: its `ack`, `tokens` token frames (with `offset`) and a `done`; seqs from seq + 1."""
    frames: list[dict[str, object]] = [{
        "type": "ack", "id": client_id, "message_id": message_id, "reply_id": reply_id,
        "conversation_id": conversation_id, "seq": seq + 1,
    }]
    offset = 0
    for number in range(tokens):
        text = f"t{number} "
        frames.append({
            "type": "token", "reply_id": reply_id, "conversation_id": conversation_id,
            "seq": seq + 2 + number, "offset": offset, "text": text,
        })
        offset += len(text)
    frames.append({
        "type": "done", "reply_id": reply_id, "conversation_id": conversation_id, "seq": seq + 2 + tokens,
        "status": "complete", "length": offset, "usage": {"prompt_tokens": 0, "output_tokens": tokens},
    })
    return frames


def parse(data: str) -> dict[str, object] | None:
    """A text frame as a JSON object, or None (the floor ignores what it cannot read)."""
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None


# Answers a `message` on a socket whose `hello` was welcomed: (socket, frame, conversation id, last seq) -> the
# last seq sent.
Answer = Callable[[web.WebSocketResponse, dict[str, object], str, int], Awaitable[int]]


async def protocol_loop(request: web.Request, answer: Answer) -> web.WebSocketResponse:
    """A socket's frames: `hello` gets a `welcome`, then each `message` goes to `answer`; the rest is ignored."""
    ws = web.WebSocketResponse(max_msg_size=64 * 1024)
    await ws.prepare(request)
    conversation_id: str | None = None
    seq = 0
    async for msg in ws:
        frame = parse(msg.data) if msg.type is WSMsgType.TEXT else None
        if frame is None:
            continue
        kind = frame.get("type")
        if kind == "hello" and conversation_id is None:
            given = frame.get("conversation_id")
            conversation_id = given if isinstance(given, str) else uuid.uuid4().hex
            await ws.send_str(_dumps(welcome_frame(frame, conversation_id, seq)))
        elif kind == "message" and conversation_id is not None:
            seq = await answer(ws, frame, conversation_id, seq)
    return ws


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    tokens = request.app[TOKENS_KEY]
    ids = request.app[IDS_KEY]

    async def answer(ws: web.WebSocketResponse, frame: dict[str, object], conversation_id: str, seq: int) -> int:
        frames = answer_frames(frame.get("id"), next(ids), next(ids), conversation_id, seq, tokens)
        for reply in frames:
            await ws.send_str(_dumps(reply))
        return seq + len(frames)

    return await protocol_loop(request, answer)


async def serve(host: str, port: int, tokens: int) -> None:
    runner = web.AppRunner(create_app(tokens), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        log.warning("floor server listening on ws://%s:%d/ws with %d tokens per answer", host, port, tokens)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare protocol v1 WebSocket server: the benchmark floor.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8099, help="port (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=50, help="token frames per answer (default %(default)s)")
    args = parser.parse_args(argv)
    if args.tokens < 0:
        parser.error("--tokens must not be negative")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.host, args.port, args.tokens))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
