"""routing.choose: pins are never crossed, eligible traffic always lands, P2C picks the better."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config.settings import RoutingConfig, VersionsConfig
from proxy.core.models import (
    Backend,
    BackendState,
    Forward,
    Pin,
    RequestFacts,
    Snapshot,
    Unavailable,
    VersionBundle,
)
from proxy.policy.routing import RoutingPolicy, choose

if TYPE_CHECKING:
    from collections.abc import Callable

NOW = 1_700_000_000.0
BUNDLES = (
    VersionBundle(prompt="v1"),
    VersionBundle(prompt="v1", model="m2"),
    VersionBundle(prompt="v2"),
    VersionBundle(prompt="v3", parser="p1"),
)
KEYS = tuple(b.key() for b in BUNDLES)
GONE_KEY = "prompt=v0"  # a pinned version no backend reports any more


@dataclass
class Costs:
    """A LoadView with fixed costs that records what routing asked about."""

    costs: dict[str, float] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def cost(self, backend_id: str) -> float:
        self.asked.append(backend_id)
        return self.costs.get(backend_id, 1.0)


def state(
    bid: str,
    bundle: VersionBundle | None,
    *,
    healthy: bool = True,
    draining: bool = False,
) -> BackendState:
    return BackendState(
        backend=Backend(id=bid, region="r1", url=f"http://{bid}.test"),
        version=bundle,
        version_key=None if bundle is None else bundle.key(),
        healthy=healthy,
        draining=draining,
        reported_at=NOW,
    )


def snap(
    *states: BackendState,
    ages: dict[str, float] | None = None,
    blocked: frozenset[str] = frozenset(),
) -> Snapshot:
    seen = {k: NOW - age for k, age in (ages or {}).items()}
    return Snapshot(
        backends=states, started_at=NOW - 10_000, version_last_seen=seen, blocked_versions=blocked
    )


def pin_to(key: str) -> Pin:
    return Pin(version_key=key, backend_id="b0", region="r1", pinned_at=NOW - 100)


def blocked_key(snapshot: Snapshot, key: str) -> bool:
    """The kill switch, spelt out independently of ``Snapshot.blocks``."""
    prompt = key.split(",")[0].removeprefix("prompt=")
    return key in snapshot.blocked_versions or prompt in snapshot.blocked_versions


def eligible_for_new(
    s: BackendState, facts: RequestFacts, policy: RoutingPolicy, snapshot: Snapshot
) -> bool:
    return (
        s.routable
        and not s.draining
        and s.id not in facts.exclude
        and s.version_key is not None
        and policy.admits(s.version_key)
        and not blocked_key(snapshot, s.version_key)
    )


# --- strategies -------------------------------------------------------------------------


# Strategies are built once: constructing them per draw dominates the run time.
_BACKENDS = st.lists(
    st.tuples(st.sampled_from((*BUNDLES, None)), st.booleans(), st.booleans()), max_size=7
)
# Ages straddle the 600 s retirement boundary, including exactly on it.
_AGES = st.dictionaries(
    st.sampled_from((*KEYS, GONE_KEY)),
    st.sampled_from((0.0, 1.0, 599.999, 600.0, 600.001, 5_000.0)),
)
_EXCLUDE = st.frozensets(st.integers(0, 8).map(lambda i: f"b{i}"))  # b8 is never a backend
_PINS = st.sampled_from((*KEYS, GONE_KEY)).map(pin_to)
_MAYBE_PIN = st.one_of(st.none(), _PINS)
_SESSION = st.one_of(st.none(), st.just("sess-1"))
_ADMITTED = st.one_of(
    st.none(), st.frozensets(st.sampled_from((*KEYS, "v1", "v2", "v3", "unknown")))
)
# The operator's kill switch: usually nothing blocked, else full keys or bare prompts.
_BLOCKED: st.SearchStrategy[frozenset[str]] = st.one_of(
    st.just(frozenset()),
    st.frozensets(st.sampled_from((*KEYS, GONE_KEY, "v1", "v2", "v3", "unknown")), max_size=3),
)
# A few fixed values so that ties come up often.
_COSTS = st.lists(
    st.one_of(st.sampled_from((0.0, 0.05, 1.0)), st.floats(0.0, 10.0)), min_size=7, max_size=7
)
_SEED = st.integers(0, 2**32 - 1)


@st.composite
def scenarios(
    draw: st.DrawFn, pinned: bool | None = None
) -> tuple[RequestFacts, Pin | None, Snapshot, RoutingPolicy, Costs, int]:
    """Random fleets and requests; ``pinned`` forces (True) or avoids (False) the pinned path."""
    states = tuple(
        state(f"b{i}", bundle, healthy=healthy, draining=draining)
        for i, (bundle, healthy, draining) in enumerate(draw(_BACKENDS))
    )
    snapshot = snap(*states, ages=draw(_AGES), blocked=draw(_BLOCKED))
    exclude = draw(_EXCLUDE)
    if pinned:
        session: str | None = "sess-1"
        pin: Pin | None = draw(_PINS)
        pinning = True
    else:
        session = draw(_SESSION)
        pin = draw(_MAYBE_PIN)
        pinning = draw(st.booleans())
        if pinned is False and session is not None and pin is not None:
            pinning = False
    policy = RoutingPolicy(pinning=pinning, admitted=draw(_ADMITTED), retire_after_s=600.0)
    costs = Costs(dict(zip((s.id for s in states), draw(_COSTS), strict=False)))
    return RequestFacts(session, exclude), pin, snapshot, policy, costs, draw(_SEED)


Scenario = tuple[RequestFacts, Pin | None, Snapshot, RoutingPolicy, Costs, int]

# Edge cases worth pinning down by name, each also run through every property below.
V1, V1M2, V2 = BUNDLES[0], BUNDLES[1], BUNDLES[2]
SINGLE = (
    RequestFacts("s"),
    pin_to(V1.key()),
    snap(state("b0", V1)),
    RoutingPolicy(),
    Costs(),
    0,
)
ALL_EXCLUDED = (
    RequestFacts("s", frozenset({"b0", "b1"})),
    None,
    snap(state("b0", V1), state("b1", V2)),
    RoutingPolicy(),
    Costs(),
    1,
)
PINNED_ONLY_DRAINING = (
    RequestFacts("s"),
    pin_to(V1.key()),
    snap(state("b0", V1, draining=True), state("b1", V2), state("b2", V1M2)),
    RoutingPolicy(admitted=frozenset({V2.key()})),
    Costs({"b0": 9.0, "b1": 0.0}),
    2,
)
RETIRE_EXACTLY = (
    RequestFacts("s"),
    pin_to(GONE_KEY),
    snap(state("b0", V2), ages={GONE_KEY: 600.0}),
    RoutingPolicy(retire_after_s=600.0),
    Costs(),
    3,
)
RETIRE_NOT_YET = (
    RequestFacts("s"),
    pin_to(GONE_KEY),
    snap(state("b0", V2), ages={GONE_KEY: 599.999}),
    RoutingPolicy(retire_after_s=600.0),
    Costs(),
    4,
)
PINNED_UNHEALTHY_OTHERS_FINE = (
    RequestFacts("s"),
    pin_to(V1.key()),
    snap(state("b0", V1, healthy=False), state("b1", V1M2), ages={V1.key(): 0.0}),
    RoutingPolicy(),
    Costs(),
    5,
)


def edge_cases(test: Callable[[Scenario], None]) -> Callable[[Scenario], None]:
    for case in (
        SINGLE,
        ALL_EXCLUDED,
        PINNED_ONLY_DRAINING,
        RETIRE_EXACTLY,
        RETIRE_NOT_YET,
        PINNED_UNHEALTHY_OTHERS_FINE,
    ):
        test = example(case)(test)
    return test


def run(case: Scenario) -> Forward | Unavailable:
    facts, pin, snapshot, policy, costs, seed = case
    costs.asked.clear()  # the @example cases are shared between tests
    return choose(facts, pin, snapshot, policy, costs, random.Random(seed), NOW)


def pinned_path(case: Scenario) -> bool:
    facts, pin, _, policy, _, _ = case
    return pin is not None and policy.pinning and facts.session_id is not None


# --- properties -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@edge_cases
@given(scenarios(pinned=True))
def test_pinned_session_never_crosses_versions_unless_retired(case: Scenario) -> None:
    facts, pin, snapshot, policy, _, _ = case
    decision = run(case)
    if not pinned_path(case):
        return
    assert pin is not None
    if isinstance(decision, Unavailable):
        assert decision.version_key == pin.version_key
        assert decision.reason == "version_unavailable"
        return
    assert decision.new_pin is False
    if decision.backend.version_key == pin.version_key:
        assert decision.version_key == pin.version_key
        assert decision.repin_from is None
        return
    # Crossing versions is only ever an explicit, retirement-driven repin.
    assert decision.repin_from == pin.version_key
    assert NOW - snapshot.last_seen(pin.version_key) >= policy.retire_after_s
    assert decision.version_key == decision.backend.version_key
    assert eligible_for_new(decision.backend, facts, policy, snapshot)


@settings(max_examples=200, deadline=None)
@edge_cases
@given(scenarios(pinned=True))
def test_pinned_session_is_served_whenever_a_candidate_exists(case: Scenario) -> None:
    facts, pin, snapshot, _, _, _ = case
    if not pinned_path(case):
        return
    assert pin is not None
    candidates = [
        s
        for s in snapshot.backends
        if s.routable and s.version_key == pin.version_key and s.id not in facts.exclude
    ]
    decision = run(case)
    if candidates:
        assert isinstance(decision, Forward)
        assert decision.backend in candidates
        assert decision.repin_from is None
    else:
        assert isinstance(decision, Unavailable) or decision.repin_from == pin.version_key


@settings(max_examples=200, deadline=None)
@edge_cases
@given(scenarios(pinned=False))
def test_new_and_unpinned_traffic_only_goes_to_eligible_backends(case: Scenario) -> None:
    facts, _pin, snapshot, policy, _, _ = case
    if pinned_path(case):
        return
    eligible = [s for s in snapshot.backends if eligible_for_new(s, facts, policy, snapshot)]
    decision = run(case)
    if not eligible:
        assert decision == Unavailable(None, "no_backends")
        return
    assert isinstance(decision, Forward)
    assert decision.backend in eligible
    assert decision.version_key == decision.backend.version_key
    assert decision.repin_from is None
    assert decision.new_pin == (policy.pinning and facts.session_id is not None)
    if not policy.pinning or facts.session_id is None:
        assert decision.new_pin is False


@settings(max_examples=200, deadline=None)
@edge_cases
@given(scenarios())
def test_blocked_versions_never_get_new_sessions(case: Scenario) -> None:
    _facts, _pin, snapshot, _policy, _, _ = case
    decision = run(case)
    if not isinstance(decision, Forward):
        return
    if decision.new_pin or decision.repin_from is not None or not pinned_path(case):
        # A new pin, a retirement repin or unpinned traffic: a choice for new work.
        assert not blocked_key(snapshot, decision.version_key)


@settings(max_examples=200, deadline=None)
@given(scenarios(pinned=True), st.booleans())
def test_pinned_sessions_of_a_blocked_version_are_still_served(
    case: Scenario, by_prompt: bool
) -> None:
    facts, pin, snapshot, policy, costs, seed = case
    assert pin is not None
    prompt = pin.version_key.split(",")[0].removeprefix("prompt=")
    blocked = prompt if by_prompt else pin.version_key
    # Same fleet and same "last seen" times (so retirement is unchanged), pin blocked.
    blocked_snapshot = Snapshot(
        backends=snapshot.backends,
        started_at=snapshot.started_at,
        version_last_seen=snapshot.version_last_seen,
        blocked_versions=snapshot.blocked_versions | {blocked},
    )
    candidates = [
        s
        for s in snapshot.backends
        if s.routable and s.version_key == pin.version_key and s.id not in facts.exclude
    ]
    decision = run((facts, pin, blocked_snapshot, policy, costs, seed))
    if candidates:
        assert isinstance(decision, Forward)
        assert decision.backend in candidates
        assert decision.version_key == pin.version_key
        assert decision.repin_from is None
        # Blocking changes nothing for a served pin: same seed, same backend.
        assert decision == run((facts, pin, snapshot, policy, costs, seed))


@settings(max_examples=200, deadline=None)
@edge_cases
@given(scenarios())
def test_p2c_asks_two_distinct_and_never_takes_the_worse(case: Scenario) -> None:
    decision = run(case)
    costs = case[4]
    if not isinstance(decision, Forward):
        assert costs.asked == []
        return
    if not costs.asked:
        return  # a single candidate needs no comparison
    first, second = costs.asked
    assert first != second
    assert decision.backend.id in (first, second)

    def cost(bid: str) -> float:
        return costs.costs.get(bid, 1.0)

    assert cost(decision.backend.id) == min(cost(first), cost(second))
    if cost(first) == cost(second):
        assert decision.backend.id == first  # a tie goes to the first drawn


@settings(max_examples=100, deadline=None)
@edge_cases
@given(scenarios())
def test_same_seed_same_decision(case: Scenario) -> None:
    assert run(case) == run(case)


# --- examples ---------------------------------------------------------------------------


def test_edge_single_candidate_is_used_without_asking_costs() -> None:
    decision = run(SINGLE)
    assert isinstance(decision, Forward)
    assert decision.backend.id == "b0"
    assert SINGLE[4].asked == []


def test_edge_all_excluded_is_no_backends() -> None:
    assert run(ALL_EXCLUDED) == Unavailable(None, "no_backends")


def test_edge_draining_backend_keeps_its_pinned_sessions() -> None:
    decision = run(PINNED_ONLY_DRAINING)
    assert isinstance(decision, Forward)
    assert decision.backend.id == "b0"  # draining, not admitted, and expensive: still it
    assert decision.version_key == V1.key()


def test_edge_retirement_starts_exactly_at_retire_after() -> None:
    decision = run(RETIRE_EXACTLY)
    assert decision == Forward(
        RETIRE_EXACTLY[2].backends[0], V2.key(), new_pin=False, repin_from=GONE_KEY
    )
    assert run(RETIRE_NOT_YET) == Unavailable(GONE_KEY, "version_unavailable")


def test_unhealthy_pinned_backend_does_not_fall_back_to_a_sibling_version() -> None:
    # prompt=v1 and prompt=v1,model=m2 share a prompt but are different pins.
    assert run(PINNED_UNHEALTHY_OTHERS_FINE) == Unavailable(V1.key(), "version_unavailable")


def test_retired_version_with_nothing_eligible_is_unavailable() -> None:
    snapshot = snap(state("b0", V2, draining=True), ages={GONE_KEY: 10_000.0})
    decision = choose(
        RequestFacts("s"),
        pin_to(GONE_KEY),
        snapshot,
        RoutingPolicy(),
        Costs(),
        random.Random(0),
        NOW,
    )
    assert decision == Unavailable(GONE_KEY, "version_unavailable")


def test_retirement_uses_started_at_for_a_version_never_seen() -> None:
    snapshot = Snapshot(backends=(state("b0", V2),), started_at=NOW - 601)
    decision = choose(
        RequestFacts("s"),
        pin_to(GONE_KEY),
        snapshot,
        RoutingPolicy(),
        Costs(),
        random.Random(0),
        NOW,
    )
    assert isinstance(decision, Forward)
    assert decision.repin_from == GONE_KEY


def test_pinning_off_ignores_the_pin() -> None:
    snapshot = snap(state("b0", V2))
    decision = choose(
        RequestFacts("s"),
        pin_to(V1.key()),
        snapshot,
        RoutingPolicy(pinning=False),
        Costs(),
        random.Random(0),
        NOW,
    )
    assert decision == Forward(snapshot.backends[0], V2.key(), new_pin=False)


def test_kill_switch_by_prompt_or_key_spares_existing_pins() -> None:
    snapshot = snap(state("old", V1), state("new", V2), blocked=frozenset({"v2"}))
    assert snapshot.blocks(V2.key())
    assert not snapshot.blocks(V1.key())
    for seed in range(50):
        fresh = choose(
            RequestFacts("s"), None, snapshot, RoutingPolicy(), Costs(), random.Random(seed), NOW
        )
        assert isinstance(fresh, Forward)
        assert fresh.backend.id == "old"
        pinned = choose(
            RequestFacts("s"), pin_to(V2.key()), snapshot, RoutingPolicy(), Costs(),
            random.Random(seed), NOW,
        )
        assert isinstance(pinned, Forward)
        assert pinned.backend.id == "new"
    everything = snap(state("old", V1), state("new", V2), blocked=frozenset({V1.key(), "v2"}))
    decision = choose(
        RequestFacts("s"), None, everything, RoutingPolicy(), Costs(), random.Random(0), NOW
    )
    assert decision == Unavailable(None, "no_backends")


def test_admission_by_full_key_or_by_prompt() -> None:
    policy = RoutingPolicy(admitted=frozenset({"v1"}))
    assert policy.admits("prompt=v1")
    assert policy.admits("prompt=v1,model=m2")
    assert not policy.admits("prompt=v2")
    exact = RoutingPolicy(admitted=frozenset({"prompt=v1,model=m2"}))
    assert exact.admits("prompt=v1,model=m2")
    assert not exact.admits("prompt=v1")
    assert RoutingPolicy().admits("prompt=anything")


def test_policy_from_config() -> None:
    policy = RoutingPolicy.from_config(
        RoutingConfig(pinning=False),
        VersionsConfig(admitted_for_new_sessions=("v2", "prompt=v3"), retire_after_s=30.0),
    )
    assert policy == RoutingPolicy(
        pinning=False, admitted=frozenset({"v2", "prompt=v3"}), retire_after_s=30.0
    )
    assert RoutingPolicy.from_config(RoutingConfig(), VersionsConfig()).admitted is None


def test_two_candidates_the_cheaper_always_wins() -> None:
    snapshot = snap(state("fast", V1), state("slow", V1))
    costs = Costs({"fast": 0.01, "slow": 0.5})
    for seed in range(200):
        decision = choose(
            RequestFacts(None), None, snapshot, RoutingPolicy(), costs, random.Random(seed), NOW
        )
        assert isinstance(decision, Forward)
        assert decision.backend.id == "fast"


def test_many_candidates_p2c_beats_the_median_and_spreads_load() -> None:
    n = 10
    snapshot = snap(*(state(f"b{i}", V1) for i in range(n)))
    costs = Costs({f"b{i}": float(i) for i in range(n)})  # b0 cheapest
    rng = random.Random(1234)
    picks = []
    for _ in range(4000):
        decision = choose(RequestFacts(None), None, snapshot, RoutingPolicy(), costs, rng, NOW)
        assert isinstance(decision, Forward)
        picks.append(int(decision.backend.id[1:]))
    # min of two distinct uniform ranks: P(rank <= 4) = 1 - C(5,2)/C(10,2) = 0.78.
    at_or_below_median = sum(1 for p in picks if p <= 4) / len(picks)
    assert 0.74 < at_or_below_median < 0.82
    assert 9 not in picks  # the worst can never win a pair
    # Unlike "always the fastest", the best does not take everything (herding): P = 0.2.
    assert 0.16 < picks.count(0) / len(picks) < 0.24


def test_p2c_draws_every_pair_eventually() -> None:
    snapshot = snap(*(state(f"b{i}", V1) for i in range(4)))
    seen = set()
    for seed in range(300):
        costs = Costs()
        choose(RequestFacts(None), None, snapshot, RoutingPolicy(), costs, random.Random(seed), NOW)
        seen.add(frozenset(costs.asked))
    assert len(seen) == 6


@pytest.mark.parametrize("session", [None, "s"])
def test_unknown_version_and_unhealthy_backends_are_never_chosen(session: str | None) -> None:
    snapshot = snap(state("nover", None), state("sick", V1, healthy=False), state("ok", V2))
    for seed in range(50):
        decision = choose(
            RequestFacts(session),
            None,
            snapshot,
            RoutingPolicy(),
            Costs(),
            random.Random(seed),
            NOW,
        )
        assert isinstance(decision, Forward)
        assert decision.backend.id == "ok"
