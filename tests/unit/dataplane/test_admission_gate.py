"""The async admission gate (proxy/dataplane/admission_gate.py) on plain asyncio: slots
given back on every path, a client that leaves the queue, and one that leaves just as
a slot was handed to it."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.core.admission import AdmissionLimits
from proxy.core.errors import ProxyError, Shedding
from proxy.dataplane.admission_gate import AdmissionGate


class Backend:
    """A handler whose requests run until the test lets each go."""

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Event] = {}
        self.arrived = asyncio.Event()

    async def handle(self, request: str) -> str:
        release = self.running[request] = asyncio.Event()
        self.arrived.set()
        await release.wait()
        return f"served {request}"

    async def until_running(self, request: str) -> None:
        while request not in self.running:
            self.arrived.clear()
            await self.arrived.wait()


async def refuse(request: str, error: ProxyError) -> str:
    assert isinstance(error, Shedding)
    assert error.status == 503
    assert error.headers["Retry-After"] == "7"
    return f"refused {request}: {error.reason}"


def gate(max_in_flight: int = 1, queue: int = 1, shed: list[str] | None = None
         ) -> AdmissionGate:
    return AdmissionGate(AdmissionLimits(max_in_flight, queue, 30.0), clock=time.monotonic,
                         on_shed=(shed if shed is not None else []).append, retry_after_s=7)


async def running_then_queued(
    backend: Backend, g: AdmissionGate, *queued: str
) -> tuple[asyncio.Task[str], list[asyncio.Task[str]]]:
    """"a" running (holding the one slot), then ``queued`` waiting, in that order."""
    first = asyncio.create_task(g.run("a", backend.handle, refuse))
    await backend.until_running("a")
    waiting = [asyncio.create_task(g.run(name, backend.handle, refuse)) for name in queued]
    while g.queued < len(queued):
        await asyncio.sleep(0)  # one loop turn: the tasks reach the gate
    return first, waiting


async def test_queue_full_then_fifo_admission_and_every_slot_back() -> None:
    shed: list[str] = []
    backend, g = Backend(), gate(shed=shed)
    first, (second,) = await running_then_queued(backend, g, "b")
    assert await g.run("c", backend.handle, refuse) == "refused c: queue_full"
    backend.running["a"].set()
    assert await first == "served a"
    await backend.until_running("b")
    backend.running["b"].set()
    assert await second == "served b"
    assert (g.in_flight, g.queued) == (0, 0)
    assert shed == ["queue_full"]


async def test_a_handler_that_fails_gives_its_slot_back() -> None:
    g = gate(queue=0)

    async def broken(request: str) -> str:
        raise RuntimeError(request)

    with pytest.raises(RuntimeError, match="a"):
        await g.run("a", broken, refuse)
    assert g.in_flight == 0


async def test_a_waiter_whose_client_left_leaves_the_queue() -> None:
    backend, g = Backend(), gate()
    first, (waiting,) = await running_then_queued(backend, g, "b")
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert g.queued == 0
    backend.running["a"].set()
    await first
    assert (g.in_flight, g.queued) == (0, 0)


async def test_a_waiter_cancelled_as_its_slot_arrives_passes_the_slot_on() -> None:
    backend, g = Backend(), gate(queue=2)
    first, (second, third) = await running_then_queued(backend, g, "b", "c")
    # A second slot is handed to "b", whose client leaves in the same loop turn,
    # before "b" could resume: the slot goes on to "c".
    g.reconfigure(AdmissionLimits(2, 2, 30.0), retry_after_s=7)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await backend.until_running("c")
    assert "b" not in backend.running
    for name in ("a", "c"):
        backend.running[name].set()
    assert list(await asyncio.gather(first, third)) == ["served a", "served c"]
    assert (g.in_flight, g.queued) == (0, 0)


async def test_a_reload_with_more_room_admits_waiters_at_once() -> None:
    backend, g = Backend(), gate()
    first, (second,) = await running_then_queued(backend, g, "b")
    g.reconfigure(AdmissionLimits(2, 1, 30.0), retry_after_s=7)
    await backend.until_running("b")
    for name in ("a", "b"):
        backend.running[name].set()
    assert list(await asyncio.gather(first, second)) == ["served a", "served b"]
