"""ControlPlane with the local store: operator changes applied to a real Registry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from proxy.core.clock import ManualClock
from proxy.core.ewma import LoadTracker
from proxy.core.models import Backend, VersionBundle
from proxy.fleet.control import (
    BackendExists,
    ControlPlane,
    ControlState,
    LocalControlStore,
    PushedReport,
    UnknownBackend,
)
from proxy.fleet.control_redis import state_entries, state_from_entries
from proxy.fleet.registry import Registry

A = Backend("a", "r1", "http://a:1")
B = Backend("b", "r2", "http://b:1")
C = Backend("c", "r3", "http://c:1")
DARK = Backend("dark", "r4", "http://dark:1", "push")
V1 = VersionBundle(prompt="v1")
V2 = VersionBundle(prompt="v2", model="m")


@dataclass
class FakeDiscovery:
    """Records what the control plane asks discovery to do."""

    syncs: int = 0
    polled: list[str] = field(default_factory=list)

    def sync(self) -> None:
        self.syncs += 1

    async def poll(self, backend: Backend) -> None:
        self.polled.append(backend.id)


@dataclass
class Rig:
    clock: ManualClock
    registry: Registry
    discovery: FakeDiscovery
    loads: LoadTracker
    store: LocalControlStore
    control: ControlPlane

    def ids(self) -> list[str]:
        return [s.id for s in self.registry.snapshot.backends]


def rig(configured: tuple[Backend, ...] = (A, B, DARK), store: Any = None) -> Rig:
    clock = ManualClock()
    registry = Registry(
        configured, dimensions=("prompt", "model"), unhealthy_after=3, healthy_after=2,
        clock=clock,
    )  # fmt: skip
    discovery = FakeDiscovery()
    loads = LoadTracker(clock, 10.0, 0.05)
    store = store or LocalControlStore()
    control = ControlPlane(
        configured=configured, registry=registry, discovery=discovery,  # type: ignore[arg-type]
        loads=loads, store=store, clock=clock,
    )  # fmt: skip
    return Rig(clock, registry, discovery, loads, store, control)


async def test_add_and_remove_backends_keep_registry_and_discovery_in_step() -> None:
    r = rig()
    await r.control.add_backend(C)
    assert r.ids() == ["a", "b", "dark", "c"]
    assert r.control.added_at_runtime("c")
    assert r.discovery.syncs == 1
    await asyncio.sleep(0)  # the first poll of an added backend runs at once
    assert r.discovery.polled == ["c"]
    with pytest.raises(BackendExists):
        await r.control.add_backend(Backend("a", "x", "http://x:1"))
    r.loads.start("a")
    await r.control.remove_backend("a")  # a configured one
    assert r.ids() == ["b", "dark", "c"]
    assert r.loads.inflight("a") == 0  # its load history is forgotten
    assert r.control.state.removed == frozenset({"a"})
    await r.control.remove_backend("c")  # an added one
    assert r.ids() == ["b", "dark"]
    assert r.control.state.added == {}
    with pytest.raises(UnknownBackend):
        await r.control.remove_backend("c")
    await r.control.add_backend(A)  # a removed configured backend, back at run time
    assert r.ids() == ["b", "dark", "a"]
    assert r.control.state.removed == frozenset()
    assert r.control.added_at_runtime("a")


async def test_push_mode_backends_are_not_polled_when_added() -> None:
    r = rig(configured=(A,))
    await r.control.add_backend(DARK)
    await asyncio.sleep(0)
    assert r.discovery.polled == []


async def test_drain_intent_and_block_reach_the_snapshot() -> None:
    r = rig()
    await r.control.set_draining("a", True)
    await r.control.set_intent("b", V2)
    await r.control.set_blocked("v1", True)
    snap = r.registry.snapshot
    assert snap.by_id["a"].draining
    assert snap.by_id["b"].intended == V2
    assert snap.blocked_versions == frozenset({"v1"})
    await r.control.set_draining("a", False)
    await r.control.set_intent("b", None)
    await r.control.set_blocked("v1", False)
    snap = r.registry.snapshot
    assert not snap.by_id["a"].draining
    assert snap.by_id["b"].intended is None
    assert snap.blocked_versions == frozenset()
    for change in (
        r.control.set_draining("zz", True),
        r.control.set_intent("zz", V1),
        r.control.push_version("zz", V1),
    ):
        with pytest.raises(UnknownBackend):
            await change


async def test_removing_a_backend_drops_its_settings_so_a_readd_starts_clean() -> None:
    r = rig()
    await r.control.set_draining("b", True)
    await r.control.set_intent("b", V1)
    await r.control.push_version("b", V1)
    await r.control.remove_backend("b")
    assert "b" not in r.control.state.drained
    assert "b" not in r.control.state.intents
    assert "b" not in r.control.state.pushes
    await r.control.add_backend(B)
    state = r.registry.snapshot.by_id["b"]
    assert (state.draining, state.intended, state.version) == (False, None, None)


async def test_a_push_is_a_runtime_report_applied_once() -> None:
    r = rig()
    await r.control.push_version("dark", V2)
    dark = r.registry.snapshot.by_id["dark"]
    assert (dark.version_key, dark.report_source, dark.healthy) == (
        "prompt=v2,model=m",
        "push",
        True,
    )
    await r.control.push_version("a", V1)  # a polled backend: a report, not a health check
    a = r.registry.snapshot.by_id["a"]
    assert (a.version_key, a.report_source, a.healthy) == ("prompt=v1", "push", False)
    r.registry.report_version("a", V2, "poll")  # the next poll wins...
    await r.control.set_draining("b", True)  # ...and an unrelated change does not undo it
    await r.control.reload()
    assert r.registry.snapshot.by_id["a"].version == V2
    await r.control.push_version("a", V1)  # a new push is a new report
    assert r.registry.snapshot.by_id["a"].version == V1


async def test_apply_is_idempotent() -> None:
    r = rig()
    await r.control.add_backend(C)
    await r.control.set_draining("c", True)
    await r.control.set_blocked("v2", True)
    generation = r.registry.snapshot.generation
    syncs = r.discovery.syncs
    await r.control.reload()
    await r.control.reload()
    assert r.registry.snapshot.generation == generation
    assert r.discovery.syncs == syncs
    await r.control.set_blocked("v2", True)  # no change: nothing saved or published
    assert r.registry.snapshot.generation == generation


async def test_a_replica_sees_another_url_for_an_id_as_a_new_backend() -> None:
    shared = LocalControlStore()
    one, two = rig(store=shared), rig(store=shared)
    await one.control.add_backend(C)
    await two.control.reload()
    assert two.ids()[-1] == "c"
    two.registry.report_success("c")
    await one.control.remove_backend("c")
    await one.control.add_backend(Backend("c", "r9", "http://elsewhere:1"))
    await two.control.reload()  # it only sees the end state
    state = two.registry.snapshot.by_id["c"]
    assert (state.region, state.backend.url, state.healthy) == ("r9", "http://elsewhere:1", False)


def test_state_round_trips_through_stored_entries() -> None:
    state = ControlState(
        added={"c": C, "dark": DARK},
        removed=frozenset({"a"}),
        drained=frozenset({"b"}),
        blocked=frozenset({"v1", "prompt=v2,model=m"}),
        intents={"b": V2},
        pushes={"dark": PushedReport(V1, 123.5, "abc")},
    )
    assert state_from_entries(state_entries(state)) == state
    assert state_from_entries({}) == ControlState()


def test_unreadable_entries_are_skipped_not_fatal() -> None:
    entries = state_entries(ControlState(added={"c": C}, intents={"b": V1}))
    entries["backends"]["bad"] = b"{not json"
    entries["backends"]["worse"] = orjson.dumps({"url": "http://x"})  # no region
    entries["intents"]["x"] = orjson.dumps({"prompt": "has space"})
    entries["pushes"]["y"] = orjson.dumps({"version": {"prompt": "v1"}})  # no at / id
    state = state_from_entries(entries)
    assert state.added == {"c": C}
    assert state.intents == {"b": V1}
    assert state.pushes == {}


async def test_repr_names_the_settings() -> None:
    r = rig()
    await r.control.set_draining("a", True)
    text = repr(r.control)
    assert "drained=['a']" in text
    assert "LocalControlStore" in text
