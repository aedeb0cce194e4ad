"""Local fakes of the hosted model APIs, scripted per test, for offline provider tests."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

FOREVER = 3600.0


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake received, kept for assertions."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(slots=True)
class Failure:
    """A scripted error answer: the HTTP status, an optional Retry-After header and JSON body."""

    status: int
    retry_after: str | None = None
    body: dict[str, Any] | None = None  # None: the fake's usual body for the status


@dataclass
class FakeUpstream:
    """What every fake can be told to do, and what it saw; subclasses speak the wire format."""

    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "student", "!"])
    prompt_tokens: int = 42
    first_chunk_delay: float = 0.0
    chunk_delay: float = 0.0
    hang_before_headers: bool = False
    hang_before_first_chunk: bool = False
    drop_after: int | None = None  # abort the connection after sending this many chunks
    end_mid_event_after: int | None = None  # end the body normally halfway through the event after this many
    page: tuple[str, str] | None = None  # (content type, body): answer HTTP 200 with it, as a proxy's page does
    # Before writing the event of this index, wait until `resume` is set (`holding` tells that it waits).
    hold_before_event: int | None = None
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[RecordedRequest] = field(default_factory=list)
    completed: int = 0
    disconnects: int = 0
    base_url: str = ""
    _failures: deque[Failure] = field(default_factory=deque)
    _disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(
        self, status: int, times: int = 1, retry_after: str | None = None, body: dict[str, Any] | None = None
    ) -> None:
        """Answer the next `times` calls with `status` (and Retry-After, and this JSON body, when given)."""
        self._failures.extend(Failure(status, retry_after, body) for _ in range(times))

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def wait_disconnect(self, within: float = 1.0) -> bool:
        """True once a client went away before its stream finished (waits up to `within` seconds)."""
        try:
            async with asyncio.timeout(within):
                await self._disconnected.wait()
        except TimeoutError:
            return False
        return True

    async def record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            body=orjson.loads(raw) if raw else {},
        )
        self.requests.append(recorded)
        return recorded

    def next_failure(self) -> web.Response | None:
        if not self._failures:
            return None
        failure = self._failures.popleft()
        headers = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
        body = failure.body if failure.body is not None else self.error_body(failure.status)
        return web.json_response(body, status=failure.status, headers=headers)

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": {"code": status, "message": f"scripted failure {status}"}}

    def events(self, request: RecordedRequest) -> list[bytes]:
        """The SSE events (already framed) that answer one request; the last marks the end."""
        raise NotImplementedError

    async def handle(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        failure = self.next_failure()
        if failure is not None:
            return failure
        if self.page is not None:
            return web.Response(body=self.page[1].encode(), headers={"Content-Type": self.page[0]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            if self.hang_before_headers:
                await asyncio.sleep(FOREVER)
            await response.prepare(request)
            if self.hang_before_first_chunk:
                await asyncio.sleep(FOREVER)
            events = self.events(recorded)
            if self.end_mid_event_after is not None:
                cut = events[self.end_mid_event_after]
                events = [*events[: self.end_mid_event_after], cut[: len(cut) // 2]]
            for index, event in enumerate(events):
                if index == self.drop_after and request.transport is not None:
                    request.transport.abort()
                    return response
                if index == self.hold_before_event:
                    self.holding.set()
                    await self.resume.wait()
                delay = self.first_chunk_delay if index == 0 else self.chunk_delay
                if delay:
                    await asyncio.sleep(delay)
                await response.write(event)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            # aiohttp cancels the handler (handler_cancellation=True) when the client disconnects.
            self.disconnects += 1
            self._disconnected.set()
            raise
        self.completed += 1
        return response


def sse(payload: dict[str, Any] | str) -> bytes:
    """Frame one server-sent event."""
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\r\n\r\n".encode()


Fake = TypeVar("Fake", bound=FakeUpstream)


@asynccontextmanager
async def serve(fake: Fake, routes: list[web.RouteDef], base_path: str = "") -> AsyncIterator[Fake]:
    """Run `fake` on 127.0.0.1 on a free port; `fake.base_url` points at it."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.base_url = f"http://127.0.0.1:{port}{base_path}"
        yield fake
    finally:
        await runner.cleanup()


@contextmanager
def unresponsive_port() -> Iterator[int]:
    """A local port whose accept queue is full, so a new TCP connect hangs (to exercise connect timeouts)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # more than the backlog: the kernel then drops further SYNs
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
