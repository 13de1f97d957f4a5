"""Stopping background tasks: a loop that swallows its cancellation still stops, and a
task that never stops holds a shutdown up for the deadline only."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.core.tasks import stop_tasks


async def _swallows_first_cancel(calls: list[str]) -> None:
    # Like a client that turns a cancellation into a broken connection and retries:
    # the loop gets a normal result and goes on.
    swallowed = False
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
            calls.append("swallowed")


async def test_a_loop_that_swallowed_one_cancellation_is_cancelled_again() -> None:
    calls: list[str] = []
    task = asyncio.create_task(_swallows_first_cancel(calls), name="loop")
    await asyncio.sleep(0)
    assert await stop_tasks([task], timeout_s=5.0, what="test") is True
    assert task.cancelled()
    assert calls == ["swallowed"]


async def test_a_task_that_never_stops_is_given_up_on_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="proxy.core.tasks"):
        assert await stop_tasks([task], timeout_s=0.3, what="test") is False
    assert 0.3 <= loop.time() - started < 2.0
    assert "tasks still running after 0.3s: stubborn" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait([task])


async def test_finished_failed_and_missing_tasks_are_fine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    done = asyncio.create_task(asyncio.sleep(0), name="done")
    failed = asyncio.create_task(fails(), name="failed")
    await asyncio.wait([done, failed])
    with caplog.at_level(logging.WARNING, logger="proxy.core.tasks"):
        assert await stop_tasks([None, done, failed], timeout_s=1.0, what="test") is True
    assert "task failed had failed: RuntimeError('boom')" in caplog.text
    assert await stop_tasks([], timeout_s=1.0, what="test") is True
