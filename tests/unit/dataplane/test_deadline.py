"""``Deadline`` (proxy/dataplane/deadline.py) on a real event loop: one timer, re-armed."""

from __future__ import annotations

import asyncio

from proxy.dataplane.deadline import Deadline


async def test_it_fires_once_at_the_time_last_armed_later_or_earlier() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop)
    fired: list[tuple[str, float]] = []
    done: asyncio.Future[None] = loop.create_future()

    def called(name: str) -> None:
        fired.append((name, loop.time()))
        if not done.done():
            done.set_result(None)

    start = loop.time()
    deadline.arm(0.02, lambda: called("first"))
    deadline.arm(0.06, lambda: called("later"))  # the set timer fires early, sets itself
    await done
    [(name, at)] = fired
    assert name == "later"
    assert at >= start + 0.06 - 0.001  # uvloop's millisecond ticks

    done = loop.create_future()
    start = loop.time()
    deadline.arm(0.5, lambda: called("far"))
    deadline.arm(0.01, lambda: called("near"))  # earlier than the timer set: a new one
    await done
    assert [name for name, _ in fired] == ["later", "near"]
    assert fired[-1][1] < start + 0.5


async def test_disarmed_or_cancelled_it_calls_nothing() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop)
    calls: list[str] = []
    deadline.arm(0.01, lambda: calls.append("disarmed"))
    deadline.disarm()
    other = Deadline(loop)
    done: asyncio.Future[None] = loop.create_future()
    other.arm(0.04, lambda: done.set_result(None))  # due after the disarmed one
    await done
    assert calls == []

    deadline.arm(0.01, lambda: calls.append("cancelled"))
    deadline.cancel()
    assert "timer=False" in repr(deadline)
    done = loop.create_future()
    other.arm(0.04, lambda: done.set_result(None))
    await done
    assert calls == []
