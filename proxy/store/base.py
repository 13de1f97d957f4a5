"""The pin-store interface every implementation (memory, Redis) provides.

Invariant 3 of the design: a pin is written once, atomically across all proxy
replicas, and afterwards changes only through ``repin`` or ``unpin``. That is what
lets an implementation cache pins locally and answer ``get`` without a round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.core.models import Pin

    # The pin a lookup may write if the store holds none (None: write nothing).
    Propose = Callable[[], Pin | None]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the store knows about a session's pin, for the request about to be routed.

    ``pin``: the pin, or None when the store holds none for the session.
    ``changed_from``: the version key the session was pinned to before a conflict
    replaced it (a replica re-asserting its pin after the store lost data found
    another pin in place, which wins); the answer must carry
    ``X-Prompt-Version-Changed: <changed_from> -> <pin's key>``. Reported once.
    ``lost_data_s_ago``: seconds since this process last saw the store lose data
    (infinite if never): a missing pin may still be re-asserted by a replica that
    holds it, so a continuing conversation should be refused rather than pinned anew.
    """

    pin: Pin | None
    changed_from: str | None = None
    lost_data_s_ago: float = math.inf
    created: bool = False  # ``pin`` is the lookup's proposal, written now: none was held


@dataclass(frozen=True, slots=True)
class Activity:
    """How much a version's pinned sessions are still in use (session-aware draining).

    ``active``: sessions pinned to it whose last request is within the window asked
    for. ``last_used_at``: wall-clock time of the most recent request of any session
    pinned to it (None: no live session); its last pin expires ``pin_ttl_s`` later.
    """

    active: int
    last_used_at: float | None


class PinStore(Protocol):
    """Where session pins live. Every method raises ``StoreUnavailable`` on I/O failure."""

    async def get(self, session_id: str) -> Pin | None:
        """The session's pin, or None. A hit slides the pin's TTL (possibly batched later)."""
        ...

    async def lookup(
        self, session_id: str, hint: Pin | None = None, propose: Propose | None = None
    ) -> Lookup:
        """``get`` for the data plane: the pin and what the answer must say about it.

        ``hint``: the pin of a valid pin token. A store that holds no copy may answer
        with it at once and write it back with pin-if-absent later; a copy it holds
        (which reflects any repin) wins over the hint.
        ``propose``: called at most once, only if the store must ask its backend, for
        the pin a new session would get; a store may then look up and pin-if-absent
        in one step (``Lookup.created``). A store that does not leaves it to
        ``pin_if_absent``.
        """
        ...

    async def pin_if_absent(self, session_id: str, pin: Pin) -> Pin:
        """Atomically pin the session unless it already is; return the pin that holds.

        When two replicas race, exactly one pin is written and both get it back.
        """
        ...

    async def repin(self, session_id: str, pin: Pin) -> Pin | None:
        """Explicitly replace the session's pin; return the previous one.

        Every process sharing the store drops its cached copy (within about a second).
        """
        ...

    async def unpin(self, session_id: str) -> Pin | None:
        """Remove the session's pin; return it. Caches are invalidated like ``repin``."""
        ...

    async def count_pinned(self, version_key: str) -> int:
        """How many live sessions are pinned to ``version_key``, without scanning pins.

        For operators (rollback, the fleet view), not for routing: it may lag by the
        store's batching interval (Redis: ``touch_interval_s`` on other replicas).
        """
        ...

    async def activity(self, version_key: str, window_s: float) -> Activity:
        """Sessions pinned to ``version_key`` used in the last ``window_s``, and when
        one was last used: when old-version capacity can go without cutting a
        conversation. Lags like ``count_pinned``."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        ...

    async def start(self) -> None:
        """Open connections and background tasks (cache invalidation, batched touches)."""
        ...

    async def close(self) -> None:
        """Flush pending work and release every resource; safe to call twice."""
        ...
