"""Stopping background tasks at shutdown, with a deadline.

Every long-lived loop in pinproxy (subscriptions, flushers, pollers, the rollout check)
is stopped by cancelling its task and waiting for it. A plain ``task.cancel(); await
task`` waits forever when the loop does not end on that one cancellation, and that
happens: a library that turns a cancellation into its own error and retries (redis-py
reconnecting, for one) hands the loop a normal result, and a ``while True`` loop then
carries on with its cancellation already spent. The process then never finishes its
shutdown (a test's teardown hangs until its timeout; a replica outlives its grace
period and is killed).

:func:`stop_tasks` cancels again, every ``_RECANCEL_S``, whatever has not ended, and
gives up at a deadline, logging what is still running, so a shutdown always finishes.
Loops should still check a closed flag of their own: that ends them even when every
cancellation is swallowed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

# Long enough for a cancelled loop's own clean-up (closing a connection in a finally) to
# finish before it is interrupted by the next cancellation.
_RECANCEL_S = 0.5

logger = logging.getLogger(__name__)


async def stop_tasks(
    tasks: Iterable[asyncio.Task[Any] | None], *, timeout_s: float, what: str
) -> bool:
    """Cancel ``tasks`` and wait for them to end, re-cancelling those that go on, for
    at most ``timeout_s``; ``False`` (and a warning naming them) if some still run.

    A task that ended with an error other than its cancellation has it logged here:
    shutdown carries on either way.
    """
    pending = {t for t in tasks if t is not None}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    finished: set[asyncio.Task[Any]] = set()
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        done, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, remaining))
        finished |= done
    for task in finished:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s: task %s had failed: %r", what, task.get_name(), task.exception())
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        logger.warning("%s: tasks still running after %.1fs: %s", what, timeout_s, names)
        return False
    return True
