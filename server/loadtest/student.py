"""Simulated students and teachers speaking protocol v1, and the run that ramps them up and stops them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from .stats import RunStats
from .target import LoopbackResolver, RedirectRefused, RemoteRefused, refuse_redirects
from .tokens import TokenSource

log = logging.getLogger("smartedu.loadtest")

MAX_STUDENTS = 10_000
MAX_TEACHERS = 1_000
# Open loop: questions per second per process. One process cannot send nearly this many; a higher rate
# (or inf) would only make the schedule fall further behind while it hogs the event loop.
MAX_RATE = 10_000.0
THINK_DISTRIBUTIONS = ("exponential", "uniform", "constant")

_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
_CLOSE_TIMEOUT = 2.0
_ABANDONED_KEPT = 16  # ids of questions given up on during the load, per student, whose frames may still come
_RESENT_KEPT = 256  # ids of resent questions per student whose second ack is still expected
_FAILED_KEPT = 16  # reply ids of failed answers per student whose `error` frame is still expected
_TEXT_KEPT = 5  # assembled answers kept per conversation for the final text check
_CHECK_TIMEOUT = 5.0  # for the history frame of the final text check
_SCHEDULE_BATCH = 256  # questions queued by the open-loop schedule between two yields to the event loop
# Codes of a question the server refused rather than failed to answer: it shed the load (a rate limit, a used-up
# budget, the AI provider down or overloaded, a replica restarting), and asking again later may work. Not with
# `retryable: false` (a misconfigured provider fails every question the same way until staff fix it), and not once
# some of the answer's text came (the student saw a broken answer). Counted as `turns_refused`, not failed.
REFUSAL_CODES = frozenset({"rate_limited", "quota_exceeded", "ai_unavailable"})
_WORDS = (
    "what",
    "why",
    "how",
    "explain",
    "the",
    "a",
    "of",
    "in",
    "prime",
    "number",
    "fraction",
    "equation",
    "derivative",
    "photosynthesis",
    "cell",
    "energy",
    "force",
    "gravity",
    "triangle",
    "angle",
    "verb",
    "poem",
    "history",
    "river",
    "climate",
    "molecule",
    "ratio",
    "area",
    "volume",
    "graph",
    "slope",
    "integral",
    "evidence",
    "theory",
    "example",
    "step",
    "solve",
    "compare",
)


class LoadTestError(Exception):
    """A configuration that cannot run."""


@dataclass(frozen=True)
class ThinkTime:
    """Pause between a `done` and the next question (closed loop)."""

    mean: float
    distribution: str = "exponential"

    def sample(self, rng: random.Random) -> float:
        if self.mean <= 0:
            return 0.0
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean)
        if self.distribution == "uniform":
            return rng.uniform(0.0, 2.0 * self.mean)
        return self.mean


class QuestionPool:
    """The question mix: lines of a file, or generated questions of given lengths (code points)."""

    def __init__(self, questions: Sequence[str]) -> None:
        if not questions:
            raise LoadTestError("the question mix is empty")
        self.questions = tuple(questions)

    @classmethod
    def from_file(cls, path: Path) -> QuestionPool:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LoadTestError(f"cannot read questions file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise LoadTestError(f"questions file {path} is not UTF-8 text") from None
        questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not questions:
            raise LoadTestError(f"questions file {path} holds no question")
        return cls(questions)

    @classmethod
    def generated(cls, lengths: Sequence[int], rng: random.Random, per_length: int = 32) -> QuestionPool:
        questions: list[str] = []
        for length in lengths:
            if length < 1:
                raise LoadTestError("question lengths must be at least 1")
            for _ in range(per_length):
                words: list[str] = []
                size = 0
                while size < length:
                    word = rng.choice(_WORDS)
                    words.append(word)
                    size += len(word) + 1
                text = " ".join(words)[: max(length - 1, 0)].rstrip()
                questions.append((text + "?")[:length] if length > 1 else "?")
        return cls(questions)

    def pick(self, rng: random.Random) -> str:
        return rng.choice(self.questions)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    students: int
    duration: float
    ramp_rate: float
    courses: tuple[str, ...]
    questions: QuestionPool
    student_tokens: TokenSource
    teacher_tokens: TokenSource | None = None
    teachers: int = 0
    rate: float | None = None
    think: ThinkTime = ThinkTime(2.0)
    conversations: int = 1
    turns_per_conversation: int = 5
    drop_probability: float = 0.0
    turn_timeout: float = 60.0
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    auth_in_header: bool = False
    max_msg_size: int = 1 << 20
    compress: bool = False
    ssl: ssl.SSLContext | bool = True
    seed: int | None = None
    interval: float = 1.0
    check_text: float = 1.0  # chance per answer that its text is assembled and compared with the committed one
    allow_remote: bool = False  # else names must resolve to loopback (the URL itself is checked by the CLI)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def validate(self) -> None:
        if not 1 <= self.students <= MAX_STUDENTS:
            raise LoadTestError(f"--students must be between 1 and {MAX_STUDENTS} per load generator process")
        if not 0 <= self.teachers <= MAX_TEACHERS:
            raise LoadTestError(f"--teachers must be between 0 and {MAX_TEACHERS}")
        if self.teachers and self.teacher_tokens is None:
            raise LoadTestError("teachers need tokens: a signing key or --teacher-tokens-file")
        for option, value in (
            ("--duration", self.duration),
            ("--ramp-rate", self.ramp_rate),
            ("--rate", self.rate),
            ("--turn-timeout", self.turn_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--interval", self.interval),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise LoadTestError(f"{option} must be a positive finite number")
        for option, value in (("--drain-timeout", self.drain_timeout), ("--think-time", self.think.mean)):
            if not (math.isfinite(value) and value >= 0):
                raise LoadTestError(f"{option} must be a finite number, not negative")
        if self.rate is not None and self.rate > MAX_RATE:
            raise LoadTestError(f"--rate is capped at {MAX_RATE:,.0f} questions per second per process")
        if not self.courses:
            raise LoadTestError("at least one --course is needed")
        if self.conversations < 1 or self.turns_per_conversation < 1:
            raise LoadTestError("--conversations and --turns-per-conversation must be at least 1")
        if not 0.0 <= self.drop_probability <= 1.0:
            raise LoadTestError("--drop-probability must be between 0 and 1")
        if not 0.0 <= self.check_text <= 1.0:
            raise LoadTestError("--check-text must be between 0 and 1")
        if self.think.distribution not in THINK_DISTRIBUTIONS:
            raise LoadTestError(f"--think-dist must be one of {', '.join(THINK_DISTRIBUTIONS)}")


class RunContext:
    """What every simulated user of one run shares."""

    def __init__(self, config: LoadConfig, session: aiohttp.ClientSession, stats: RunStats) -> None:
        self.config = config
        self.session = session
        self.stats = stats
        self.rng = random.Random(config.seed)
        # Not loop.time(): uvloop caches it per loop iteration at millisecond resolution.
        self.clock: Callable[[], float] = time.monotonic
        self.end_at = stats.started + config.duration
        self.drain_deadline = self.end_at + config.drain_timeout
        self.stop_event = asyncio.Event()
        # Students whose answers are still in flight. The others keep their sockets open until this reaches
        # zero (or the drain deadline), so that a crowd of sockets closing at the end does not slow down
        # the answers still being measured, on the server or in this process.
        self.in_flight = 0
        self.drained = asyncio.Event()
        # Message ids are unique per conversation for the server; a later run may reuse the conversation.
        self.run_id = uuid.uuid4().hex[:8]

    def stopping(self) -> bool:
        return self.stop_event.is_set() or self.clock() >= self.end_at

    def done_draining(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self.stopping():
            self.drained.set()

    async def all_drained(self) -> None:
        """Wait until every student has drained, at most until the drain deadline."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self.drain_deadline - self.clock())):
                await self.drained.wait()


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _dumps(frame: dict[str, object]) -> str:
    return orjson.dumps(frame).decode()


_K = TypeVar("_K")
_V = TypeVar("_V")


def _keep(kept: dict[_K, _V], key: _K, value: _V, limit: int | None) -> None:
    """Remember key (an ordered set, or map, of the newest `limit` keys; all of them when limit is None)."""
    kept[key] = value
    if limit is not None and len(kept) > limit:
        del kept[next(iter(kept))]


def _int_field(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


async def _open_socket(
    ctx: RunContext, token: str, hello: dict[str, object], started: float, record: bool
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """Upgrade, send `hello`, wait for `welcome`; raises ConnectFailed with a short reason."""
    config = ctx.config
    headers: dict[str, str] = {}
    if config.auth_in_header:
        headers["Authorization"] = f"Bearer {token}"
    else:
        hello = {**hello, "token": token}
    ws: aiohttp.ClientWebSocketResponse | None = None
    try:
        async with asyncio.timeout(config.connect_timeout):
            ws = await ctx.session.ws_connect(
                config.url,
                headers=headers,
                max_msg_size=config.max_msg_size,
                compress=15 if config.compress else 0,
                autoping=True,
                ssl=config.ssl,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT),
            )
            upgraded = ctx.clock()
            if record:
                ctx.stats.record("connect", started, upgraded - started, upgraded)
            await ws.send_str(_dumps(hello))
            hello_sent = ctx.clock()
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = orjson.loads(msg.data)
                    if not isinstance(frame, dict):
                        continue
                    kind = frame.get("type")
                    if kind == "welcome":
                        now = ctx.clock()
                        if record:
                            ctx.stats.record("welcome", started, now - hello_sent, now)
                        return ws, frame
                    if kind == "error":
                        code = str(frame.get("code") or "unknown")
                        ctx.stats.error(code, started)
                        raise ConnectFailed(f"error_{code}")
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    close_code = ws.close_code
                    ctx.stats.phase(started).close_codes[str(close_code)] += 1
                    raise ConnectFailed(f"close_{close_code}")
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    raise ConnectFailed("ws_error")
    except ConnectFailed:
        await _close_quietly(ws)
        raise
    except TimeoutError:
        await _close_quietly(ws)
        raise ConnectFailed("timeout") from None
    except aiohttp.WSServerHandshakeError as exc:
        raise ConnectFailed(f"http_{exc.status}") from None
    except RedirectRefused as exc:
        log.debug("redirect refused", extra={"reason": str(exc)})
        raise ConnectFailed("redirect_refused") from None
    except orjson.JSONDecodeError:
        await _close_quietly(ws)
        raise ConnectFailed("bad_frame") from None
    except (aiohttp.ClientError, OSError) as exc:
        await _close_quietly(ws)
        if isinstance(getattr(exc, "os_error", None), RemoteRefused):
            log.debug("remote address refused", extra={"reason": str(exc)})
            raise ConnectFailed("remote_refused") from None
        raise ConnectFailed(type(exc).__name__) from None


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse | None, code: int = 1000) -> None:
    if ws is None or ws.closed:
        return
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await ws.close(code=code)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass


class Turn:
    """One question and its answer; no text is kept, only offsets."""

    __slots__ = (
        "acked",
        "client_id",
        "first_token_at",
        "frontier",
        "interrupted",
        "plan_drop",
        "question",
        "reply_id",
        "t0",
        "text",
    )

    def __init__(self, client_id: str, t0: float) -> None:
        self.client_id = client_id
        self.t0 = t0  # intended send time: latencies count from here
        self.acked = False
        self.reply_id: object = None
        self.first_token_at: float | None = None
        self.frontier = 0  # code points received contiguously from offset 0
        self.plan_drop = False
        self.interrupted = False
        self.question: str | None = None  # fixed at the first send: a resend must say the same
        self.text: list[str] | None = None  # the answer as received, for the sampled text check


class Student:
    """One simulated student: a socket, its reader task, and the turns in flight."""

    __slots__ = (
        "_backoff",
        "_checks",
        "_closing",
        "_dropping",
        "_failed_replies",
        "_history",
        "_late_ids",
        "_late_kept",
        "_late_replies",
        "_lost_at",
        "_moving",
        "_next_turn",
        "_resent",
        "by_id",
        "by_reply",
        "can_check_text",
        "connected",
        "conv_ids",
        "conv_index",
        "conv_turns",
        "ctx",
        "index",
        "last_seq",
        "outbox",
        "reader",
        "reconnect_at",
        "retry_at",
        "token",
        "unbound",
        "wake",
        "ws",
    )

    def __init__(self, ctx: RunContext, index: int) -> None:
        self.ctx = ctx
        self.index = index
        self.token: str | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.connected = False
        self.conv_ids: list[str | None] = [None] * ctx.config.conversations
        self.conv_index = index % ctx.config.conversations
        self.conv_turns = 0
        self.last_seq: int | None = None
        self.by_id: dict[str, Turn] = {}
        self.by_reply: dict[object, Turn] = {}
        self.unbound: deque[Turn] = deque()  # acked without a reply_id: matched to answers in order
        self.outbox: deque[Turn] = deque()
        # Questions given up on (timed out, not resumed, unfinished when the drain ended), by reply id, or by client
        # id while not acknowledged: their frames may still come, late, and are not another answer's. During the
        # load only the newest few are kept; those given up at the end are all kept (the run ends soon after).
        self._late_replies: dict[object, None] = {}
        self._late_ids: dict[str, None] = {}
        self._late_kept: int | None = _ABANDONED_KEPT
        # Failed answers whose `error` frame (ref: the reply id) follows their `done`: reply id -> question time.
        self._failed_replies: dict[str, float] = {}
        # Questions sent again after a resume: the server answers a resend with the first ack again, which
        # may come after the replayed one (or after the answer's `done`). Used as an ordered set.
        self._resent: dict[str, None] = {}
        self.wake = asyncio.Event()
        self.retry_at = 0.0
        self._next_turn = 0
        self._backoff = 0.0
        self._closing = False
        self._dropping = False
        self._moving = False  # the server asked us to reconnect (`reconnect` frame)
        self.reconnect_at = 0.0
        # Answers to compare with the committed text at the end: conversation id -> (reply id, t0, text).
        self._checks: dict[str, deque[tuple[int, float, str]]] = {}
        self._history: asyncio.Future[dict[str, Any]] | None = None
        self.can_check_text = False  # the server offers the `history` frame (welcome.features)
        self._lost_at: float | None = None

    # -- turns -------------------------------------------------------------------------------------

    def new_turn(self, t0: float) -> Turn:
        self._next_turn += 1
        turn = Turn(f"lt{self.ctx.run_id}-{self.index}-{self._next_turn}", t0)
        drop = self.ctx.config.drop_probability
        turn.plan_drop = drop > 0 and self.ctx.rng.random() < drop
        check = self.ctx.config.check_text
        if check >= 1.0 or (check > 0 and self.ctx.rng.random() < check):
            turn.text = []
        return turn

    @property
    def pending(self) -> bool:
        return bool(self.by_id or self.by_reply)

    def _in_flight(self) -> list[Turn]:
        return [*self.by_id.values(), *self.by_reply.values()]

    def _finish(self, turn: Turn) -> None:
        self.by_id.pop(turn.client_id, None)
        if turn.reply_id is not None:
            self.by_reply.pop(turn.reply_id, None)
        self.wake.set()

    def _abandon(self, turn: Turn) -> None:
        if turn.reply_id is not None:
            _keep(self._late_replies, turn.reply_id, None, self._late_kept)
        elif not turn.acked:
            _keep(self._late_ids, turn.client_id, None, self._late_kept)
        self._finish(turn)

    def _unknown_reply(self, reply_id: object, now: float) -> None:
        self.ctx.stats.count("late_frames" if reply_id in self._late_replies else "unexpected_frames", now)

    def _refused(self, turn: Turn, code: str, retryable: object, now: float) -> bool:
        """Count a question the server refused (see REFUSAL_CODES) as such; False when it failed instead."""
        if code not in REFUSAL_CODES or retryable is False or turn.first_token_at is not None:
            return False
        self.ctx.stats.refusal(code, turn.t0)
        if not turn.interrupted:
            self.ctx.stats.record("refused", turn.t0, now - turn.t0, now)
        return True

    def _expire(self, now: float) -> float | None:
        """Fail turns older than the turn timeout; returns when the next one would expire."""
        timeout = self.ctx.config.turn_timeout
        stats = self.ctx.stats
        earliest: float | None = None
        for turn in [*self._in_flight(), *self.outbox]:
            if now - turn.t0 >= timeout:
                self._record_unanswered(turn, now)
                stats.count("timeouts", turn.t0)
                stats.count("turns_failed", turn.t0)
                stats.error("client_timeout", turn.t0)
                self._abandon(turn)
                if turn in self.outbox:
                    self.outbox.remove(turn)
                if turn in self.unbound:
                    self.unbound.remove(turn)
            elif earliest is None or turn.t0 < earliest:
                earliest = turn.t0
        return None if earliest is None else earliest + timeout

    def _record_unanswered(self, turn: Turn, now: float) -> None:
        """A turn given up on (timed out, or unfinished at the end) waited at least until now: its missing
        ack, first token and done go into the histograms at that elapsed time, so that percentiles show
        the wait instead of leaving out the slowest answers."""
        if turn.interrupted:
            return  # a deliberate drop: the delay from there on is ours
        stats = self.ctx.stats
        waited = now - turn.t0
        if not turn.acked:
            stats.record("ack", turn.t0, waited, now)
        if turn.first_token_at is None:
            stats.record("ttft", turn.t0, waited, now)
        stats.record("done", turn.t0, waited, now)

    async def _send_question(self, ws: aiohttp.ClientWebSocketResponse, turn: Turn) -> bool:
        """Send a turn's question, the same text every time; False when the socket broke under us.

        After a failure the reader has not finished with the socket yet (it is closing it after `reconnect`,
        or has yet to see the connection's end): this waits for it. Returning at once made the caller send
        again at once, failing without ever giving the event loop back, so every student of the process (and
        the close the reader waited for) froze until the end of the run."""
        ctx = self.ctx
        if turn.question is None:
            turn.question = ctx.config.questions.pick(ctx.rng)
        try:
            await ws.send_str(_dumps({"type": "message", "id": turn.client_id, "text": turn.question}))
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            await _close_quietly(ws)
            await self._join_reader()
            return False
        return True

    async def _flush_outbox(self) -> None:
        ctx = self.ctx
        while self.outbox and self.connected and self.ws is not None:
            turn = self.outbox[0]
            self.by_id[turn.client_id] = turn  # before sending: the ack may beat send_str's return
            if not await self._send_question(self.ws, turn):
                # Not sent: it stays first in the outbox and goes out on the next socket.
                self.by_id.pop(turn.client_id, None)
                return
            self.outbox.popleft()
            now = ctx.clock()
            ctx.stats.count("turns_sent", turn.t0)
            if ctx.config.open_loop:
                ctx.stats.record("send_lag", turn.t0, now - turn.t0, now)
            self.conv_turns += 1

    # -- frames --------------------------------------------------------------------------------------

    def _turn_for(self, reply_id: object) -> Turn | None:
        turn = self.by_reply.get(reply_id)
        if turn is None and self.unbound and reply_id not in self._late_replies:
            turn = self.unbound.popleft()
            turn.reply_id = reply_id
            self.by_reply[reply_id] = turn
        return turn

    def _on_frame(self, data: str) -> bool:
        """Handle one text frame; returns True when the socket should be dropped now."""
        ctx = self.ctx
        stats = ctx.stats
        now = ctx.clock()
        stats.count("frames", now)
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError:
            stats.count("bad_frames", now)
            return False
        if not isinstance(frame, dict):
            stats.count("bad_frames", now)
            return False
        seq = _int_field(frame, "seq")
        if seq is not None and (self.last_seq is None or seq > self.last_seq):
            self.last_seq = seq
        kind = frame.get("type")
        if kind == "token":
            return self._on_token(frame, now)
        if kind == "ack":
            self._on_ack(frame, now)
        elif kind == "done":
            self._on_done(frame, now)
        elif kind == "error":
            self._on_error(frame, now)
        elif kind == "reconnect":
            return self._on_reconnect(frame, now)
        elif kind == "history":
            if self._history is not None and not self._history.done():
                self._history.set_result(frame)
        elif kind not in ("pong", "event"):
            stats.count("unexpected_frames", now)
        return False

    def _on_ack(self, frame: dict[str, Any], now: float) -> None:
        stats = self.ctx.stats
        client_id = str(frame.get("id"))
        turn = self.by_id.pop(client_id, None)
        if turn is None:
            if client_id in self._late_ids:
                # A question given up on before its ack: its answer's frames are late too.
                stats.count("late_frames", now)
                if (reply_id := frame.get("reply_id")) is not None:
                    _keep(self._late_replies, reply_id, None, self._late_kept)
            elif client_id not in self._resent:
                stats.count("unexpected_frames", now)
            # Else the ack of a resent question that was acknowledged already (by the replay, or by the
            # first of the two acks): the server deduplicated it, and the turn counts once.
            return
        turn.acked = True
        if not turn.interrupted:
            stats.record("ack", turn.t0, now - turn.t0, now)
        reply_id = frame.get("reply_id")
        if reply_id is None:
            stats.count("missing_reply_ids", turn.t0)
            self.unbound.append(turn)
        else:
            turn.reply_id = reply_id
            self.by_reply[reply_id] = turn

    def _on_token(self, frame: dict[str, Any], now: float) -> bool:
        stats = self.ctx.stats
        turn = self._turn_for(frame.get("reply_id"))
        if turn is None:
            self._unknown_reply(frame.get("reply_id"), now)
            return False
        text = frame.get("text")
        size = len(text) if isinstance(text, str) else 0
        stats.count("token_frames", now)
        stats.count("chars", now, size)
        if turn.first_token_at is None:
            turn.first_token_at = now
            if not turn.interrupted:
                stats.record("ttft", turn.t0, now - turn.t0, now)
        offset = _int_field(frame, "offset")
        if offset is None:
            stats.count("missing_offsets", turn.t0)
            offset = turn.frontier
        if turn.text is not None and isinstance(text, str) and offset + size > turn.frontier:
            turn.text.append(text[max(turn.frontier - offset, 0) :])  # a gap (lost text) is left out
        if offset == turn.frontier:
            turn.frontier += size
        elif offset > turn.frontier:
            stats.count("lost_tokens", turn.t0)
            stats.count("lost_chars", turn.t0, offset - turn.frontier)
            turn.frontier = offset + size
        else:
            stats.count("duplicate_tokens", turn.t0)
            stats.count("duplicate_chars", turn.t0, max(min(turn.frontier, offset + size) - offset, 0))
            turn.frontier = max(turn.frontier, offset + size)
        if turn.plan_drop and not self._closing:
            turn.plan_drop = False
            return True
        return False

    def _on_done(self, frame: dict[str, Any], now: float) -> None:
        stats = self.ctx.stats
        turn = self._turn_for(frame.get("reply_id"))
        if turn is None:
            self._unknown_reply(frame.get("reply_id"), now)
            return
        status = str(frame.get("status") or "unknown")
        stats.phase(turn.t0).done_status[status] += 1
        length = _int_field(frame, "length")
        if length is None:
            stats.count("missing_lengths", turn.t0)
        elif turn.frontier < length:
            stats.count("lost_tokens", turn.t0)
            stats.count("lost_chars", turn.t0, length - turn.frontier)
        elif turn.frontier > length:
            stats.count("length_mismatches", turn.t0)
            stats.count("lost_tokens", turn.t0)
        usage = frame.get("usage")
        if isinstance(usage, dict):
            output_tokens = _int_field(usage, "output_tokens")
            if output_tokens:
                stats.count("output_tokens", now, output_tokens)
        stats.count("turns_completed", turn.t0)
        if status == "failed":
            # Its `error` frame follows, with the reply id as `ref`: it belongs to this question's phase.
            _keep(self._failed_replies, str(turn.reply_id), turn.t0, _FAILED_KEPT)
            if self._refused(turn, str(frame.get("error")), frame.get("retryable"), now):
                self._finish(turn)  # a refusal is no answer: not in `done`, the answers per second, the text check
                return
        if not turn.interrupted:
            stats.record("done", turn.t0, now - turn.t0, now)
        self._keep_for_check(turn, frame)
        stats.count("answers", now)  # by arrival, for throughput
        stats.count("turns_ok" if status == "complete" else "turns_failed", turn.t0)
        self._finish(turn)

    def _on_reconnect(self, frame: dict[str, Any], now: float) -> bool:
        """The replica is restarting: close now, reconnect (resuming) after `after_ms`, like the widget."""
        self.ctx.stats.count("reconnect_requests", now)
        after_ms = frame.get("after_ms")
        after = float(after_ms) / 1000.0 if isinstance(after_ms, int | float) and after_ms >= 0 else 1.0
        # A little jitter, as static/chat.js adds, so that a replica's clients do not come back at once.
        self.reconnect_at = now + after + self.ctx.rng.uniform(0.0, min(1.0, after * 0.2 + 0.1))
        if self._closing:
            return False  # closing anyway; the next connect waits all the same
        self._moving = True
        return True

    def _keep_for_check(self, turn: Turn, frame: dict[str, Any]) -> None:
        conversation = frame.get("conversation_id") or self.conv_ids[self.conv_index]
        if turn.text is None or not isinstance(turn.reply_id, int) or not isinstance(conversation, str):
            return
        # The last few of each conversation: one history page holds them all, and memory stays bounded.
        kept = self._checks.setdefault(conversation, deque(maxlen=_TEXT_KEPT))
        kept.append((turn.reply_id, turn.t0, "".join(turn.text)))
        turn.text = None

    async def check_texts(self) -> None:
        """Compare the kept answers with the committed text, through one `history` frame per conversation."""
        stats = self.ctx.stats
        checks, self._checks = self._checks, {}
        for conversation, kept in checks.items():
            page = await self._history_page(conversation, kept) if self.can_check_text else None
            committed = {}
            if page is not None:
                messages = page.get("messages")
                for message in messages if isinstance(messages, list) else []:
                    if isinstance(message, dict) and message.get("role") == "assistant":
                        committed[message.get("id")] = message.get("text")
            for reply_id, t0, text in kept:
                if reply_id not in committed:
                    stats.count("text_unchecked", t0)
                elif committed[reply_id] == text:
                    stats.count("text_checks", t0)
                else:
                    stats.count("text_checks", t0)
                    stats.count("text_mismatches", t0)

    async def _history_page(self, conversation: str, kept: deque[tuple[int, float, str]]) -> dict[str, Any] | None:
        ws = self.ws
        if ws is None or not self.connected:
            return None
        newest = max(reply_id for reply_id, _, _ in kept)
        request = {"type": "history", "conversation_id": conversation, "before": newest + 1, "limit": 100}
        self._history = asyncio.get_running_loop().create_future()
        try:
            await ws.send_str(_dumps(request))
            async with asyncio.timeout(_CHECK_TIMEOUT):
                return await self._history
        except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
            return None
        finally:
            self._history = None

    def _on_error(self, frame: dict[str, Any], now: float) -> None:
        stats = self.ctx.stats
        code = str(frame.get("code") or "unknown")
        ref = frame.get("ref")
        turn = self.by_id.get(ref) if isinstance(ref, str) else None
        if turn is not None:
            stats.error(code, turn.t0)
            if not self._refused(turn, code, frame.get("retryable"), now):
                stats.count("turns_failed", turn.t0)
            self._finish(turn)
        else:
            # The error of a failed answer (after its `done`), or about no question of ours.
            failed_at = self._failed_replies.pop(ref, None) if isinstance(ref, str) else None
            stats.error(code, failed_at if failed_at is not None else now)
        retry_after = frame.get("retry_after")
        if isinstance(retry_after, int | float) and retry_after > 0:
            self.retry_at = max(self.retry_at, now + float(retry_after))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    try:
                        drop = self._on_frame(msg.data)
                    except Exception:
                        # A frame the checks did not foresee must not take the student down.
                        log.exception("frame handling failed", extra={"student": self.index})
                        self.ctx.stats.count("frame_handling_errors", self.ctx.clock())
                        continue
                    if drop:
                        self._dropping = True
                        await _close_quietly(ws, code=1001)
                        break
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self.ctx.stats.count("unexpected_frames", self.ctx.clock())
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    self.ctx.stats.count("ws_errors", self.ctx.clock())
                    break
        except (aiohttp.ClientError, OSError):
            self.ctx.stats.count("ws_errors", self.ctx.clock())
        finally:
            self._on_lost(ws)

    def _on_lost(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self.ws is not ws:
            return
        ctx = self.ctx
        now = ctx.clock()
        self.ws = None
        self.connected = False
        ctx.stats.connected_students -= 1
        if self._moving:
            self._lost_at = now  # the time to the resumed welcome is the `reconnect` metric
        elif self._dropping:
            ctx.stats.count("drops", now)
            for turn in self._in_flight():
                turn.interrupted = True
            self._lost_at = now
        elif not self._closing:
            ctx.stats.count("disconnects", now)
            ctx.stats.phase(now).close_codes[str(ws.close_code)] += 1
            self._lost_at = now
        self._dropping = False
        self._moving = False
        self.wake.set()

    # -- connection -----------------------------------------------------------------------------------

    async def _connect(self) -> bool:
        ctx = self.ctx
        config = ctx.config
        if self.token is None:
            self.token = config.student_tokens.token_for(self.index)
        resume = self.pending
        hello: dict[str, object] = {
            "type": "hello",
            "course_id": config.courses[self.conv_index % len(config.courses)],
        }
        conversation_id = self.conv_ids[self.conv_index]
        if conversation_id is not None:
            hello["conversation_id"] = conversation_id
        resume_from = self.last_seq if resume else None
        if resume_from is not None:
            hello["resume_from"] = resume_from
        started = ctx.clock()
        ctx.stats.count("connect_attempts", started)
        try:
            ws, welcome = await _open_socket(ctx, self.token, hello, started, record=True)
        except ConnectFailed as exc:
            ctx.stats.count("connect_failures", started)
            ctx.stats.phase(started).connect_failures[exc.reason] += 1
            log.debug("connect failed", extra={"student": self.index, "reason": exc.reason})
            return False
        now = ctx.clock()
        ctx.stats.count("connects_ok", started)
        features = welcome.get("features")
        self.can_check_text = isinstance(features, list) and "history" in features
        welcome_conversation = welcome.get("conversation_id")
        if isinstance(welcome_conversation, str):
            self.conv_ids[self.conv_index] = welcome_conversation
        if self._lost_at is not None:
            ctx.stats.record("reconnect", self._lost_at, now - self._lost_at, now)
            self._lost_at = None
        if resume_from is not None and welcome.get("resumed") is True:
            ctx.stats.count("resumes_ok", started)
        else:
            if resume:
                # The answers in flight will not be replayed: not an error, but they cannot be checked.
                ctx.stats.count("resume_misses", started)
                for turn in self._in_flight():
                    ctx.stats.count("turns_abandoned", turn.t0)
                    self._abandon(turn)
                self.by_id.clear()
                self.by_reply.clear()
                self.unbound.clear()
            self.last_seq = _int_field(welcome, "seq")
        # Questions the old socket never saw acknowledged (none after a missed resume: abandoned above), taken
        # before the reader runs, so before any replayed frame.
        unacked = list(self.by_id.values())
        self.ws = ws
        self.connected = True
        ctx.stats.connected_students += 1
        self.reader = asyncio.create_task(self._read(ws), name=f"loadtest-reader-{self.index}")
        await self._resend(ws, unacked)
        return True

    async def _resend(self, ws: aiohttp.ClientWebSocketResponse, turns: list[Turn]) -> None:
        """After a resumed welcome, send every question that got no ack again, same id and text, as the
        widget does. Its refusal may have been lost: a draining replica refuses a question with an `error`
        that arrives after its `reconnect`, while the socket is closing, so it is never read. A question the
        server did take is deduplicated by its id: the first ack again, and no second answer."""
        for turn in turns:
            if turn.client_id not in self.by_id:
                continue  # acknowledged by the replay meanwhile
            # Before sending: the ack may beat send_str's return.
            _keep(self._resent, turn.client_id, None, _RESENT_KEPT)
            if not await self._send_question(ws, turn):
                return  # still unacknowledged: sent again after the next resume
            self.ctx.stats.count("resent", turn.t0)

    async def _connect_until(self, deadline: float, *, draining: bool = False) -> bool:
        """Connect (resuming when answers are in flight) with capped backoff; False at the deadline."""
        ctx = self.ctx

        def limit() -> float:
            # The drain's deadline moves earlier when the drain is stopped.
            return min(deadline, ctx.drain_deadline) if draining else deadline

        while ctx.clock() < min(self.reconnect_at, limit()) and (draining or not ctx.stopping()):
            self.wake.clear()
            await self._wait(min(self.reconnect_at, limit()))  # as long as the server asked
        while ctx.clock() < limit() and (draining or not ctx.stopping()):
            await self._join_reader()
            if await self._connect():
                self._backoff = 0.0
                return True
            self._backoff = min(max(self._backoff * 2.0, _BACKOFF_FIRST), _BACKOFF_MAX)
            if not draining and ctx.stopping():
                return False
            self.wake.clear()  # no await between this and the wait: a stop cannot slip through
            await self._wait(min(ctx.clock() + self._backoff * ctx.rng.uniform(0.5, 1.0), limit()))
        return False

    async def _join_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            await reader

    async def _wait(self, until: float | None) -> None:
        """Sleep until `until` or until something happens (a frame finished a turn, a drop, stop)."""
        if until is None:
            await self.wake.wait()
            return
        remaining = until - self.ctx.clock()
        if remaining <= 0:
            return
        try:
            async with asyncio.timeout(remaining):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _switch_conversation(self) -> None:
        ctx = self.ctx
        await self.close()
        self.conv_index = (self.conv_index + 1) % ctx.config.conversations
        self.conv_turns = 0
        self.last_seq = None
        ctx.stats.count("conversation_switches", ctx.clock())

    def _switch_due(self) -> bool:
        config = self.ctx.config
        return config.conversations > 1 and self.conv_turns >= config.turns_per_conversation and not self.pending

    async def close(self) -> None:
        ws = self.ws
        self._closing = True
        try:
            await _close_quietly(ws)
            await self._join_reader()
        finally:
            self._closing = False

    # -- behaviour --------------------------------------------------------------------------------------

    async def run(self) -> None:
        ctx = self.ctx
        ctx.in_flight += 1
        try:
            try:
                if ctx.config.open_loop:
                    await self._run_open()
                else:
                    await self._run_closed()
                await self._drain()
            finally:
                ctx.done_draining()
            await ctx.all_drained()  # then every socket closes together
            if not ctx.stats.drain_stopped:
                await self.check_texts()  # after the load: the checks do not disturb what was measured
        except Exception:
            # A bug in this tool, not the server's doing: counted (it fails the run), not just logged.
            log.exception("student crashed", extra={"student": self.index})
            self._crashed()
        finally:
            await self.close()

    def _crashed(self) -> None:
        stats = self.ctx.stats
        stats.count("student_crashes", self.ctx.clock())
        for turn in [*self._in_flight(), *self.outbox]:
            stats.count("turns_unfinished", turn.t0)
        self._forget_turns()

    def _forget_turns(self) -> None:
        self.by_id.clear()
        self.by_reply.clear()
        self.unbound.clear()
        self.outbox.clear()

    async def _run_closed(self) -> None:
        ctx = self.ctx
        next_ask = ctx.clock()
        asked = False
        while not ctx.stopping():
            self.wake.clear()
            now = ctx.clock()
            expiry = self._expire(now)
            if not self.connected:
                if not await self._connect_until(ctx.end_at):
                    return
                continue
            if self.outbox:
                await self._flush_outbox()
                continue
            if self.pending:
                await self._wait(expiry)
                continue
            if asked:
                # The answer ended (done, error, timeout or a missed resume): think, then ask again.
                asked = False
                next_ask = max(now + ctx.config.think.sample(ctx.rng), self.retry_at)
                continue
            if self._switch_due():
                await self._switch_conversation()
                continue
            if now < next_ask:
                await self._wait(min(next_ask, ctx.end_at))
                continue
            turn = self.new_turn(now)
            ctx.stats.count("turns_attempted", now)
            self.outbox.append(turn)
            asked = True

    async def _run_open(self) -> None:
        ctx = self.ctx
        while not ctx.stopping():
            self.wake.clear()
            expiry = self._expire(ctx.clock())
            if not self.connected:
                if not await self._connect_until(ctx.end_at):
                    return
                continue
            if self.outbox:
                if self._switch_due():
                    await self._switch_conversation()
                else:
                    await self._flush_outbox()
                continue
            await self._wait(min(expiry, ctx.end_at) if expiry is not None else ctx.end_at)

    async def _drain(self) -> None:
        """After the end: wait for answers in flight, then count what never finished."""
        ctx = self.ctx
        while (self.pending or self.outbox) and ctx.clock() < ctx.drain_deadline:
            self.wake.clear()
            expiry = self._expire(ctx.clock())
            if not self.connected:
                if not await self._connect_until(ctx.drain_deadline, draining=True):
                    break
                continue
            if self.outbox:
                await self._flush_outbox()
                continue
            await self._wait(min(expiry, ctx.drain_deadline) if expiry is not None else ctx.drain_deadline)
        now = ctx.clock()
        for turn in [*self._in_flight(), *self.outbox]:
            self._record_unanswered(turn, now)
            ctx.stats.count("turns_unfinished", turn.t0)
        # The socket stays open a little longer (the others' drain, the text check): frames of the answers still
        # in flight are late, not unexpected. They are all kept: nothing is given up on after this.
        self._late_kept = None
        for turn in self._in_flight():
            self._abandon(turn)
        self._forget_turns()


class Teacher:
    """A teacher watching a course: counts `event` frames and the errors `watch` gets."""

    def __init__(self, ctx: RunContext, index: int) -> None:
        self.ctx = ctx
        self.index = index
        self.course = ctx.config.courses[index % len(ctx.config.courses)]
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def run(self) -> None:
        ctx = self.ctx
        assert ctx.config.teacher_tokens is not None
        token = ctx.config.teacher_tokens.token_for(self.index)
        backoff = 0.0
        try:
            while not ctx.stopping():
                started = ctx.clock()
                ctx.stats.count("teacher_connect_attempts", started)
                try:
                    self.ws, _ = await _open_socket(
                        ctx, token, {"type": "hello", "course_id": self.course}, started, record=False
                    )
                except ConnectFailed as exc:
                    ctx.stats.count("teacher_connect_failures", started)
                    ctx.stats.phase(started).connect_failures[f"teacher_{exc.reason}"] += 1
                    backoff = min(max(backoff * 2.0, _BACKOFF_FIRST), _BACKOFF_MAX)
                    await self._sleep(backoff)
                    continue
                backoff = 0.0
                ctx.stats.connected_teachers += 1
                try:
                    await self._watch(self.ws)
                finally:
                    ctx.stats.connected_teachers -= 1
                if not ctx.stopping():
                    ctx.stats.count("teacher_disconnects", ctx.clock())
        finally:
            await _close_quietly(self.ws)

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.ctx.stop_event.wait()
        except TimeoutError:
            pass

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        stats = self.ctx.stats
        try:
            await ws.send_str(_dumps({"type": "watch", "course_id": self.course}))
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                now = self.ctx.clock()
                try:
                    frame = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    stats.count("bad_frames", now)
                    continue
                if not isinstance(frame, dict):
                    continue
                kind = frame.get("type")
                if kind == "event":
                    stats.count("teacher_events", now)
                elif kind == "error":
                    stats.phase(now).watch_errors[str(frame.get("code") or "unknown")] += 1
                    stats.total["watch_errors"] += 1
        except (aiohttp.ClientError, OSError):
            stats.count("ws_errors", self.ctx.clock())

    async def close(self) -> None:
        await _close_quietly(self.ws)


async def _sleep_or_stop(ctx: RunContext, until: float) -> bool:
    """Sleep until `until`; returns False when the run is stopping first."""
    remaining = until - ctx.clock()
    if remaining > 0:
        try:
            async with asyncio.timeout(remaining):
                await ctx.stop_event.wait()
        except TimeoutError:
            pass
    return not ctx.stopping()


async def _launch(ctx: RunContext, students: list[Student], tasks: list[asyncio.Task[None]]) -> None:
    """Start students at the ramp-up rate."""
    config = ctx.config
    for index in range(config.students):
        if not await _sleep_or_stop(ctx, ctx.stats.started + index / config.ramp_rate):
            return
        student = Student(ctx, index)
        students.append(student)
        ctx.stats.launched_students += 1
        tasks.append(asyncio.create_task(student.run(), name=f"loadtest-student-{index}"))


async def _schedule(ctx: RunContext, students: list[Student]) -> None:
    """Open loop: questions at fixed intended times, whatever the server does (no coordinated omission).

    While students ramp up the rate grows with them, so each launched student sees the same rate.
    """
    config = ctx.config
    assert config.rate is not None
    next_at = ctx.stats.started
    turn_robin = 0
    while next_at < ctx.end_at:
        if not await _sleep_or_stop(ctx, next_at):
            return
        launched = len(students)
        if launched == 0:
            next_at += 0.001
            continue
        # Everything already due goes out now, each with its own intended time; behind schedule, in
        # batches with a yield between them, so that the students, the display and a stop still run.
        queued = 0
        while next_at <= ctx.clock() and next_at < ctx.end_at:
            if queued == _SCHEDULE_BATCH:
                await asyncio.sleep(0)
                if ctx.stopping():
                    return
                queued = 0
            launched = len(students)
            student = students[turn_robin % launched]
            turn_robin += 1
            student.outbox.append(student.new_turn(next_at))
            ctx.stats.count("turns_attempted", next_at)
            student.wake.set()
            next_at += config.students / (config.rate * launched)
            queued += 1


async def _tick(ctx: RunContext, on_tick: Callable[[RunStats, float], None], every: float) -> None:
    while True:
        await asyncio.sleep(every)
        on_tick(ctx.stats, ctx.clock())


async def _cancel_all(tasks: Sequence[asyncio.Task[None]], stats: RunStats) -> None:
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, Exception):
            log.error("load task crashed", exc_info=result, extra={"task": task.get_name()})
            stats.count("task_crashes", time.monotonic())


async def _wait_for_drain(
    ctx: RunContext, students: Sequence[Student], tasks: Sequence[asyncio.Task[None]], stop_wait: asyncio.Task[Any]
) -> None:
    """Wait for the students to drain; a first stop (Ctrl-C) during the drain cuts it short.

    After a stop during the load the drain runs as usual: a second Ctrl-C aborts.
    """
    grace = 2 * _CLOSE_TIMEOUT + 1.0
    checks = _CHECK_TIMEOUT * ctx.config.conversations  # the final text checks, one history frame each
    all_done = asyncio.ensure_future(asyncio.wait(tasks))
    waiters: list[asyncio.Future[Any]] = [all_done] if ctx.stats.stopped_early else [all_done, stop_wait]
    try:
        await asyncio.wait(
            waiters, timeout=ctx.config.drain_timeout + checks + grace, return_when=asyncio.FIRST_COMPLETED
        )
        if all_done.done() or not stop_wait.done() or ctx.stats.stopped_early:
            return
        ctx.stats.drain_stopped = True
        ctx.drain_deadline = ctx.clock()
        ctx.drained.set()
        for student in students:
            student.wake.set()
        await asyncio.wait([all_done], timeout=grace)
    finally:
        all_done.cancel()


async def run_load(
    config: LoadConfig,
    *,
    on_tick: Callable[[RunStats, float], None] | None = None,
    tick_every: float = 0.5,
    stop: asyncio.Event | None = None,
) -> RunStats:
    """Run the load test to its end (duration, then a bounded drain) and return what was measured."""
    config.validate()
    started = time.monotonic()
    stats = RunStats(started, started + config.students / config.ramp_rate, started + config.duration, config.interval)
    # Loopback is enforced where connections are made too: a redirect is never followed (the tokens
    # would go with it), and without --allow-remote a name must resolve to loopback addresses only.
    resolver = None if config.allow_remote else LoopbackResolver()
    connector = aiohttp.TCPConnector(limit=0, ssl=config.ssl, resolver=resolver)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trace_configs=[refuse_redirects()]
    ) as session:
        ctx = RunContext(config, session, stats)
        students: list[Student] = []
        student_tasks: list[asyncio.Task[None]] = []
        teachers = [Teacher(ctx, index) for index in range(config.teachers)]
        helpers: list[asyncio.Task[None]] = [asyncio.create_task(_launch(ctx, students, student_tasks))]
        if config.open_loop:
            helpers.append(asyncio.create_task(_schedule(ctx, students)))
        if on_tick is not None:
            helpers.append(asyncio.create_task(_tick(ctx, on_tick, tick_every)))
        teacher_tasks = [asyncio.create_task(t.run(), name=f"loadtest-teacher-{t.index}") for t in teachers]
        log.info(
            "load test started",
            extra={"students": config.students, "teachers": config.teachers, "duration": config.duration},
        )
        stop = stop or asyncio.Event()
        stop_wait = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stop_wait], timeout=config.duration)
            stats.stopped_early = stop.is_set()
            ctx.end_at = min(ctx.end_at, ctx.clock())
            stats.end_at = ctx.end_at
            ctx.drain_deadline = ctx.end_at + config.drain_timeout
            ctx.stop_event.set()
            if ctx.in_flight <= 0:
                ctx.drained.set()
            for student in students:
                student.wake.set()
            stoppers = 2 if config.open_loop else 1  # the launcher and the schedule: nothing new from here
            await _cancel_all(helpers[:stoppers], stats)
            helpers = helpers[stoppers:]
            if student_tasks:
                await _wait_for_drain(ctx, students, student_tasks, stop_wait)
        finally:
            stop_wait.cancel()
            await _cancel_all([*helpers, *student_tasks], stats)
            for teacher in teachers:
                await teacher.close()
            await _cancel_all(teacher_tasks, stats)
    stats.finished = time.monotonic()
    stats.series.flush()
    if on_tick is not None:
        on_tick(stats, stats.finished)
    log.info("load test finished", extra={"seconds": round(stats.finished - started, 3)})
    return stats
