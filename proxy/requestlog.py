"""The request log: one structured line per proxied request, written off the hot path.

``observe`` only appends the event to a bounded in-memory queue. A writer thread
drains it every ``interval_s``, turns each event into a ``logging`` record on the
``pinproxy.requests`` logger and lets the configured handlers (stderr, JSON or text;
see logs.py) write it, so a slow terminal or log pipe never stalls the event loop.
When the queue is full, new lines are dropped and counted rather than waited for.

Session ids are never logged raw unless ``log.raw_session_ids`` says so: the line
carries a keyed BLAKE2b hash, equal for equal ids under the same key, so one
session's lines can be found without the id itself being exposed.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.config import LogConfig
    from proxy.events import RequestEvent

LOGGER_NAME: Final = "pinproxy.requests"
_HASH_BYTES: Final = 8  # 64 bits: collisions need ~4 billion sessions


class SessionHasher:
    """Keyed hash of session ids for logs and spans (or the raw id, when configured)."""

    def __init__(self, key: bytes | None, *, raw: bool = False) -> None:
        # Without a configured key, a random one: hashes then match within this process
        # only, which still groups a session's lines without revealing its id.
        self._key = key if key else secrets.token_bytes(32)
        self._configured = bool(key)
        self._raw = raw

    @classmethod
    def from_config(cls, config: LogConfig) -> SessionHasher:
        key = config.session_hash_key
        return cls(key.get_secret_value().encode() if key else None, raw=config.raw_session_ids)

    def __call__(self, session_id: str | None) -> str | None:
        if session_id is None or self._raw:
            return session_id
        return hashlib.blake2b(
            session_id.encode(), key=self._key, digest_size=_HASH_BYTES
        ).hexdigest()

    def __repr__(self) -> str:
        # Never the key itself.
        key = "configured" if self._configured else "random"
        return f"SessionHasher(raw={self._raw}, key={key})"


def event_fields(event: RequestEvent, hasher: SessionHasher) -> dict[str, object]:
    """The request log's fields for ``event`` (also what the tests compare against)."""
    usage = event.usage
    return {
        "request_id": event.request_id,
        "trace_id": event.trace_id,
        "session": hasher(event.session_id),
        "method": event.method,
        "path": event.path,
        "status": event.status,
        "prompt_version": event.prompt_version,
        "version_key": event.version_key,
        "region": event.region,
        "backend": event.backend_id,
        "new_pin": event.new_pin,
        "version_changed": event.version_changed,
        "duration_ms": round(event.duration_s * 1000, 3),
        "ttfb_ms": None if event.ttfb_s is None else round(event.ttfb_s * 1000, 3),
        "prompt_tokens": None if usage is None else usage.prompt_tokens,
        "completion_tokens": None if usage is None else usage.completion_tokens,
        "structured_output_valid": event.structured_output_valid,
        "streamed": event.streamed,
        "error_type": event.error_type,
    }


class RequestLog:
    """A ``RequestObserver`` that logs every request from a background thread."""

    def __init__(
        self,
        hasher: SessionHasher,
        *,
        max_pending: int = 10_000,
        interval_s: float = 0.1,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._hasher = hasher
        self._logger = logging.getLogger(LOGGER_NAME)
        self._pending: deque[RequestEvent] = deque()
        self._max_pending = max_pending
        self._interval_s = interval_s
        self._on_drop = on_drop
        self._dropped = 0
        self._stop = threading.Event()
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def observe(self, event: RequestEvent) -> None:
        # deque.append is atomic under the GIL: no lock on the event loop's side.
        if len(self._pending) >= self._max_pending:
            self._dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
            return
        self._pending.append(event)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pinproxy-request-log",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=5)
        self.flush()

    def flush(self) -> None:
        """Write every queued line now, in the calling thread."""
        if not self._logger.isEnabledFor(logging.INFO):
            self._pending.clear()
            return
        with self._drain_lock:
            while self._pending:
                self._write(self._pending.popleft())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.flush()
            except Exception:  # pragma: no cover - a handler bug must not end logging
                logging.getLogger(__name__).exception("request log writer failed")

    def _write(self, event: RequestEvent) -> None:
        logger = self._logger
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, "request", (), None,
            extra={"fields": event_fields(event, self._hasher)},
        )
        # The line is dated when the request finished, not when the thread got to it.
        record.created = event.at + event.duration_s
        record.msecs = (record.created * 1000) % 1000
        logger.handle(record)

    @property
    def dropped(self) -> int:
        return self._dropped

    def __repr__(self) -> str:
        running = self._thread is not None
        return (
            f"RequestLog(pending={len(self._pending)}, dropped={self._dropped}, "
            f"running={running}, hasher={self._hasher!r})"
        )
