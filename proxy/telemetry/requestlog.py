"""The request log: one structured line per proxied request, written off the hot path.

``observe`` only appends the values its line needs (a tuple, never the event itself,
which holds the request body) to a bounded in-memory queue. A writer thread
drains it every ``interval_s`` and writes the lines to a ``LineSink``: stderr in the
log format (JSON or text, the lines logs.py's formatters make of a ``pinproxy.requests``
record), a batch of lines per write, so a slow terminal or log pipe never stalls the
event loop. When the queue is full, new lines are dropped and counted rather than
waited for. The request log is a sink of its own, not a logger: a logging record per
line would cost about as much again as the line itself.

The formatters make each line straight from the queued tuple
(``format_request_lines``), not from a dict of its fields: the fields and their order
are fixed, and the dict alone cost as much as the rest of a JSON line. ``line_fields``
stays the definition of a line's fields: the tests pin that every line is what the
formatter's ``format`` makes of a record carrying them.

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
from typing import TYPE_CHECKING, Final, Protocol, TextIO, TypeAlias

from proxy.core.models import prompt_of

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from proxy.config.observability import LogConfig
    from proxy.core.events import RequestEvent, Usage


LOGGER_NAME: Final = "pinproxy.requests"
_HASH_BYTES: Final = 8  # 64 bits: collisions need ~4 billion sessions
# Hashes remembered per hasher: a session's later turns reuse its hash instead of
# hashing again (a keyed BLAKE2b costs about a tenth of a request log line); cleared
# whole when full, a bound and nothing more.
_CACHED_HASHES: Final = 16_384
# Lines per write: bounds the text held at once when a backlog is written.
_LINES_PER_WRITE: Final = 256
_MESSAGE: Final = "request"


class LineFormatter(Protocol):
    """A formatter that formats many lines of one logger at once (logs.py has two)."""

    def format_request_lines(
        self, name: str, levelno: int, message: str, lines: Sequence[Taken],
        hasher: SessionHasher,
    ) -> str:
        """What ``format`` makes of a record carrying ``line_fields(t, hasher)``, dated
        ``t[0]``, per queued ``t``, with these name, level and message; each line ended
        by a newline, as one text."""
        ...


class SessionHasher:
    """Keyed hash of session ids for logs and spans (or the raw id, when configured)."""

    def __init__(self, key: bytes | None, *, raw: bool = False) -> None:
        # Without a configured key, a random one: hashes then match within this process
        # only, which still groups a session's lines without revealing its id.
        self._key = key if key else secrets.token_bytes(32)
        self._configured = bool(key)
        self._raw = raw
        # Read and written from the event loop (spans) and the request log's thread: a
        # dict's get, set and clear are each atomic under the GIL, and a race can only
        # compute a hash twice.
        self._cache: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: LogConfig) -> SessionHasher:
        key = config.session_hash_key
        return cls(key.get_secret_value().encode() if key else None, raw=config.raw_session_ids)

    def __call__(self, session_id: str | None) -> str | None:
        if session_id is None or self._raw:
            return session_id
        cache = self._cache
        hashed = cache.get(session_id)
        if hashed is None:
            if len(cache) >= _CACHED_HASHES:
                cache.clear()
            hashed = cache[session_id] = hashlib.blake2b(
                session_id.encode(), key=self._key, digest_size=_HASH_BYTES
            ).hexdigest()
        return hashed

    @property
    def remembered(self) -> Mapping[str, str]:
        """The hashes remembered, by session id (none when ids are logged raw): a
        caller's fast path; always the same mapping, emptied in place when full."""
        return self._cache

    def __repr__(self) -> str:
        # Never the key itself.
        key = "configured" if self._configured else "random"
        return f"SessionHasher(raw={self._raw}, key={key})"


# What a line needs of its event, taken when the request finishes: a queued line holds
# these values and nothing else of the event, above all not the request body the event
# carries for tracing (a stalled log pipe would otherwise keep up to ``max_pending``
# bodies alive, each as large as a prompt).
Taken: TypeAlias = tuple[
    float, str, str, "str | None", "str | None", float, "float | None", "Usage | None",
    str, str, int, "str | None", "str | None", "str | None", bool, "str | None",
    "bool | None", bool, "str | None",
]
# The values that mostly repeat from request to request (method to error_type), last in
# the tuple so that one slice holds them all. The fields made of them, and of nothing
# else, are the two runs of keys below: formatters remember the runs' text by the slice.
REPEATING: Final = 8  # taken[REPEATING:]
REPEATING_RUNS: Final = (
    ("method", "path", "status", "prompt_version", "version_key", "region", "backend",
     "new_pin", "version_changed"),
    ("structured_output_valid", "streamed", "error_type"),
)


def _take(event: RequestEvent) -> Taken:
    # A line is dated when its request finished, not when the writer got to it.
    return (
        event.at + event.duration_s, event.request_id, event.trace_id, event.session_id,
        event.client, event.duration_s, event.ttfb_s, event.usage, event.method,
        event.path, event.status, event.version_key, event.region, event.backend_id,
        event.new_pin, event.version_changed, event.structured_output_valid,
        event.streamed, event.error_type,
    )


def line_fields(taken: Taken, hasher: SessionHasher) -> dict[str, object]:
    """A queued line's fields, in their order: what every line format is defined by."""
    (_, request_id, trace_id, session_id, client, duration_s, ttfb_s, usage, method, path,
     status, version_key, region, backend_id, new_pin, version_changed,
     structured_output_valid, streamed, error_type) = taken  # fmt: skip
    return {
        "request_id": request_id,
        "trace_id": trace_id,
        "session": hasher(session_id),
        "client": client,
        "method": method,
        "path": path,
        "status": status,
        "prompt_version": None if version_key is None else prompt_of(version_key),
        "version_key": version_key,
        "region": region,
        "backend": backend_id,
        "new_pin": new_pin,
        "version_changed": version_changed,
        "duration_ms": round(duration_s * 1000, 3),
        "ttfb_ms": None if ttfb_s is None else round(ttfb_s * 1000, 3),
        "prompt_tokens": None if usage is None else usage.prompt_tokens,
        "completion_tokens": None if usage is None else usage.completion_tokens,
        "structured_output_valid": structured_output_valid,
        "streamed": streamed,
        "error_type": error_type,
    }


def event_fields(event: RequestEvent, hasher: SessionHasher) -> dict[str, object]:
    """The request log's fields for ``event`` (also what the tests compare against)."""
    return line_fields(_take(event), hasher)


class Sink(Protocol):
    """Where the request log's lines go (a ``LineSink``, or a test's fan-out)."""

    def write(self, lines: Sequence[Taken], hasher: SessionHasher) -> None:
        """Write a batch of queued lines, their sessions hashed by ``hasher``; never
        raise (the writer thread must go on)."""
        ...


class LineSink:
    """Where the request log's lines go: a text stream, a batch of lines per write.

    ``formatter`` makes the lines (logs.py's JSON or text, the same lines it makes of
    logging records); ``lock`` is held around each write, so lines written under the
    same lock (``configure_logging`` passes its stderr handler's) never interleave.
    """

    def __init__(
        self, stream: TextIO, formatter: LineFormatter, lock: threading.RLock | None = None
    ) -> None:
        self._stream = stream
        self._formatter = formatter
        self._lock = lock or threading.RLock()
        self.failures = 0  # writes the stream refused (their lines are lost)

    def write(self, lines: Sequence[Taken], hasher: SessionHasher) -> None:
        """Write ``lines``; a stream that refuses (a closed pipe) loses them, counted,
        and is reported once, rather than stopping the request log."""
        text = self._formatter.format_request_lines(
            LOGGER_NAME, logging.INFO, _MESSAGE, lines, hasher)
        try:
            with self._lock:
                self._stream.write(text)
                self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream is closed
            self.failures += 1
            if self.failures == 1:
                logging.getLogger(__name__).error(
                    "request log lines cannot be written (%r); they are dropped", exc)

    def __repr__(self) -> str:
        return f"LineSink({self._formatter!r}, failures={self.failures})"


# The process's sink, set by logs.configure_logging; None: request lines go nowhere.
_configured: Sink | None = None


def route_request_log(sink: Sink | None) -> None:
    """Send every ``RequestLog`` without a sink of its own to ``sink`` (None: nowhere)."""
    global _configured
    _configured = sink


class RequestLog:
    """A ``RequestObserver`` that writes a line per request from a background thread."""

    def __init__(
        self,
        hasher: SessionHasher,
        *,
        sink: Sink | None = None,
        max_pending: int = 10_000,
        interval_s: float = 0.1,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        """``sink``: where lines go; by default the process's (``route_request_log``),
        looked up at each write."""
        self._hasher = hasher
        self._sink = sink
        self._pending: deque[Taken] = deque()
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
        self._pending.append(_take(event))

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
        sink = self._sink or _configured
        if sink is None:
            self._pending.clear()
            return
        with self._drain_lock:
            pending, hasher = self._pending, self._hasher
            while pending:
                count = min(len(pending), _LINES_PER_WRITE)
                sink.write([pending.popleft() for _ in range(count)], hasher)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.flush()
            except Exception:  # pragma: no cover - a sink bug must not end logging
                logging.getLogger(__name__).exception("request log writer failed")

    @property
    def dropped(self) -> int:
        return self._dropped

    def __repr__(self) -> str:
        running = self._thread is not None
        return (
            f"RequestLog(pending={len(self._pending)}, dropped={self._dropped}, "
            f"running={running}, hasher={self._hasher!r})"
        )

