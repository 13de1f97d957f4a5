"""The rollout controller stops at close even when a check under way swallows the
cancellation (as redis-py does when it turns one into a lost connection and retries):
the two-replica rollout tests' teardown used to wait on it until pytest-timeout."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from proxy.config.rollout import RolloutConfig
from proxy.core.clock import ManualClock
from proxy.core.models import Backend
from proxy.core.rollout import RolloutState
from proxy.fleet.registry import Registry
from proxy.fleet.rollout_control import RolloutController
from proxy.fleet.rollout_soak import SoakCounter
from proxy.fleet.rollout_store import LocalRolloutStore


class SwallowingStore(LocalRolloutStore):
    """Once armed, a load absorbs a cancellation and answers anyway (once)."""

    def __init__(self) -> None:
        super().__init__(events_kept=10)
        self.armed = False
        self.loading = asyncio.Event()
        self.swallowed = 0

    async def load(self) -> RolloutState:
        if self.armed:
            self.armed = False
            self.loading.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.swallowed += 1
        return await super().load()


async def _noop(version: str) -> None:
    return None


async def test_close_ends_a_check_that_swallowed_its_cancellation() -> None:
    clock = ManualClock(1_700_000_000.0)
    registry = Registry((Backend("a", "eu", "http://a:8000"),), dimensions=("prompt",),
                        unhealthy_after=3, healthy_after=2, clock=clock)  # fmt: skip
    store = SwallowingStore()
    controller = RolloutController(
        config=RolloutConfig(check_interval_s=0.01), registry=registry, store=store,
        counter=SoakCounter(clock), block=_noop, admit=_noop, clock=clock,
        metrics_registry=CollectorRegistry(), replica="test", stop_timeout_s=5.0,
    )  # fmt: skip
    await controller.start()
    store.armed = True  # the loop's next check is the one under way at close
    await asyncio.wait_for(store.loading.wait(), 5)
    closing = asyncio.create_task(controller.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    if not done:  # the loop carried on with its cancellation spent: close never ends
        closing.cancel()
        await asyncio.wait([closing])
    assert closing in done, "close() waited on a check loop that never ended"
    assert store.swallowed == 1
