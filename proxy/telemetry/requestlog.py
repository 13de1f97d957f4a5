"""The request log: one structured line per proxied request, written off the hot path.

``observe`` only appends the event to a bounded in-memory queue. A writer thread
drains it every ``interval_s`` and writes the lines of the ``pinproxy.requests``
logger to the handlers that logger's records reach (stderr, JSON or text; see
logs.py), so a slow terminal or log pipe never stalls the event loop. When the queue
is full, new lines are dropped and counted rather than waited for.

A logging record per line costs about as much again as the line itself (the record,
the logger and handler machinery, a write and a flush each), so a plain
``StreamHandler`` with one of pinproxy's formatters gets the lines of a batch formatted
at once (``format_lines``) and written in one ``write``: the same lines its formatter
makes of records. Any other handler (a file, a test's capture, a filter anywhere on
the way) still gets one record per line through ``logging``.

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
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from proxy.config.observability import LogConfig
    from proxy.core.events import RequestEvent

    Line: TypeAlias = tuple[float, Mapping[str, object]]  # (when, fields) of one line

LOGGER_NAME: Final = "pinproxy.requests"
_HASH_BYTES: Final = 8  # 64 bits: collisions need ~4 billion sessions
# Lines per write: bounds the text held at once when a backlog is written.
_LINES_PER_WRITE: Final = 256
_MESSAGE: Final = "request"


@runtime_checkable
class LineFormatter(Protocol):
    """A formatter that formats many lines of one logger at once (logs.py has two)."""

    def format_lines(
        self, name: str, levelno: int, message: str, lines: Sequence[Line]
    ) -> list[str]:
        """What ``format`` makes of a record per line, with these name, level, message."""
        ...


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
        "client": event.client,
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
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO) or logger.disabled:
            self._pending.clear()
            return
        with self._drain_lock:
            pending, hasher = self._pending, self._hasher
            handlers = _handlers_of(logger)
            while pending:
                count = min(len(pending), _LINES_PER_WRITE)
                events = [pending.popleft() for _ in range(count)]
                # A line is dated when its request finished, not when the thread got to it.
                lines = [(e.at + e.duration_s, event_fields(e, hasher)) for e in events]
                self._write(lines, handlers)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.flush()
            except Exception:  # pragma: no cover - a handler bug must not end logging
                logging.getLogger(__name__).exception("request log writer failed")

    def _write(self, lines: Sequence[Line], handlers: list[logging.Handler]) -> None:
        logger = self._logger
        if logger.filters:  # a filter may drop or change records: logging applies it
            for line in lines:
                logger.handle(self._record(line))
            return
        records: list[logging.LogRecord] | None = None
        for handler in handlers:
            formatter = handler.formatter
            if (type(handler) is logging.StreamHandler and not handler.filters
                    and isinstance(formatter, LineFormatter)):
                text = formatter.format_lines(logger.name, logging.INFO, _MESSAGE, lines)
                self._emit(handler, text, lines)
                continue
            if records is None:  # built once, shared by the handlers, as logging does
                records = [self._record(line) for line in lines]
            for record in records:
                handler.handle(record)

    def _emit(self, handler: logging.StreamHandler[Any], text: list[str],
              lines: Sequence[Line]) -> None:
        """``StreamHandler.emit`` of many lines: one write and one flush, under the
        handler's lock like every emit, so other threads' lines never land inside."""
        terminator = handler.terminator
        handler.acquire()
        try:
            handler.stream.write(terminator.join(text) + terminator)
            handler.flush()
        except RecursionError:  # as StreamHandler.emit does
            raise
        except Exception:
            handler.handleError(self._record(lines[0]))
        finally:
            handler.release()

    def _record(self, line: Line) -> logging.LogRecord:
        created, fields = line
        logger = self._logger
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, _MESSAGE, (), None,
            extra={"fields": fields},
        )
        record.created = created
        record.msecs = (created * 1000) % 1000
        return record

    @property
    def dropped(self) -> int:
        return self._dropped

    def __repr__(self) -> str:
        running = self._thread is not None
        return (
            f"RequestLog(pending={len(self._pending)}, dropped={self._dropped}, "
            f"running={running}, hasher={self._hasher!r})"
        )


def _handlers_of(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers an INFO record of ``logger`` reaches, as ``Logger.callHandlers`` finds
    them (with ``logging.lastResort`` when there are none at all)."""
    reached: list[logging.Handler] = []
    found = 0
    current: logging.Logger | None = logger
    while current is not None:
        found += len(current.handlers)
        reached.extend(h for h in current.handlers if h.level <= logging.INFO)
        if not current.propagate:
            break
        current = current.parent
    last_resort = logging.lastResort
    if found == 0 and last_resort is not None and last_resort.level <= logging.INFO:
        reached.append(last_resort)
    return reached
