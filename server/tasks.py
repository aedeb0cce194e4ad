"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# How long to wait for a cancelled task before cancelling it again.
RECANCEL_S = 0.1


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again for as long as it runs on.

    One cancel is not always enough on Python 3.11: `asyncio.wait_for` returns the result and drops a
    cancellation that arrives just as the call it guards finishes (fixed in 3.12), and redis-py sends
    every command under `wait_for` when a socket timeout is set (its default is 5 s). A task cancelled
    while it talked to Redis could then carry on as if nothing had happened, and stopping waited for it
    for ever: the hang after 10,000 disconnects in docs/benchmarks.md.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task failed before it was stopped", extra={"task": task.get_name()},
                    exc_info=task.exception())
