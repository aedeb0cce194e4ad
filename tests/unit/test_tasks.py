"""cancel_and_wait: a background task is stopped even when a cancellation gets lost on its way."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.tasks import cancel_and_wait


async def test_a_task_that_loses_its_first_cancel_is_cancelled_again_until_it_ends() -> None:
    lost = 0

    async def loop_that_loses_a_cancel() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # what Python 3.11's wait_for does to a cancel that lands as its call finishes

    task = asyncio.create_task(loop_that_loses_a_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), timeout=2.0)
    assert lost == 1 and task.cancelled()


async def test_a_task_that_already_failed_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails(), name="failing-loop")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="server.tasks"):
        await cancel_and_wait(task)
    assert [r.task for r in caplog.records] == ["failing-loop"]  # type: ignore[attr-defined]
