"""Stopping is bounded: a cleanup that never ends is given up on, with the places it waited at logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from server.app import stop


async def never_released(gate: asyncio.Event) -> None:
    await gate.wait()


async def test_a_cleanup_that_hangs_is_given_up_on_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    gate = asyncio.Event()
    reached = asyncio.Event()

    async def stuck(app: web.Application) -> AsyncIterator[None]:
        yield
        reached.set()
        await never_released(gate)

    app = web.Application()
    app.cleanup_ctx.append(stuck)
    runner = web.AppRunner(app)
    await runner.setup()

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="server.app"):
        finished = await stop(runner, deadline_s=0.3)
    elapsed = time.monotonic() - started

    assert finished is False
    assert reached.is_set()
    assert elapsed < 2.0
    [record] = [r for r in caplog.records if "longer than its deadline" in r.getMessage()]
    pending: list[str] = record.__dict__["pending"]
    assert any("never_released" in place for place in pending), pending


async def test_a_prompt_cleanup_runs_to_the_end() -> None:
    torn_down: list[str] = []

    async def resource(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.sleep(0.01)
        torn_down.append("resource")

    app = web.Application()
    app.cleanup_ctx.append(resource)
    runner = web.AppRunner(app)
    await runner.setup()

    assert await stop(runner, deadline_s=5.0) is True
    assert torn_down == ["resource"]


async def test_the_loop_lag_task_stops_when_cancelled_just_as_a_health_check_finishes() -> None:
    """The hang after 10,000 disconnects: stopping cancelled the loop-lag task at the moment its health
    check had finished but had not yet handed back its result. Python 3.11's wait_for then returned the
    result and dropped the cancellation, the task slept on, and stopping awaited it for ever."""
    from server.metrics import Metrics, measure_loop_lag

    task: asyncio.Task[None] | None = None

    async def check() -> None:
        # Scheduled before this coroutine's completion wakes its awaiter: the cancel lands in between.
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)

    task = asyncio.create_task(measure_loop_lag(Metrics("test"), {"postgres": check}))
    done, _ = await asyncio.wait({task}, timeout=3.0)
    assert done, "the cancelled task kept running"
    assert task.cancelled()
