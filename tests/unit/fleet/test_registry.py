"""The registry on a hand-moved clock: health hysteresis, version reports, snapshots."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.clock import ManualClock
from proxy.core.models import Backend, BackendState, Dimension, VersionBundle
from proxy.fleet.registry import Registry

T0 = 1_700_000_000.0
A = Backend("a", "us-east", "http://a:8000")
B = Backend("b", "eu-west", "http://b:8000")
V1 = VersionBundle(prompt="v1", parser="p1", model="m1")
V2 = VersionBundle(prompt="v2", parser="p1", model="m1")
K1 = "prompt=v1,parser=p1,model=m1"
K2 = "prompt=v2,parser=p1,model=m1"
ALL: tuple[Dimension, ...] = ("prompt", "parser", "tools", "model")


def make(
    clock: ManualClock,
    *,
    backends: tuple[Backend, ...] = (A, B),
    unhealthy_after: int = 3,
    healthy_after: int = 2,
    dimensions: tuple[Dimension, ...] = ALL,
) -> Registry:
    return Registry(
        backends,
        dimensions=dimensions,
        unhealthy_after=unhealthy_after,
        healthy_after=healthy_after,
        clock=clock,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def reg(clock: ManualClock) -> Registry:
    return make(clock)


def state(reg: Registry, bid: str = "a") -> BackendState:
    return reg.snapshot.by_id[bid]


# -- construction ---------------------------------------------------------------


def test_initial_snapshot(reg: Registry) -> None:
    snap = reg.snapshot
    assert snap.generation == 1
    assert snap.started_at == T0
    assert [s.id for s in snap.backends] == ["a", "b"]
    assert all(not s.healthy and s.version is None and s.version_key is None for s in snap.backends)
    assert snap.by_key == {}
    assert snap.version_last_seen == {}
    assert reg.dimensions == ALL
    assert reg.health_history("a") == []


def test_version_key_uses_configured_dimensions(clock: ManualClock) -> None:
    reg = make(clock, dimensions=("prompt", "model"))
    assert reg.version_key(V1) == "prompt=v1,model=m1"
    assert reg.report_version("a", V1, "poll") == "prompt=v1,model=m1"
    assert state(reg).version_key == "prompt=v1,model=m1"
    assert state(reg).version == V1


# -- health hysteresis -------------------------------------------------------------


def test_admitted_on_first_success_ever(reg: Registry, clock: ManualClock) -> None:
    reg.report_failure("a", "refused")
    reg.report_failure("a", "refused")
    reg.report_failure("a", "refused")
    reg.report_failure("a", "refused")
    assert not state(reg).healthy
    clock.advance(5)
    reg.report_success("a")  # healthy_after is 2, but there is no history to protect
    assert state(reg).healthy
    assert reg.health_history("a") == [(T0 + 5, True, "check succeeded")]


def test_unhealthy_only_after_consecutive_failures(reg: Registry, clock: ManualClock) -> None:
    reg.report_success("a")
    gen = reg.snapshot.generation
    clock.advance(1)
    reg.report_failure("a", "timeout")
    reg.report_failure("a", "timeout")
    assert state(reg).healthy
    assert reg.snapshot.generation == gen  # nothing routing can see changed
    clock.advance(1)
    reg.report_failure("a", "connection refused")
    assert not state(reg).healthy
    assert reg.snapshot.generation == gen + 1
    assert reg.health_history("a") == [
        (T0, True, "check succeeded"),
        (T0 + 2, False, "connection refused"),
    ]


def test_success_resets_the_failure_count(reg: Registry) -> None:
    reg.report_success("a")
    for _ in range(5):
        reg.report_failure("a", "x")
        reg.report_failure("a", "x")
        reg.report_success("a")
    assert state(reg).healthy
    assert len(reg.health_history("a")) == 1


def test_comes_back_only_after_consecutive_successes(clock: ManualClock) -> None:
    reg = make(clock, unhealthy_after=1, healthy_after=3)
    reg.report_success("a")
    reg.report_failure("a", "down")
    assert not state(reg).healthy
    reg.report_success("a")
    reg.report_success("a")
    reg.report_failure("a", "down again")  # resets the success run
    reg.report_success("a")
    reg.report_success("a")
    assert not state(reg).healthy
    clock.advance(7)
    reg.report_success("a")
    assert state(reg).healthy
    assert [(h, why) for _, h, why in reg.health_history("a")] == [
        (True, "check succeeded"),
        (False, "down"),
        (True, "check succeeded"),
    ]
    assert reg.health_history("a")[-1][0] == T0 + 7


def test_health_of_one_backend_does_not_touch_another(reg: Registry) -> None:
    reg.report_success("a")
    assert state(reg, "a").healthy
    assert not state(reg, "b").healthy
    assert reg.health_history("b") == []


def test_health_history_keeps_the_last_50(clock: ManualClock) -> None:
    reg = make(clock, unhealthy_after=1, healthy_after=1)
    for i in range(60):
        clock.advance(1)
        reg.report_success("a")
        clock.advance(1)
        reg.report_failure("a", f"fail {i}")
    history = reg.health_history("a")
    assert len(history) == 50
    assert history[-1] == (T0 + 120, False, "fail 59")
    assert history[0] == (T0 + 71, True, "check succeeded")


def test_health_history_is_a_copy(reg: Registry) -> None:
    reg.report_success("a")
    reg.health_history("a").clear()
    assert len(reg.health_history("a")) == 1


def test_health_change_keeps_version(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    reg.report_success("a")
    assert state(reg).version_key == K1
    assert state(reg).routable
    assert reg.snapshot.serving_keys() == frozenset({K1})


@dataclass
class HealthModel:
    """The hysteresis rules as stated, independent of the registry's counters."""

    unhealthy_after: int
    healthy_after: int
    healthy: bool = False
    ever_healthy: bool = False
    outcomes: list[bool] = field(default_factory=list)
    transitions: list[tuple[float, bool, str]] = field(default_factory=list)

    def trailing(self, outcome: bool) -> int:
        n = 0
        for o in reversed(self.outcomes):
            if o != outcome:
                break
            n += 1
        return n

    def apply(self, ok: bool, now: float, why: str) -> None:
        self.outcomes.append(ok)
        if ok and not self.healthy:
            if not self.ever_healthy or self.trailing(True) >= self.healthy_after:
                self.healthy = self.ever_healthy = True
                self.transitions.append((now, True, "check succeeded"))
        elif not ok and self.healthy and self.trailing(False) >= self.unhealthy_after:
            self.healthy = False
            self.transitions.append((now, False, why))


@given(
    outcomes=st.lists(st.booleans(), max_size=60),
    unhealthy_after=st.integers(1, 4),
    healthy_after=st.integers(1, 4),
)
@example(outcomes=[False, False, True], unhealthy_after=3, healthy_after=2)
@example(outcomes=[True, False, False, False, True, True], unhealthy_after=3, healthy_after=2)
@example(outcomes=[True, False, False, True, False, False], unhealthy_after=3, healthy_after=2)
@example(outcomes=[True, False, True, False, True, True], unhealthy_after=1, healthy_after=2)
def test_health_matches_reference_model(
    outcomes: list[bool], unhealthy_after: int, healthy_after: int
) -> None:
    clock = ManualClock(T0)
    reg = make(clock, unhealthy_after=unhealthy_after, healthy_after=healthy_after)
    model = HealthModel(unhealthy_after, healthy_after)
    for i, ok in enumerate(outcomes):
        clock.advance(1)
        if ok:
            reg.report_success("a")
        else:
            reg.report_failure("a", f"failure {i}")
        model.apply(ok, clock.time(), f"failure {i}")
        assert state(reg).healthy is model.healthy
    assert reg.health_history("a") == model.transitions
    assert not state(reg, "b").healthy


@given(
    unhealthy_after=st.integers(2, 5),
    healthy_after=st.integers(1, 5),
    rounds=st.integers(1, 30),
    fail_first=st.booleans(),
)
def test_flapping_never_takes_a_healthy_backend_down(
    unhealthy_after: int, healthy_after: int, rounds: int, fail_first: bool
) -> None:
    reg = make(ManualClock(T0), unhealthy_after=unhealthy_after, healthy_after=healthy_after)
    reg.report_success("a")
    for _ in range(rounds):
        for ok in (not fail_first, fail_first):
            if ok:
                reg.report_success("a")
            else:
                reg.report_failure("a", "flap")
            assert state(reg).healthy
    assert len(reg.health_history("a")) == 1


# -- version reports ----------------------------------------------------------------


def test_first_report_publishes(reg: Registry) -> None:
    gen = reg.snapshot.generation
    assert reg.report_version("a", V1, "poll") == K1
    snap = reg.snapshot
    assert snap.generation == gen + 1
    assert snap.by_id["a"].version == V1
    assert snap.by_id["a"].version_key == K1
    assert snap.by_id["a"].reported_at == T0
    assert snap.by_id["a"].report_source == "poll"
    assert snap.by_key == {K1: (snap.by_id["a"],)}
    assert snap.version_last_seen == {K1: T0}
    assert snap.last_seen(K1) == T0


def test_same_version_within_a_second_does_not_publish(reg: Registry, clock: ManualClock) -> None:
    reg.report_version("a", V1, "poll")
    snap = reg.snapshot
    clock.advance(0.999)
    assert reg.report_version("a", V1, "poll") == K1
    assert reg.snapshot is snap


def test_same_version_publishes_when_last_seen_moved_a_second(
    reg: Registry, clock: ManualClock
) -> None:
    reg.report_version("a", V1, "poll")
    gen = reg.snapshot.generation
    clock.advance(1.0)
    reg.report_version("a", V1, "push")
    snap = reg.snapshot
    assert snap.generation == gen + 1
    assert snap.version_last_seen == {K1: T0 + 1.0}
    assert snap.by_id["a"].reported_at == T0 + 1.0
    assert snap.by_id["a"].report_source == "push"


def test_reported_at_of_an_unchanged_version_moves_at_most_once_a_second(
    reg: Registry, clock: ManualClock
) -> None:
    def published_a() -> BackendState:
        reg.report_version("b", next(flip), "poll")  # a change elsewhere publishes
        return state(reg, "a")

    flip = iter([V1, V2, V1, V2])
    reg.report_version("a", V1, "stamp")
    clock.advance(0.5)
    reg.report_version("a", V1, "stamp")  # every response stamps: not worth a new state
    assert published_a().reported_at == T0
    reg.report_version("a", V1, "poll")  # another source is news at once
    assert (published_a().reported_at, state(reg, "a").report_source) == (T0 + 0.5, "poll")
    clock.advance(1.0)
    reg.report_version("a", V1, "poll")
    assert published_a().reported_at == T0 + 1.5


def test_a_stamp_that_repeats_the_known_version_keeps_it(
    reg: Registry, clock: ManualClock
) -> None:
    full = VersionBundle(prompt="v1", parser="p1", model="m1")
    reg.report_version("a", full, "poll")
    clock.advance(1.0)
    assert reg.report_stamp("a", {"prompt": "v1"}) == reg.version_key(full)
    assert (state(reg).version, state(reg).report_source) == (full, "stamp")
    changed = VersionBundle(prompt="v1", parser="p2", model="m1")
    assert reg.report_stamp("a", {"prompt": "v1", "parser": "p2"}) == reg.version_key(changed)
    assert state(reg).version == changed


def test_last_seen_is_shared_by_backends_of_one_version(reg: Registry, clock: ManualClock) -> None:
    reg.report_version("a", V1, "poll")
    clock.advance(0.5)
    reg.report_version("b", V1, "poll")  # a change for b, so published...
    assert reg.snapshot.by_key[K1] == (state(reg, "a"), state(reg, "b"))
    assert reg.snapshot.last_seen(K1) == T0  # ...but last seen moves only every second
    clock.advance(0.5)
    reg.report_version("a", V1, "poll")
    assert reg.snapshot.last_seen(K1) == T0 + 1.0


def test_version_change_is_published_at_once(reg: Registry, clock: ManualClock) -> None:
    reg.report_version("a", V1, "poll")
    gen = reg.snapshot.generation
    clock.advance(0.1)
    assert reg.report_version("a", V2, "poll") == K2
    snap = reg.snapshot
    assert snap.generation == gen + 1
    assert snap.by_id["a"].version_key == K2
    assert snap.by_id["a"].reported_at == T0 + 0.1
    assert K1 not in snap.by_key
    assert snap.version_last_seen == {K1: T0, K2: T0 + 0.1}


def test_last_report_wins_whatever_the_source(reg: Registry, clock: ManualClock) -> None:
    v3 = VersionBundle(prompt="v3")
    steps = [(V1, "poll"), (V2, "stamp"), (V1, "push"), (v3, "poll"), (V2, "push")]
    for bundle, source in steps:
        clock.advance(0.01)
        reg.report_version("a", bundle, source)  # type: ignore[arg-type]
        assert state(reg).version == bundle
        assert state(reg).version_key == bundle.key()
        assert state(reg).report_source == source


def test_version_report_keeps_health_and_draining(reg: Registry) -> None:
    reg.report_success("a")
    reg.set_draining("a", True)
    reg.report_version("a", V1, "poll")
    assert state(reg).healthy
    assert state(reg).draining


def test_unknown_backend_is_ignored(reg: Registry) -> None:
    snap = reg.snapshot
    assert reg.report_version("zz", V1, "poll") == K1
    assert reg.report_stamp("zz", {"prompt": "v1"}) is None
    reg.report_success("zz")
    reg.report_failure("zz", "x")
    assert reg.snapshot is snap
    assert "zz" not in reg.snapshot.by_id


def test_first_report_records_last_seen_whatever_the_clock() -> None:
    clock = ManualClock(0.0)
    reg = make(clock)
    clock.advance(0.5)
    reg.report_version("a", V1, "poll")
    assert reg.snapshot.version_last_seen == {K1: 0.5}


# -- response stamps ----------------------------------------------------------------


def test_stamp_overlays_only_stamped_dimensions(reg: Registry, clock: ManualClock) -> None:
    full = VersionBundle(prompt="v1", parser="p1", tools="t1", model="m1")
    reg.report_version("a", full, "poll")
    clock.advance(0.1)
    assert reg.report_stamp("a", {"prompt": "v2"}) == "prompt=v2,parser=p1,tools=t1,model=m1"
    assert state(reg).version == VersionBundle(prompt="v2", parser="p1", tools="t1", model="m1")
    assert state(reg).report_source == "stamp"
    assert reg.report_stamp("a", {"model": "m2", "tools": "t2"}) == (
        "prompt=v2,parser=p1,tools=t2,model=m2"
    )


def test_stamp_matching_known_version_changes_nothing(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    snap = reg.snapshot
    assert reg.report_stamp("a", {"prompt": "v1"}) == K1
    assert reg.report_stamp("a", {}) == K1
    assert reg.snapshot is snap


def test_stamp_with_prompt_works_when_nothing_was_known(reg: Registry) -> None:
    assert reg.report_stamp("a", {"prompt": "v9", "parser": "p9"}) == "prompt=v9,parser=p9"
    assert state(reg).version == VersionBundle(prompt="v9", parser="p9")
    assert state(reg).report_source == "stamp"


def test_stamp_without_prompt_when_nothing_was_known(reg: Registry) -> None:
    snap = reg.snapshot
    assert reg.report_stamp("a", {"parser": "p9"}) is None
    assert reg.report_stamp("a", {}) is None
    assert reg.snapshot is snap
    assert state(reg).version is None


# -- snapshots -------------------------------------------------------------------------


def test_snapshots_are_immutable(reg: Registry, clock: ManualClock) -> None:
    reg.report_version("a", V1, "poll")
    old = reg.snapshot
    old_a = old.by_id["a"]
    clock.advance(2)
    reg.report_version("a", V2, "poll")
    reg.report_success("a")
    reg.set_draining("b", True)
    reg.remove_backend("b")
    assert old.by_id["a"] is old_a
    assert old_a.version == V1
    assert not old_a.healthy
    assert old.by_key == {K1: (old_a,)}
    assert set(old.by_id) == {"a", "b"}
    assert not old.by_id["b"].draining
    assert dict(old.version_last_seen) == {K1: T0}
    assert reg.snapshot.generation == old.generation + 4
    assert reg.snapshot.version_last_seen == {K1: T0, K2: T0 + 2}


# -- administration ----------------------------------------------------------------------


def test_add_backend(reg: Registry) -> None:
    gen = reg.snapshot.generation
    c = Backend("c", "ap-south", "http://c:8000")
    reg.add_backend(c)
    assert reg.snapshot.generation == gen + 1
    assert state(reg, "c") == BackendState(backend=c)
    assert [s.id for s in reg.snapshot.backends] == ["a", "b", "c"]
    reg.report_success("c")
    assert state(reg, "c").healthy


def test_add_existing_backend_fails(reg: Registry) -> None:
    with pytest.raises(KeyError, match="'a' already exists"):
        reg.add_backend(Backend("a", "x", "http://x"))


def test_remove_backend(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    reg.report_success("a")
    gen = reg.snapshot.generation
    reg.remove_backend("a")
    assert reg.snapshot.generation == gen + 1
    assert set(reg.snapshot.by_id) == {"b"}
    assert reg.snapshot.by_key == {}
    assert reg.snapshot.serving_keys() == frozenset()
    with pytest.raises(KeyError):
        reg.remove_backend("a")
    reg.report_success("a")  # reports for a removed backend are ignored
    assert reg.snapshot.generation == gen + 1


def test_readded_backend_starts_fresh(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    reg.report_success("a")
    reg.remove_backend("a")
    reg.add_backend(A)
    assert state(reg) == BackendState(backend=A)
    assert reg.health_history("a") == []


def test_set_draining(reg: Registry) -> None:
    reg.report_success("a")
    gen = reg.snapshot.generation
    reg.set_draining("a", True)
    assert state(reg).draining
    assert state(reg).healthy
    assert reg.snapshot.generation == gen + 1
    reg.set_draining("a", False)
    assert not state(reg).draining
    with pytest.raises(KeyError):
        reg.set_draining("zz", True)


def test_set_intent_is_shown_but_never_becomes_the_runtime(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    gen = reg.snapshot.generation
    reg.set_intent("a", V2)
    assert state(reg).intended == V2
    assert state(reg).version == V1  # the runtime report is untouched
    assert state(reg).version_key == K1
    assert reg.snapshot.by_key == {K1: (state(reg),)}
    assert reg.snapshot.generation == gen + 1
    reg.set_intent("a", V2)  # no change, no new snapshot
    assert reg.snapshot.generation == gen + 1
    reg.report_version("a", V1, "push")  # a later runtime report keeps the intent
    assert state(reg).intended == V2
    reg.set_intent("a", None)
    assert state(reg).intended is None
    with pytest.raises(KeyError):
        reg.set_intent("zz", V1)


def test_set_blocked_is_published_in_the_snapshot(reg: Registry) -> None:
    reg.report_version("a", V1, "poll")
    gen = reg.snapshot.generation
    reg.set_blocked(frozenset({"v1"}))
    snap = reg.snapshot
    assert snap.generation == gen + 1
    assert snap.blocked_versions == frozenset({"v1"})
    assert snap.blocks(K1)
    assert not snap.blocks(K2)
    reg.set_blocked(frozenset({"v1"}))
    assert reg.snapshot.generation == gen + 1
    reg.report_version("b", V2, "poll")  # later snapshots keep the blocked set
    assert reg.snapshot.blocked_versions == frozenset({"v1"})
    reg.set_blocked(frozenset({K2}))
    assert reg.snapshot.blocks(K2)
    assert not reg.snapshot.blocks(K1)


def test_repr(reg: Registry) -> None:
    reg.report_version("a", V2, "poll")
    reg.report_version("b", V1, "poll")
    reg.report_success("b")
    assert repr(reg) == (
        f"Registry(backends=2, healthy=1, versions=['{K1}', '{K2}'], generation=4)"
    )


# -- waiting ---------------------------------------------------------------------------------


async def test_wait_for_change_true_when_published(clock: ManualClock) -> None:
    reg = make(clock)
    waiter = asyncio.create_task(reg.wait_for_change(5.0))
    await asyncio.sleep(0)  # let it start waiting
    assert not waiter.done()
    reg.report_version("a", V1, "poll")
    assert await asyncio.wait_for(waiter, 1.0) is True


async def test_wait_for_change_wakes_every_waiter(clock: ManualClock) -> None:
    reg = make(clock)
    waiters = [asyncio.create_task(reg.wait_for_change(5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    reg.report_success("a")
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1.0) == [True, True, True]


async def test_wait_for_change_false_on_timeout(clock: ManualClock) -> None:
    reg = make(clock)
    reg.report_version("a", V1, "poll")  # published before the wait: does not count
    assert await reg.wait_for_change(0.01) is False


async def test_wait_for_change_ignores_non_publishing_reports(clock: ManualClock) -> None:
    reg = make(clock)
    reg.report_version("a", V1, "poll")
    reg.report_success("a")
    waiter = asyncio.create_task(reg.wait_for_change(0.02))
    await asyncio.sleep(0)
    reg.report_version("a", V1, "poll")  # same version, same second
    reg.report_failure("a", "one failure")  # below unhealthy_after
    assert await waiter is False
