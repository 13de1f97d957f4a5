"""What to do with a continuing conversation that finds no pin (``sessions.on_lost_pin``).

Such a session is not new: it was answered before, by a version nobody remembers now
(its pin expired after ``store.pin_ttl_s`` idle, or the store lost it). Pinning it
silently by the new-session rule could change its behaviour mid-conversation, so:

- ``refuse``: while the store lost data within ``sessions.lost_pin_refuse_s`` (None:
  always), answer ``503 pin_lost`` with ``Retry-After``: a replica that holds the pin
  is writing it back, so a retry finds it. Outside that window nothing will bring the
  pin back, and the request is handled as with ``mark``.
- ``mark``: pin it by the new-session rule and mark the answer
  ``X-Prompt-Version-Changed: unknown -> <key>``, counted as
  ``pinproxy_session_version_switches_total{reason="pin_lost"}``.

Both are counted in ``pinproxy_lost_pins_total{action}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from proxy.core.errors import PinLost

if TYPE_CHECKING:
    from proxy.config.settings import SessionsConfig
    from proxy.store import Lookup
    from proxy.telemetry.metrics import ProxyMetrics

Action = Literal["new", "mark", "refuse"]


def lost_pin_action(config: SessionsConfig, found: Lookup, continuing: bool) -> Action:
    """Pure: a lookup that found no pin -> new session, pin-and-mark, or refuse."""
    if found.pin is not None or not continuing:
        return "new"
    if config.on_lost_pin == "refuse":
        window = config.lost_pin_refuse_s
        if window is None or found.lost_data_s_ago < window:
            return "refuse"
    return "mark"


class LostPinPolicy:
    """Applies ``lost_pin_action`` for the data plane: counts, and raises ``PinLost``."""

    def __init__(self, config: SessionsConfig, metrics: ProxyMetrics, retry_after_s: int) -> None:
        self._config = config
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    def check(self, found: Lookup, continues: bool, has_token: bool = False) -> bool:
        """True: pin afresh and mark the answer; False: an ordinary new session.

        ``continues``: the request continues a conversation (RequestBody.continues);
        ``has_token``: the request presented a genuine (expired) pin token: it was
        answered before. Raises ``PinLost`` to refuse. Only called without a pin.
        """
        continuing = has_token or continues
        action = lost_pin_action(self._config, found, continuing)
        if action == "new":
            return False
        self._metrics.lost_pins.labels(action).inc()
        if action == "refuse":
            raise PinLost(self._retry_after_s)
        return True

    def marked(self, version_key: str, created: bool) -> str:
        """The answer's ``X-Prompt-Version-Changed`` value; counts the switch once
        (by the replica whose pin was written)."""
        if created:
            self._metrics.version_switches.labels("pin_lost", "unknown", version_key).inc()
        return f"unknown -> {version_key}"
