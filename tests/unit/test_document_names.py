"""The per-replica cache of a course's document names: kept until it expires or a change is announced, and
never refilled with names read before a change that was announced while they were being read."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from storage.documents import Documents
from storage.postgres import Database


class Pool:
    """Answers the names query with `names`, holding each read until `let_go` when `hold` is set."""

    def __init__(self) -> None:
        self.names = ["Slope notes"]
        self.reads = 0
        self.hold = False
        self.reading, self.let_go = asyncio.Event(), asyncio.Event()

    async def fetch(self, query: str, *args: Any) -> list[dict[str, str]]:
        self.reads += 1
        names = list(self.names)
        if self.hold:
            self.reading.set()
            await self.let_go.wait()
        return [{"name": name} for name in names]


def _documents(pool: Pool) -> Documents:
    return Documents(cast(Database, SimpleNamespace(pool=pool)))


async def test_names_are_read_once_until_forgotten() -> None:
    pool = Pool()
    documents = _documents(pool)
    assert await documents.names("school-a", "alg-1") == ["Slope notes"]
    assert await documents.names("school-a", "alg-1") == ["Slope notes"] and pool.reads == 1
    pool.names = ["Gradient notes"]
    documents.forget("school-a", "geo-1")  # another course's change keeps this one's names
    assert await documents.names("school-a", "alg-1") == ["Slope notes"] and pool.reads == 1
    documents.forget("school-a", "alg-1")
    assert await documents.names("school-a", "alg-1") == ["Gradient notes"] and pool.reads == 2
    pool.names = ["Lines"]
    documents.forget_all()
    assert await documents.names("school-a", "alg-1") == ["Lines"] and pool.reads == 3


async def test_names_read_before_an_announced_change_are_not_kept() -> None:
    pool = Pool()
    documents = _documents(pool)
    pool.hold = True
    reading = asyncio.create_task(documents.names("school-a", "alg-1"))
    await asyncio.wait_for(pool.reading.wait(), 5)
    pool.names = ["Gradient notes"]
    documents.forget("school-a", "alg-1")  # the change's announcement, heard while the old names were read
    pool.let_go.set()
    assert await reading == ["Slope notes"]  # this answer was asked before the change reached here
    pool.hold = False
    assert await documents.names("school-a", "alg-1") == ["Gradient notes"] and pool.reads == 2
