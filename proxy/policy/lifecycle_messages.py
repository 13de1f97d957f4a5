"""The vocabulary of the request lifecycle (proxy/policy/lifecycle.py): what the data
plane observed (events, each with the ``World`` it happened in), what the machine asks
for next (actions, one per step) and what it applies at once (effects).

Every message is a value (compared and hashed by its fields), so a transcript of them
is a test. They are not ``frozen``: a frozen dataclass's ``__init__`` sets each field
through ``object.__setattr__``, which made building one cost ~0.7 µs against ~0.25 µs,
and a request builds a dozen (a ``World`` per event, a ``Step``, its action and
effects). Nothing mutates a message once built: the machine and the executor only read
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from proxy.core.errors import ProxyError
    from proxy.core.models import Forward, Pin, Snapshot


# --- the world an event happens in ---------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class World:
    snapshot: Snapshot
    now: float  # wall clock, seconds (pins and retirement are in wall time)
    mono: float  # monotonic, seconds (deadlines)
    retry_budget_left: bool = True


# --- events ----------------------------------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class PinLooked:
    """The lookup's answer. ``created``: the store wrote the machine's proposal
    (``Lifecycle.propose``) because no pin was held: the session is pinned now."""

    pin: Pin | None
    created: bool = False


@dataclass(slots=True, unsafe_hash=True)
class PinStored:
    """The answer of pin-if-absent: the pin the store holds now (ours or a winner's)."""

    stored: Pin


@dataclass(slots=True, unsafe_hash=True)
class Repinned:
    pass


@dataclass(slots=True, unsafe_hash=True)
class Waited:
    """The registry published a new snapshot, or the wait's deadline passed."""


@dataclass(slots=True, unsafe_hash=True)
class HeadReceived:
    status: int
    served_key: str  # the stamp's version key, else the version the backend was chosen for


SendFailure = Literal["connect", "dropped", "timeout", "invalid"]


@dataclass(slots=True, unsafe_hash=True)
class SendFailed:
    kind: SendFailure
    message: str
    reused: bool = False  # a "dropped" on a pooled keep-alive connection
    code: str | None = None  # the answer's error code for an "invalid" head (e.g. too large)


Event = PinLooked | PinStored | Repinned | Waited | HeadReceived | SendFailed


# --- actions (one to await per step) -----------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class LookUpPin:
    session_id: str


@dataclass(slots=True, unsafe_hash=True)
class PinIfAbsent:
    session_id: str
    pin: Pin


@dataclass(slots=True, unsafe_hash=True)
class Repin:
    session_id: str
    pin: Pin


@dataclass(slots=True, unsafe_hash=True)
class Send:
    forward: Forward
    pinned_version: str | None  # sent as X-Pinned-Version
    replayable: bool  # the pool may retry a closed pooled connection


@dataclass(slots=True, unsafe_hash=True)
class WaitForRegistry:
    until: float  # monotonic


@dataclass(slots=True, unsafe_hash=True)
class Relay:
    """Terminal: relay the response just received. ``failed``: it was a 5xx."""

    forward: Forward
    served_key: str
    failed: bool


@dataclass(slots=True, unsafe_hash=True)
class Fail:
    """Terminal: answer ``error``; nothing was relayed."""

    error: ProxyError


Action = LookUpPin | PinIfAbsent | Repin | Send | WaitForRegistry | Relay | Fail


# --- effects (synchronous, applied before the action) ------------------------------------------


@dataclass(slots=True, unsafe_hash=True)
class Discard:
    """Close the response just received, unseen by the client."""

    backend_id: str


@dataclass(slots=True, unsafe_hash=True)
class MarkSuspect:
    """Passive health: take the backend out of routing until a fresh poll readmits it."""

    backend_id: str
    why: str


@dataclass(slots=True, unsafe_hash=True)
class Reprobe:
    """Poll the backend's ``/version`` now."""

    backend_id: str


@dataclass(slots=True, unsafe_hash=True)
class ReportResult:
    """Feed outlier detection: ``ok`` is False for a 5xx, a timeout or a broken head."""

    backend_id: str
    ok: bool


RetryReason = Literal["connect", "dropped", "version_mismatch", "refused"]


@dataclass(slots=True, unsafe_hash=True)
class CountRetry:
    reason: RetryReason
    budgeted: bool  # counts against the global retry budget


@dataclass(slots=True, unsafe_hash=True)
class CountMismatch:
    backend_id: str
    pinned: str
    served: str


@dataclass(slots=True, unsafe_hash=True)
class CountRefusal:
    backend_id: str
    pinned: str


@dataclass(slots=True, unsafe_hash=True)
class CountRaceLost:
    pass


@dataclass(slots=True, unsafe_hash=True)
class CountNewPin:
    version_key: str


@dataclass(slots=True, unsafe_hash=True)
class CountRepin:
    from_key: str
    to_key: str
    reason: str = "retired"  # or "rollback"


Effect = (
    Discard | MarkSuspect | Reprobe | ReportResult | CountRetry | CountMismatch | CountRefusal
    | CountRaceLost | CountNewPin | CountRepin
)


@dataclass(slots=True, unsafe_hash=True)
class Step:
    action: Action
    effects: tuple[Effect, ...] = ()
