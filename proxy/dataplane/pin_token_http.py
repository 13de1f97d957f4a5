"""Pin tokens on the wire: read from a request's header or cookie, set on the answer.

The data plane's side of ``sessions.pin_token`` (the tokens themselves: pin_token.py).
A presented token is verified and counted (``pinproxy_pin_tokens_total{result}``);
a valid one is the pin the store is asked to confirm (``PinStore.lookup(hint=...)``),
which a replica honours without a round trip when it holds no copy, writing it back to
its store in the background. An answer carries a fresh token when the request had
none that was valid, when the version changed, or when its token is past half its
``max_age_s``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.policy.pin_token import PinTokens

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.config.settings import PinTokenConfig
    from proxy.core.models import Pin
    from proxy.policy.pin_token import TokenCheck
    from proxy.telemetry.metrics import ProxyMetrics


class PinTokenHeaders:
    """Reads, counts and issues pin tokens for the data plane."""

    def __init__(self, config: PinTokenConfig, metrics: ProxyMetrics) -> None:
        self._config = config
        self._tokens = PinTokens(config)
        self._metrics = metrics

    def read(
        self, headers: Mapping[str, str], cookies: Mapping[str, str], session_id: str, now: float
    ) -> TokenCheck | None:
        """The presented token's check, or None when the request carried none."""
        token = None
        if self._config.header is not None:
            token = headers.get(self._config.header)
        if not token and self._config.cookie is not None:
            token = cookies.get(self._config.cookie)
        if not token:
            return None
        check = self._tokens.verify(token.strip(), session_id, now)
        self._metrics.pin_tokens_for(check.result).inc()
        return check

    def answer_headers(
        self, session_id: str, served: Pin, presented: TokenCheck | None, now: float
    ) -> list[tuple[str, str]]:
        """The headers that hand the client its (fresh) token; empty when it has one."""
        if (
            presented is not None
            and presented.pin is not None
            and presented.issued_at is not None
            and presented.pin.version_key == served.version_key
            and now - presented.issued_at < self._config.max_age_s / 2
        ):
            return []
        token = self._tokens.issue(session_id, served, now)
        self._metrics.pin_tokens_for("issued").inc()
        out = []
        if self._config.header is not None:
            out.append((self._config.header, token))
        if self._config.cookie is not None:
            max_age = int(self._config.max_age_s)
            out.append(("Set-Cookie", f"{self._config.cookie}={token}; Max-Age={max_age}; "
                                      "Path=/; HttpOnly; SameSite=Lax"))
        return out


def changed_against_token(presented: TokenCheck | None, pin: Pin | None) -> str | None:
    """``old -> new`` when a valid token names another version than the pin found.

    The client holds proof it was answered by the token's version: an answer on
    another one (an explicit repin it did not see, a conflict) must say so.
    """
    if presented is None or presented.pin is None or pin is None:
        return None
    if presented.pin.version_key == pin.version_key:
        return None
    return f"{presented.pin.version_key} -> {pin.version_key}"
