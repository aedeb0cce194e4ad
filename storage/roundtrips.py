"""Sharing round trips: what is submitted while one batch is on its way goes together in the next one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class RoundTrips(Generic[T, R]):
    """Runs `run` on batches of submitted items, one batch at a time, until nothing is waiting.

    A lone item goes at once; under load, items queue while the previous batch is in flight, so a busy
    process pays one round trip for many items instead of one each. `run` returns one result per item; a
    result that is an exception fails only its own item, and if `run` raises, every item of that batch
    gets the exception.
    """

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]], name: str, limit: int | None = None
    ):
        self._run = run
        self._name = name
        self._limit = limit  # at most this many items a batch (the rest wait for the next one)
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue `item` and return the future of its result (several can be awaited without a task each)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=self._name)
        return future

    async def _drain(self) -> None:
        while self._queued:
            cut = len(self._queued) if self._limit is None else self._limit
            batch, self._queued = self._queued[:cut], self._queued[cut:]
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def wait(self) -> None:
        """Wait until what has been submitted so far is done (its submitters are waiting for it)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
