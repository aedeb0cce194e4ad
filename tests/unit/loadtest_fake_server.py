"""A small in-process protocol v1 server for testing the load tester, with injectable faults.

It keeps every frame of a conversation so a socket can resume (`hello{conversation_id, resume_from}`),
answers one message at a time per conversation (queued in order, acked at once, like the real core)
and keeps generating an answer when the socket that asked for it goes away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web


@dataclass
class Behaviour:
    tokens: int = 5
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    slow_every: int = 0  # every Nth answer waits slow_delay before its first token
    slow_delay: float = 0.0
    lose_token_in_turn: int | None = None  # answer number (1-based) that skips one middle token frame
    lose_last_token_in_turn: int | None = None
    duplicate_token_in_turn: int | None = None
    error_every: int = 0  # every Nth message gets an error frame instead of an ack
    error_code: str = "rate_limited"
    error_retryable: bool | None = None  # the error frame's `retryable`, when not None
    # Every Nth answer fails after `fail_after_tokens` tokens, as server/answers.py ends one: `done` with status
    # failed and the error's code and retryable, then the `error` frame, whose `ref` is the reply id.
    fail_every: int = 0
    fail_code: str = "ai_unavailable"
    fail_retryable: bool = True
    fail_after_tokens: int = 0
    # From this message on (1-based), answers (and their acks too, with hold_ack) are held until the first
    # `history` request, which is answered once they are all out: frames that arrive after the run's drain.
    hold_from_message: int | None = None
    hold_ack: bool = False
    stall_once: float = 0.0  # the first message of the server's life waits this long before anything
    resume: bool = True
    watch_events: bool = False  # False: `watch` gets error bad_request (not implemented)
    redirect_to: str | None = None  # answer the upgrade with 307 to this URL
    reconnect_in_turn: int | None = None  # answer number whose first token is followed by `reconnect`
    reconnect_after_ms: int = 300
    reconnect_every: int = 0  # every Nth answer's first token is followed by `reconnect`
    commit_other_text_in_turn: int | None = None  # answer number whose committed text differs from the stream
    history: bool = True  # offer the `history` frame (welcome.features)
    # The message with this number (1-based, resends included) meets a replica that starts draining: its
    # socket gets `reconnect` first, then the message is refused (`error ai_unavailable`, retryable, as
    # server/chat.py does while draining) or, with drain_acks, acknowledged and answered.
    drain_on_message: int | None = None
    drain_acks: bool = False
    close_reply_delay: float = 0.0  # wait this long before answering a client's close frame


@dataclass
class Conversation:
    id: str
    course_id: str
    seq: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # client id -> ack (with its seq), for resends
    messages: list[dict[str, Any]] = field(default_factory=list)  # committed: {id, role, text, status}
    worker: asyncio.Task[None] | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass
class Counts:
    hellos: int = 0
    resumed: int = 0
    messages: int = 0
    errors_sent: int = 0
    answers_done: int = 0
    done_at: list[float] = field(default_factory=list)  # loop time of each `done`
    closed_at: list[float] = field(default_factory=list)  # loop time each socket was gone
    watches: int = 0
    resends: int = 0
    redirects: int = 0
    reconnects_sent: int = 0
    history_requests: int = 0
    held_frames: int = 0  # frames of held answers (acks included), sent once released
    received: list[tuple[str, str]] = field(default_factory=list)  # (id, text) of every message, resends too


def _subject(token: str) -> str:
    """The token's `sub`, unverified: the fake trusts whoever calls it."""
    payload = token.split(".")[1]
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


class FakeServer:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.counts = Counts()
        self.conversations: dict[str, Conversation] = {}
        self._by_user_course: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        self._answers = itertools.count(1)
        self._stalled = False
        self._release = asyncio.Event()  # held answers go on
        self._holding = 0  # held answers not done yet
        self._held: set[int] = set()  # their reply ids
        self._held_out = asyncio.Event()  # every held answer is done
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conv in self.conversations.values():
            if conv.worker is not None:
                conv.worker.cancel()
        workers = [c.worker for c in self.conversations.values() if c.worker is not None]
        await asyncio.gather(*self._tasks, *workers, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _emit(self, conv: Conversation, frame: dict[str, Any]) -> None:
        async with conv.lock:
            frame["seq"] = conv.next_seq()
            frame["conversation_id"] = conv.id
            data = orjson.dumps(frame).decode()
            conv.log.append((frame["seq"], data))
            await self._send(conv.ws, data)

    @staticmethod
    async def _send(ws: web.WebSocketResponse | None, data: str) -> None:
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(data)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.behaviour.redirect_to is not None:
            self.counts.redirects += 1
            raise web.HTTPTemporaryRedirect(self.behaviour.redirect_to)
        ws = web.WebSocketResponse(autoclose=not self.behaviour.close_reply_delay)
        await ws.prepare(request)
        conv: Conversation | None = None
        try:
            first = await ws.receive()
            if first.type is not WSMsgType.TEXT:
                return ws
            hello = orjson.loads(first.data)
            if hello.get("type") != "hello" or not hello.get("token"):
                await ws.send_str(orjson.dumps({"type": "error", "code": "unauthorized", "message": "no"}).decode())
                await ws.close(code=4401)
                return ws
            self.counts.hellos += 1
            conv = await self._welcome(ws, hello)
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    if msg.type is WSMsgType.CLOSE and not ws.closed:  # not answered yet: close_reply_delay
                        await asyncio.sleep(self.behaviour.close_reply_delay)
                        await ws.close()
                    break
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                if frame.get("type") == "message":
                    await self._on_message(ws, conv, frame)
                elif frame.get("type") == "watch":
                    self._on_watch(ws)
                elif frame.get("type") == "history" and self.behaviour.history:
                    await self._on_history(ws, frame)
        finally:
            self.counts.closed_at.append(asyncio.get_running_loop().time())
            if conv is not None and conv.ws is ws:
                conv.ws = None
        return ws

    async def _welcome(self, ws: web.WebSocketResponse, hello: dict[str, Any]) -> Conversation:
        course = str(hello.get("course_id") or "default")
        user = _subject(str(hello["token"]))
        conv_id = hello.get("conversation_id") or self._by_user_course.get((user, course))
        conv = self.conversations.get(conv_id) if isinstance(conv_id, str) else None
        if conv is None:
            conv = Conversation(f"conv-{next(self._ids)}", course)
            self.conversations[conv.id] = conv
            self._by_user_course[(user, course)] = conv.id
            conv.worker = asyncio.create_task(self._answer_loop(conv))
        raw_resume = hello.get("resume_from")
        resume_from = raw_resume if isinstance(raw_resume, int) else None
        resumed = resume_from is not None and self.behaviour.resume
        async with conv.lock:
            welcome = {
                "type": "welcome",
                "session_id": f"s{next(self._ids)}",
                "user": {"id": user, "role": "student", "tenant": "t", "name": "x"},
                "conversation_id": conv.id,
                "course_id": conv.course_id,
                "history": [],
                "seq": conv.seq,
                "features": ["resume", "history"] if self.behaviour.history else ["resume"],
            }
            if resume_from is not None:
                welcome["resumed"] = resumed
            await ws.send_str(orjson.dumps(welcome).decode())
            if resume_from is not None and resumed:
                self.counts.resumed += 1
                for seq, data in conv.log:
                    if seq > resume_from:
                        await ws.send_str(data)
            conv.ws = ws
        return conv

    async def _on_message(self, ws: web.WebSocketResponse, conv: Conversation, frame: dict[str, Any]) -> None:
        b = self.behaviour
        if b.stall_once and not self._stalled:
            self._stalled = True
            await asyncio.sleep(b.stall_once)
        self.counts.messages += 1
        client_id = str(frame.get("id"))
        self.counts.received.append((client_id, str(frame.get("text"))))
        if client_id in conv.acks:
            # Protocol v1: a resend with the same id gets the same ack (its seq too), to this socket only, and
            # no second answer.
            self.counts.resends += 1
            await self._send(ws, orjson.dumps(conv.acks[client_id]).decode())
            return
        if self.counts.messages == b.drain_on_message:
            self.counts.reconnects_sent += 1
            await self._send(ws, orjson.dumps({"type": "reconnect", "after_ms": b.reconnect_after_ms}).decode())
            if not b.drain_acks:
                self.counts.errors_sent += 1
                refusal = {
                    "type": "error", "code": "ai_unavailable", "message": "the server is restarting",
                    "ref": client_id, "retryable": True, "retry_after": 1.0,
                }
                await self._send(ws, orjson.dumps(refusal).decode())
                return
        if b.error_every and self.counts.messages % b.error_every == 0:
            self.counts.errors_sent += 1
            error = {"type": "error", "code": b.error_code, "message": "injected", "ref": frame.get("id")}
            if b.error_retryable is not None:
                error["retryable"] = b.error_retryable
            await ws.send_str(orjson.dumps(error).decode())
            return
        held = b.hold_from_message is not None and self.counts.messages >= b.hold_from_message
        if held:
            self._holding += 1
            if b.hold_ack:
                task = asyncio.create_task(self._accept_later(conv, client_id, frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
        await self._accept(conv, client_id, frame, held)

    async def _accept_later(self, conv: Conversation, client_id: str, frame: dict[str, Any]) -> None:
        await self._release.wait()
        self.counts.held_frames += 1
        await self._accept(conv, client_id, frame, held=True)

    async def _accept(self, conv: Conversation, client_id: str, frame: dict[str, Any], held: bool) -> None:
        """Commit the question, ack it, and queue its answer."""
        reply_id = next(self._ids) + 1000
        ack = {"type": "ack", "id": client_id, "message_id": reply_id - 1, "reply_id": reply_id}
        conv.acks[client_id] = ack  # _emit adds the seq
        conv.messages.append({"id": reply_id - 1, "role": "user", "text": frame.get("text"), "status": "complete"})
        if held:
            self._held.add(reply_id)
        await self._emit(conv, ack)
        conv.queue.put_nowait(reply_id)

    async def _on_history(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        self.counts.history_requests += 1
        if self._holding:
            # The held answers go out first, on this socket, so they are read before the page.
            self._release.set()
            await self._held_out.wait()
        conv = self.conversations[str(frame["conversation_id"])]
        before = frame.get("before")
        older = [m for m in conv.messages if not isinstance(before, int) or m["id"] < before]
        page = older[-int(frame.get("limit") or 20) :]
        reply = {"type": "history", "conversation_id": conv.id, "messages": page, "has_more": len(older) > len(page)}
        await self._send(ws, orjson.dumps(reply).decode())

    def _on_watch(self, ws: web.WebSocketResponse) -> None:
        self.counts.watches += 1
        task = asyncio.create_task(self._watch(ws))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, ws: web.WebSocketResponse) -> None:
        if not self.behaviour.watch_events:
            error = {"type": "error", "code": "bad_request", "message": "watch is not implemented"}
            await self._send(ws, orjson.dumps(error).decode())
            return
        while not ws.closed:
            await self._send(ws, orjson.dumps({"type": "event", "kind": "message"}).decode())
            await asyncio.sleep(0.05)

    async def _answer_loop(self, conv: Conversation) -> None:
        while True:
            reply_id = await conv.queue.get()
            number = next(self._answers)
            held = reply_id in self._held
            if held:
                await self._release.wait()
            sent = await self._answer(conv, reply_id, number)
            if held:
                self.counts.held_frames += sent
                self._holding -= 1
                if not self._holding:
                    self._held_out.set()

    async def _answer(self, conv: Conversation, reply_id: int, number: int) -> int:
        """Stream one answer and end it; returns how many frames it sent."""
        b = self.behaviour
        sent = 0
        delay = b.first_token_delay
        if b.slow_every and number % b.slow_every == 0:
            delay = b.slow_delay
        if delay:
            await asyncio.sleep(delay)
        fails = bool(b.fail_every) and number % b.fail_every == 0
        offset = 0
        streamed: list[str] = []
        for i in range(b.fail_after_tokens if fails else b.tokens):
            text = f"word{i} "
            streamed.append(text)
            skip = (number == b.lose_token_in_turn and i == b.tokens // 2) or (
                number == b.lose_last_token_in_turn and i == b.tokens - 1
            )
            token = {"type": "token", "reply_id": reply_id, "text": text, "offset": offset}
            if not skip:
                await self._emit(conv, dict(token))
                sent += 1
            every = b.reconnect_every and number % b.reconnect_every == 0
            if (number == b.reconnect_in_turn or every) and i == 0:
                # Not a conversation frame: no seq, not logged, sent to the socket there is now.
                self.counts.reconnects_sent += 1
                reconnect = {"type": "reconnect", "after_ms": b.reconnect_after_ms}
                await self._send(conv.ws, orjson.dumps(reconnect).decode())
            if number == b.duplicate_token_in_turn and i == b.tokens // 2:
                await self._emit(conv, dict(token))
                sent += 1
            offset += len(text)
            if b.token_delay:
                await asyncio.sleep(b.token_delay)
        committed = "".join(streamed)
        if number == b.commit_other_text_in_turn:
            committed = committed.replace("word1", "WORD1")  # same length: only the text check sees it
        status = "failed" if fails else "complete"
        conv.messages.append({"id": reply_id, "role": "assistant", "text": committed, "status": status})
        done: dict[str, Any] = {
            "type": "done",
            "reply_id": reply_id,
            "status": status,
            "length": offset,
            "usage": {"prompt_tokens": 10, "output_tokens": len(streamed)},
        }
        if fails:
            done["error"], done["retryable"] = b.fail_code, b.fail_retryable
        await self._emit(conv, done)
        sent += 1
        self.counts.answers_done += 1
        self.counts.done_at.append(asyncio.get_running_loop().time())
        if fails:
            # Not a conversation frame (no seq), delivered to the sockets there are now, as the real server does.
            self.counts.errors_sent += 1
            error = {
                "type": "error", "code": b.fail_code, "message": "injected", "ref": str(reply_id),
                "retryable": b.fail_retryable,
            }
            await self._send(conv.ws, orjson.dumps(error).decode())
            sent += 1
        return sent
