# Theory of operation
# -------------------
# Routing is two questions asked in a fixed order. First, which backends MAY take
# this request: for a pinned session only backends whose runtime currently reports
# the pinned version key (invariant 1: there is no silent fallback to another version),
# for everything else the healthy, non-draining backends of an admitted version. A
# version is admitted when the static policy admits it and the snapshot does not
# block it: the operator's kill switch arrives as data (``Snapshot.blocked_versions``),
# so this stays a pure function, and it never touches sessions already pinned. So does
# the rollout discipline (proxy/core/rollout.py): in an atomic region only backends serving
# the region's current version take new sessions (``Snapshot.region_current``), and a
# session pinned to a rolled-back version is repinned to its target
# (``Snapshot.rollbacks``), explicitly, like a retired one.
# Second, which of those SHOULD take it: the one that looks cheapest by
# "peak-EWMA latency x (in-flight + 1)", chosen with the power of two choices (P2C).
#
# Why P2C rather than always the cheapest: every replica reads estimates that are
# a little stale (a latency is only learnt when a response head comes back), so
# "always the fastest" sends a whole burst to one backend before anyone notices it
# slowing down: herding. Drawing two at random and taking the better of the pair
# still avoids the slow tail almost as well as a full scan (the worst backend is
# never picked while there are two candidates), yet spreads load, and it does not
# amplify a stale estimate into a stampede.
#
# Why a *peak* EWMA (see proxy/core/ewma.py): a slowdown is taken in at once (a sample
# above the estimate replaces it) and forgotten slowly, so a backend that has just
# got slow stops attracting traffic on its very next response, while one noisy
# fast sample does not make a slow backend look healthy. Multiplying by in-flight + 1
# makes the cost rise with queued work before any of it has been measured.
#
# Determinism: candidates are kept in snapshot order and the only randomness is the
# injected ``rng``, so a decision is a pure function of its inputs and a seed.

"""Pure routing: which backend serves a request, given its pin and the fleet snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.core.models import (
    BackendState,
    Forward,
    Pin,
    RequestFacts,
    RouteDecision,
    Snapshot,
    Unavailable,
    prompt_of,
)

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence

    from proxy.config.settings import RoutingConfig, VersionsConfig


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The settings routing decides by.

    ``admitted`` lists the version keys (or bare prompt versions) new sessions may be
    pinned to; None admits every version. ``retire_after_s`` is how long a pinned version
    must have gone unreported before its sessions are explicitly repinned.
    """

    pinning: bool = True
    admitted: frozenset[str] | None = None
    retire_after_s: float = 600.0

    @classmethod
    def from_config(cls, routing: RoutingConfig, versions: VersionsConfig) -> RoutingPolicy:
        """Build the policy from the ``routing`` and ``versions`` settings sections."""
        admitted = versions.admitted_for_new_sessions
        return cls(
            pinning=routing.pinning,
            admitted=None if admitted is None else frozenset(admitted),
            retire_after_s=versions.retire_after_s,
        )

    def admits(self, version_key: str) -> bool:
        """Whether new (or unpinned) traffic may go to a backend serving ``version_key``."""
        admitted = self.admitted
        return admitted is None or version_key in admitted or prompt_of(version_key) in admitted


class LoadView(Protocol):
    """What routing reads about load: a cost per backend, lower is better."""

    def cost(self, backend_id: str) -> float: ...


def choose(
    facts: RequestFacts,
    pin: Pin | None,
    snapshot: Snapshot,
    policy: RoutingPolicy,
    loads: LoadView,
    rng: random.Random,
    now: float,
) -> RouteDecision:
    """Decide where this request goes.

    A pinned session only ever gets a backend of its pinned version (draining ones
    included, neither admission nor ``snapshot.blocked_versions`` applied; backends
    ejected by outlier detection until after ``now`` never), or, once
    that version has gone unreported for ``policy.retire_after_s`` seconds (``now``
    is wall-clock, like the snapshot's ``last_seen``), an explicit repin
    (``Forward.repin_from``). Everything else is picked by P2C among the eligible
    backends.
    """
    if pin is None or not policy.pinning or facts.session_id is None:
        eligible = _eligible(snapshot, policy, facts.exclude, now)
        if not eligible:
            return Unavailable(None, "no_backends")
        chosen = _pick(eligible, loads, rng)
        assert chosen.version_key is not None  # eligible implies routable
        new_pin = policy.pinning and facts.session_id is not None
        return Forward(chosen, chosen.version_key, new_pin=new_pin)

    pinned = pin.version_key
    exclude = facts.exclude
    goal = snapshot.rollbacks.get(pinned)
    if goal is not None:
        # Rolled back: the session moves, explicitly, to the rollback's target.
        targets = [s for s in snapshot.by_key.get(goal, ())
                   if s.healthy and s.id not in exclude and s.ejected_until <= now]
        if targets:
            return Forward(_pick(targets, loads, rng), goal, repin_from=pinned,
                           repin_reason="rollback")
    candidates = [
        s
        for s in snapshot.by_key.get(pinned, ())
        # version_key == pinned by construction
        if s.healthy and s.id not in exclude and s.ejected_until <= now
    ]
    if candidates:
        return Forward(_pick(candidates, loads, rng), pinned)

    if now - snapshot.last_seen(pinned) >= policy.retire_after_s:
        eligible = _eligible(snapshot, policy, exclude, now)
        if eligible:
            chosen = _pick(eligible, loads, rng)
            assert chosen.version_key is not None
            return Forward(chosen, chosen.version_key, new_pin=False, repin_from=pinned)
    return Unavailable(pinned, "version_unavailable")


def _eligible(
    snapshot: Snapshot, policy: RoutingPolicy, exclude: frozenset[str], now: float
) -> list[BackendState]:
    admits = policy.admits
    blocks = snapshot.blocks
    current = snapshot.region_current
    return [
        s
        for s in snapshot.backends
        if s.healthy
        and not s.draining
        and s.version_key is not None
        and s.id not in exclude
        and s.ejected_until <= now
        and admits(s.version_key)
        and not blocks(s.version_key)
        and _current_allows(current.get(s.region), s.version_key, blocks)
    ]


def _current_allows(current: str | None, version_key: str, blocks: Callable[[str], bool]) -> bool:
    """Whether a region's current version lets its backend running ``version_key`` take
    new sessions: no current (per_replica), that very version, or a current the
    operator blocked (the kill switch overrides the region discipline)."""
    return current is None or current == version_key or blocks(current)


def _pick(candidates: Sequence[BackendState], loads: LoadView, rng: random.Random) -> BackendState:
    n = len(candidates)
    if n == 1:
        return candidates[0]
    # Two distinct indices from one uniform draw each: the second is drawn from the
    # n - 1 slots left and shifted past the first.
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    first, second = candidates[i], candidates[j]
    return second if loads.cost(first.id) > loads.cost(second.id) else first
