"""Fan-out of conversation frames: numbered and logged in Redis, delivered to every joined socket."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from storage.redis_store import RedisStore, splice_seq

log = logging.getLogger(__name__)


class Peer(Protocol):
    """A connected client, as the hub sees it."""

    id: str

    async def send(self, data: bytes) -> bool:
        """Send one frame; False when the peer is gone."""
        ...


class Hub:
    """Which local sockets joined which conversation, and the one way frames reach them."""

    def __init__(self, store: RedisStore):
        self.store = store
        self._members: dict[str, dict[str, Peer]] = {}

    def join(self, conversation_id: str, peer: Peer) -> None:
        self._members.setdefault(conversation_id, {})[peer.id] = peer

    def leave(self, conversation_id: str, peer: Peer) -> None:
        members = self._members.get(conversation_id)
        if members is not None:
            members.pop(peer.id, None)
            if not members:
                del self._members[conversation_id]

    def members(self, conversation_id: str) -> int:
        return len(self._members.get(conversation_id, ()))

    async def deliver(self, conversation_id: str, frames: Sequence[bytes]) -> None:
        """Send already-numbered frames to the conversation's local sockets, in order."""
        members = self._members.get(conversation_id)
        if not members:
            return
        for peer in list(members.values()):
            for frame in frames:
                if not await peer.send(frame):
                    self.leave(conversation_id, peer)
                    break

    async def emit(self, conversation_id: str, frames: Sequence[bytes], floor: int) -> list[bytes]:
        """Number frames with the conversation's next seqs, log them for resume, and deliver them."""
        first = await self.store.emit(conversation_id, frames, floor)
        numbered = [splice_seq(frame, first + i) for i, frame in enumerate(frames)]
        await self.deliver(conversation_id, numbered)
        return numbered

    async def reserve(self, conversation_id: str, floor: int) -> int:
        """Take a seq for a frame that can only be built after a commit."""
        return await self.store.reserve_seq(conversation_id, floor)

    async def emit_reserved(self, conversation_id: str, seq: int, frame: bytes) -> bytes:
        """Log and deliver a frame under a seq taken with `reserve`."""
        numbered = splice_seq(frame, seq)
        await self.store.append(conversation_id, seq, numbered)
        await self.deliver(conversation_id, [numbered])
        return numbered
