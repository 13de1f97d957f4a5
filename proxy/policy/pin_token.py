"""Signed pin tokens: a session's pin, carried by the client, checked without a store.

Format: ``v1.<key id>.<payload>.<mac>``, payload and MAC in unpadded base64url. The
payload is JSON: the pin (version key, backend, region, pin time), when the token was
issued, and 16 hex digits of the session id's SHA-256, so a token shown with another
session id is told apart from a forged one. The MAC is HMAC-SHA256 with the key named
by the key id over ``v1.<key id>.<payload>``. A token is honoured only if its key is
configured, its MAC verifies (compared in constant time), it belongs to the request's
session and it is younger than ``max_age_s``; anything else is ignored and counted by
what was wrong (``malformed``, ``unknown_key``, ``forged``, ``other_session``,
``expired``), never trusted, never an error for the client.

Pure: time is passed in, keys come from the settings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import orjson

from proxy.core.models import Pin

if TYPE_CHECKING:
    from proxy.config.settings import PinTokenConfig

Result = Literal["valid", "malformed", "unknown_key", "forged", "other_session", "expired"]

_VERSION = "v1"
_MAX_LENGTH = 2048
_CLOCK_SKEW_S = 300.0  # a token "issued" further in the future than this is not ours


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """What a presented token says: the pin when ``result`` is valid, else None."""

    result: Result
    pin: Pin | None = None
    issued_at: float | None = None


class PinTokens:
    """Issues and verifies the tokens of ``sessions.pin_token``."""

    def __init__(self, config: PinTokenConfig) -> None:
        self._config = config
        self._keys = {kid: key.get_secret_value().encode() for kid, key in config.keys.items()}

    @property
    def max_age_s(self) -> float:
        return self._config.max_age_s

    def issue(self, session_id: str, pin: Pin, now: float) -> str:
        """A token for ``session_id`` pinned to ``pin``, signed with ``sign_with``."""
        kid = self._config.sign_with
        payload = _b64(orjson.dumps({
            "v": pin.version_key, "b": pin.backend_id, "r": pin.region, "p": pin.pinned_at,
            "i": now, "s": _session_hash(session_id),
        }))  # fmt: skip
        signed = f"{_VERSION}.{kid}.{payload}"
        return f"{signed}.{_b64(self._mac(kid, signed))}"

    def verify(self, token: str, session_id: str, now: float) -> TokenCheck:
        """Check ``token`` for ``session_id`` at ``now``; never raises."""
        parts = token.split(".") if len(token) <= _MAX_LENGTH and token.isascii() else []
        if len(parts) != 4 or parts[0] != _VERSION:
            return TokenCheck("malformed")
        _, kid, payload, mac = parts
        if kid not in self._keys:
            return TokenCheck("unknown_key")
        presented = _unb64(mac)
        if presented is None or not hmac.compare_digest(
            presented, self._mac(kid, f"{_VERSION}.{kid}.{payload}")
        ):
            return TokenCheck("forged")
        data = _document(payload)
        if data is None:
            return TokenCheck("malformed")  # signed by us, yet unreadable: be safe
        pin, issued, owner = data
        if owner != _session_hash(session_id):
            return TokenCheck("other_session")
        if now - issued > self._config.max_age_s or issued - now > _CLOCK_SKEW_S:
            return TokenCheck("expired")
        return TokenCheck("valid", pin, issued)

    def _mac(self, kid: str, signed: str) -> bytes:
        return hmac.new(self._keys[kid], signed.encode(), hashlib.sha256).digest()


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _document(payload: str) -> tuple[Pin, float, str] | None:
    raw = _unb64(payload)
    try:
        data = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    version, backend, region, owner = (data.get(k) for k in ("v", "b", "r", "s"))
    pinned, issued = data.get("p"), data.get("i")
    if not (isinstance(version, str) and isinstance(backend, str) and isinstance(region, str)
            and isinstance(owner, str)):
        return None
    if not (isinstance(pinned, int | float) and isinstance(issued, int | float)):
        return None
    if isinstance(pinned, bool) or isinstance(issued, bool):
        return None
    return Pin(version, backend, region, float(pinned)), float(issued), owner
