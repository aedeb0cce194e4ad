"""Fan-out of conversation frames across replicas.

Frames are numbered, logged and published by one Redis script, so every replica sees one order. This
replica delivers its own frames to its sockets directly. Other replicas' frames reach it on its own node
channel: while at least one local socket has joined a conversation, the replica's node id is in that
conversation's nodes set, and the emit script publishes each frame to the node channel of every replica
in the set except the emitter (with ip_hash the set is usually just the emitter, and nothing is
published at all). Teachers' course channels are ordinary channels, subscribed while a teacher watches.
A socket that joins while frames are flowing buffers them until its catch-up (welcome, replay) is sent,
so nothing arrives twice or out of place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub

from storage.redis_store import RedisStore, TokenAdjustment, splice_seq

from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

Numbered = tuple[int, bytes]

# Sent to a socket that missed frames the log no longer holds: reconnect with resume_from, at once.
RESUME_NOW = b'{"type":"reconnect","after_ms":0}'

# How long a watch waits for Redis to confirm its course channel's subscription before the snapshot is
# sent anyway; a confirmation that comes later is followed by a `resync` (events between were missed).
SUBSCRIBE_CONFIRM_S = 5.0

# How often a replica renews its entries in the nodes sets of the conversations it holds.
HOLD_REFRESH_S = 600.0


class Peer(Protocol):
    """A connected client, as the hub sees it."""

    id: str

    async def send(self, data: bytes) -> bool:
        """Send one frame; False when the peer is gone."""
        ...

    async def close(self, code: int, message: str) -> None:
        """Close the connection with a close code (after the closing handshake, or its timeout)."""
        ...


@dataclass(eq=False)
class Member:
    peer: Peer
    buffering: bool = False
    buffer: list[Numbered] = field(default_factory=list)


def _channel(message: dict[str, Any]) -> str:
    channel = message["channel"]
    return channel.decode() if isinstance(channel, bytes) else str(channel)


def event_frame(course_id: str, frame: bytes, conversation_id: str | None = None) -> bytes:
    """Wrap a conversation frame for teachers watching the course."""
    if frame.startswith(b'{"type":"event"'):
        return frame
    if conversation_id is None:
        conversation_id = str(orjson.loads(frame).get("conversation_id", ""))
    return b'{"type":"event","course_id":%b,"kind":"frame","conversation_id":%b,"frame":%b}' % (
        orjson.dumps(course_id), orjson.dumps(conversation_id), frame
    )


def resync_frame(course_id: str) -> bytes:
    """Tell a teacher that course events may have been missed: read the course again."""
    return b'{"type":"resync","course_id":%b}' % orjson.dumps(course_id)


class Hub:
    """Local membership of conversations and course watches, and the one way frames reach sockets."""

    def __init__(self, store: RedisStore, replica_id: str, on_control: Callable[[dict[str, Any]], None] | None = None):
        self.store = store
        self.node = f"{replica_id}-{uuid.uuid4().hex[:6]}".replace(" ", "_")
        self.on_control = on_control
        # Called once the listener is back after losing Redis: what was announced meanwhile was not heard.
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._members: dict[str, dict[str, Member]] = {}
        self._watchers: dict[tuple[str, str], dict[str, Peer]] = {}
        self._node_channel = store.keys.node_channel(self.node)
        # Course channels subscribed for watching teachers: channel -> (tenant id, course id)
        self._channels: dict[str, tuple[str, str]] = {}
        # Conversations whose frames other replicas publish to this node (done once the future is).
        self._held: dict[str, asyncio.Future[None]] = {}
        self._held_refreshed = 0.0
        self._releasing: asyncio.Future[None] | None = None  # a release on its way: holds wait for it
        self._pubsub: PubSub | ClusterPubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._late: set[str] = set()  # course channels whose subscription was not confirmed in time
        self._ready = asyncio.Event()
        # The last seq received from other replicas, per conversation: pub/sub frames at or below it are
        # duplicates of a catch-up, and after a reconnect the log fills in what was published meanwhile.
        self._remote_seq: dict[str, int] = {}
        # The highest seq this replica has seen (emitted, received, or the counter when it began to hold),
        # per conversation it holds: a floor for its emits, so that if Redis loses a conversation's counter
        # the numbering its sockets see still only grows.
        self._seen: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="hub-listener")
        async with asyncio.timeout(10):  # not wait_for, which can drop a cancellation (server/tasks.py)
            await self._ready.wait()

    async def close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        # Other replicas stop publishing to this node, which is going away: each rolling restart would
        # otherwise leave its node id in the nodes sets of every conversation it held, costing a PUBLISH
        # per frame to nobody for as long as the conversation stays active.
        held = [c for c, future in self._held.items() if future.done()]
        self._held.clear()
        try:
            async with asyncio.timeout(5):
                await self.store.release(held, self.node)
        except Exception as exc:  # the sets expire a day after their conversation's last frame
            log.warning("could not release the conversations held at shutdown", extra={"error": repr(exc)})

    async def _listen(self) -> None:
        """Receive other replicas' frames; reconnect with capped backoff, resubscribing everything."""
        delay = 0.1
        while True:
            try:
                self._pubsub = self.store.client.pubsub()
                recovering = self._ready.is_set()
                await self._pubsub.subscribe(self.store.keys.control_channel(), self._node_channel, *self._channels)
                self._ready.set()
                delay = 0.1
                async for message in self._pubsub.listen():
                    try:
                        # Awaited in arrival order, so frames of one channel never overtake each other.
                        await self._on_message(message)
                    except Exception:
                        log.exception("bad pub/sub message")
                    if recovering and message.get("type") == "subscribe" and _channel(message) == self._node_channel:
                        # Not isolated like a message: if it fails (Redis still loading, a stale pooled
                        # connection), the listener reconnects and recovers again, else the frames published
                        # meanwhile would be lost and, after a Redis restart, this node left out of the
                        # nodes sets for as long as HOLD_REFRESH_S.
                        await self._recover_all()
                        recovering = False
                        await self._resync_watchers()
                        if self.on_reconnect is not None:
                            await self.on_reconnect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pub/sub listener lost redis, reconnecting", extra={"error": repr(exc), "delay": delay})
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
                    self._pubsub = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _channel(message)
        if kind == "subscribe":
            waiter = self._subscribed.pop(channel, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            target = self._channels.get(channel)
            if channel in self._late and target is not None:
                # Its watchers got their snapshot before the course's events reached this replica.
                self._late.discard(channel)
                await self._resync_course(*target)
            return
        if kind != "message":
            return
        data: bytes = message["data"]
        if channel == self._node_channel:
            conversation, seq_text, frame = data.split(b" ", 2)
            conversation_id, seq = conversation.decode(), int(seq_text)
            if conversation_id not in self._held:
                return  # published before this node was released: no socket here needs it, nothing to track
            if seq <= self._remote_seq.get(conversation_id, 0):
                return  # already delivered by a catch-up from the log
            self._remote_seq[conversation_id] = seq
            self._saw(conversation_id, seq)
            await self.deliver(conversation_id, [(seq, frame)])
            return
        if channel == self.store.keys.control_channel():
            if self.on_control is not None:
                self.on_control(orjson.loads(data))
            return
        node, _, frame = data.split(b" ", 2)
        target = self._channels.get(channel)
        if target is not None and node.decode() != self.node:  # this replica delivered its own already
            await self.deliver_watchers(target[0], target[1], frame)

    async def _subscribe(self, channel: str, target: tuple[str, str]) -> None:
        self._channels[channel] = target
        if self._pubsub is None:
            return  # the listener subscribes everything in _channels when it reconnects
        loop = asyncio.get_running_loop()
        waiter = self._subscribed.setdefault(channel, loop.create_future())
        await self._pubsub.subscribe(channel)
        try:
            async with asyncio.timeout(SUBSCRIBE_CONFIRM_S):
                await asyncio.shield(waiter)
        except TimeoutError:
            log.warning("subscription not confirmed in time", extra={"channel": channel})
            self._late.add(channel)

    async def _recover_all(self) -> None:
        """After a reconnect: hold every conversation again (Redis may have restarted and lost the sets) and
        deliver what other replicas published while this one was not listening."""
        conversations = list(self._members)
        # A conversation whose socket's own hold failed has no last seq here: its frames start after the seq
        # read before it is held now. (The log's last seq, read after the hold, would count as delivered a
        # frame published in between, and drop its published copy as a duplicate.)
        unheld = [c for c in conversations if c not in self._remote_seq]
        if unheld:
            self._remote_seq.update(zip(unheld, await self.store.seqs(unheld), strict=True))
        await self.store.hold(conversations, self.node)
        for conversation_id in conversations:
            if conversation_id not in self._held:  # its socket's own hold had failed: held from now on
                self._held[conversation_id] = held = asyncio.get_running_loop().create_future()
                held.set_result(None)
            await self._recover(conversation_id)

    async def _resync_watchers(self) -> None:
        """After a reconnect: course events published meanwhile are gone (pub/sub keeps nothing), so every
        watching teacher is told to read its course again. The course channels were subscribed by the same
        SUBSCRIBE as the node channel, whose confirmation came first: every event from now on arrives."""
        self._late.clear()
        for tenant_id, course_id in list(self._watchers):
            await self._resync_course(tenant_id, course_id)
        if self._watchers:
            log.info("teachers told to resync after a pub/sub reconnect", extra={"courses": len(self._watchers)})

    async def _resync_course(self, tenant_id: str, course_id: str) -> None:
        """Tell the course's watchers here to read it again: events of it may have been missed."""
        frame = resync_frame(course_id)
        for peer in list(self._watchers.get((tenant_id, course_id), {}).values()):
            if not await peer.send(frame):
                self.unwatch(tenant_id, course_id, peer)

    async def _recover(self, conversation_id: str) -> None:
        snapshot = await self.store.snapshot(conversation_id)
        last = self._remote_seq.get(conversation_id, snapshot.seq)
        self._remote_seq[conversation_id] = max(last, snapshot.seq)
        if snapshot.seq > last and not snapshot.covers(last):
            # The capped log no longer holds everything published meanwhile: the sockets resume instead,
            # and their welcome's history is authoritative.
            log.info("pub/sub gap beyond the log: sockets told to resume", extra={"conversation_id": conversation_id})
            for member in list(self._members.get(conversation_id, {}).values()):
                await member.peer.send(RESUME_NOW)
            return
        missed = [
            entry
            for entry, node in zip(snapshot.entries, snapshot.nodes, strict=True)
            if entry[0] > last and node != self.node
        ]
        if missed:
            log.info("recovered frames after a pub/sub reconnect", extra={"frames": len(missed)})
            await self.deliver(conversation_id, missed)

    async def prune(self) -> None:
        """Let go of conversations and course channels no local socket needs any more, and renew the hold on
        the others now and then (called periodically)."""
        for channel, target in list(self._channels.items()):
            if target not in self._watchers:
                self._channels.pop(channel, None)
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.unsubscribe(channel)
        unused = [c for c, held in self._held.items() if held.done() and c not in self._members]
        for conversation_id in unused:
            del self._held[conversation_id]
            self._remote_seq.pop(conversation_id, None)
            self._seen.pop(conversation_id, None)
        if unused:
            # A socket joining one of them meanwhile must not have its hold overtaken by this release.
            self._releasing = asyncio.get_running_loop().create_future()
            try:
                await self.store.release(unused, self.node)
            finally:
                self._releasing.set_result(None)
                self._releasing = None
        now = asyncio.get_running_loop().time()
        if now - self._held_refreshed > HOLD_REFRESH_S:
            # The sets expire a day after the conversation's last frame; a socket can stay longer.
            self._held_refreshed = now
            await self.store.hold([c for c, held in self._held.items() if held.done()], self.node)

    # -- conversations --------------------------------------------------------------------------

    async def join(self, conversation_id: str, peer: Peer, *, buffering: bool = False) -> Member:
        members = self._members.setdefault(conversation_id, {})
        member = members.get(peer.id)
        if member is None:
            member = members[peer.id] = Member(peer, buffering=buffering)
        held = self._held.get(conversation_id)
        if held is None:
            held = self._held[conversation_id] = asyncio.get_running_loop().create_future()
            try:
                if self._releasing is not None:
                    await asyncio.shield(self._releasing)
                [seq] = await self.store.hold([conversation_id], self.node)
            except BaseException as exc:
                del self._held[conversation_id]
                held.set_exception(exc)
                held.exception()  # retrieved: later joiners retry instead of failing on it
                raise
            self._remote_seq[conversation_id] = seq
            self._saw(conversation_id, seq)
            held.set_result(None)
        elif not held.done():
            await asyncio.shield(held)  # another socket is joining it right now
        return member

    async def catch_up(self, member: Member, frames: Sequence[Numbered], live_after: int) -> None:
        """Send catch-up frames, then whatever arrived meanwhile with a seq above `live_after`."""
        for _, frame in frames:
            if not await member.peer.send(frame):
                return
        while member.buffer:
            pending, member.buffer = member.buffer, []
            for seq, frame in pending:
                if seq > live_after and not await member.peer.send(frame):
                    return
        member.buffering = False

    def leave(self, conversation_id: str, peer: Peer) -> None:
        members = self._members.get(conversation_id)
        if members is None:
            return
        members.pop(peer.id, None)
        if not members:
            del self._members[conversation_id]

    def members(self, conversation_id: str) -> int:
        return len(self._members.get(conversation_id, ()))

    async def deliver(self, conversation_id: str, frames: Sequence[Numbered]) -> None:
        """Send numbered frames to the conversation's local sockets, in order."""
        members = self._members.get(conversation_id)
        if not members:
            return
        for member in list(members.values()):
            if member.buffering:
                member.buffer.extend(frames)
                continue
            for _, frame in frames:
                if not await member.peer.send(frame):
                    self.leave(conversation_id, member.peer)
                    break

    async def emit(
        self,
        conversation_id: str,
        frames: Sequence[bytes],
        *,
        floor: int = 0,
        course: tuple[str, str] | None = None,
        lease: str | None = None,
        release: str | None = None,
        adjust: TokenAdjustment | None = None,
        answer: tuple[int, str] | None = None,
    ) -> list[Numbered]:
        """Number frames with the conversation's next seqs, log and publish them, deliver them here.

        `lease` / `release` take or drop an answer's lease and `adjust` settles its tokens in the same round
        trip. `answer` = (reply id, step): frames of an answer, which only its owner may emit
        (`AnswerFencedError` for any other replica: nothing is logged or delivered).
        """
        course_channel = self.store.keys.course_channel(*course) if course else ""
        floor = max(floor, self._seen.get(conversation_id, 0))
        first = await self.store.emit(
            conversation_id, frames, floor, self.node, course_channel, lease=lease, release=release, adjust=adjust,
            answer=answer,
        )
        numbered = [(first + i, splice_seq(frame, first + i)) for i, frame in enumerate(frames)]
        if conversation_id in self._held:
            self._saw(conversation_id, numbered[-1][0])
        await self.deliver(conversation_id, numbered)
        if course is not None:
            for _, frame in numbered:
                await self.deliver_watchers(course[0], course[1], frame, conversation_id)
        return numbered

    def _saw(self, conversation_id: str, seq: int) -> None:
        if seq > self._seen.get(conversation_id, 0):
            self._seen[conversation_id] = seq

    def last_seq(self, conversation_id: str) -> int:
        """The highest seq of the conversation this replica has seen (0 when it does not hold it)."""
        return self._seen.get(conversation_id, 0)

    # -- course watchers (teachers) ---------------------------------------------------------------

    async def watch(self, tenant_id: str, course_id: str, peer: Peer) -> None:
        self._watchers.setdefault((tenant_id, course_id), {})[peer.id] = peer
        channel = self.store.keys.course_channel(tenant_id, course_id)
        if channel not in self._channels:
            await self._subscribe(channel, (tenant_id, course_id))

    def unwatch(self, tenant_id: str, course_id: str, peer: Peer) -> None:
        watchers = self._watchers.get((tenant_id, course_id))
        if watchers is None:
            return
        watchers.pop(peer.id, None)
        if not watchers:
            del self._watchers[(tenant_id, course_id)]

    async def deliver_watchers(
        self, tenant_id: str, course_id: str, frame: bytes, conversation_id: str | None = None
    ) -> None:
        watchers = self._watchers.get((tenant_id, course_id))
        if not watchers:
            return
        wrapped = event_frame(course_id, frame, conversation_id)
        for peer in list(watchers.values()):
            if not await peer.send(wrapped):
                self.unwatch(tenant_id, course_id, peer)
