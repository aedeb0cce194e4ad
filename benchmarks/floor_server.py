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


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=64 * 1024)
    await ws.prepare(request)
    tokens = request.app[TOKENS_KEY]
    ids = request.app[IDS_KEY]
    conversation_id: str | None = None
    seq = 0
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        try:
            frame = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(frame, dict):
            continue
        kind = frame.get("type")
        if kind == "hello" and conversation_id is None:
            given = frame.get("conversation_id")
            conversation_id = given if isinstance(given, str) else uuid.uuid4().hex
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
            await ws.send_str(_dumps(welcome))
        elif kind == "message" and conversation_id is not None:
            message_id = next(ids)
            reply_id = next(ids)
            seq += 1
            ack = {
                "type": "ack",
                "id": frame.get("id"),
                "message_id": message_id,
                "reply_id": reply_id,
                "conversation_id": conversation_id,
                "seq": seq,
            }
            await ws.send_str(_dumps(ack))
            offset = 0
            for number in range(tokens):
                text = f"t{number} "
                seq += 1
                token = {
                    "type": "token",
                    "reply_id": reply_id,
                    "conversation_id": conversation_id,
                    "seq": seq,
                    "offset": offset,
                    "text": text,
                }
                await ws.send_str(_dumps(token))
                offset += len(text)
            seq += 1
            done = {
                "type": "done",
                "reply_id": reply_id,
                "conversation_id": conversation_id,
                "seq": seq,
                "status": "complete",
                "length": offset,
                "usage": {"prompt_tokens": 0, "output_tokens": tokens},
            }
            await ws.send_str(_dumps(done))
    return ws


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
