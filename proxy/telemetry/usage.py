"""Token usage and structured-output validity, read off a response as it streams past.

The data plane feeds every relayed chunk to a tap *after* writing it to the client,
so a tap never delays a byte. A tap does as little as it can per chunk and parses
once, at the end:

* Server-sent events (``text/event-stream``). OpenAI puts ``usage`` in the last data
  event of a stream (``stream_options.include_usage``; the Responses API in
  ``response.completed``), so the tap only remembers where the last complete data
  event is and keeps the unfinished tail (bounded by ``max_event_bytes``). It parses
  that one event at the end. Only when the request asked for JSON output does it
  parse every event, to collect the content deltas (bounded by
  ``max_content_bytes``) that the answer's validity is judged on.
* JSON (``application/json``). The usage object comes last in OpenAI-shaped bodies,
  so the tap keeps only the chunks covering the last ``tail_bytes`` and parses just
  the ``usage`` object it finds there; an answer of at most ``_PARSE_WHOLE_BYTES``
  (most non-streamed completions) is parsed whole instead, which is cheaper, and read
  by the scan only if it does not parse. A request that asked for JSON output needs the
  message content too: then the whole body is kept, up to ``max_body_bytes``, and
  parsed once. Over a cap there is no answer rather than a wrong one.

Whether a request asked for JSON output (``response_format.type`` or the Responses
API's ``text.format.type`` of ``json_object`` / ``json_schema``) is read from the
request body, which is parsed only when it mentions one of those keys.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import orjson

from proxy.core.answers import (
    answer_text,
    delta_text,
    facts_of_event,
    model_in_head,
    model_of,
    parses_as_json,
    usage_in_tail,
    usage_of,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from proxy.core.events import Usage

_JSON_FORMATS: Final = frozenset({"json_object", "json_schema"})
_DONE: Final = b"[DONE]"
# A JSON answer this small is parsed whole rather than scanned (JsonTap.finish): the
# parse wins up to ~5 KiB of a chat completion (timeit, this VM).
_PARSE_WHOLE_BYTES: Final = 4096
_DONE_EVENTS: Final = (b"data: [DONE]", b"data:[DONE]")


@dataclass(frozen=True, slots=True)
class TapLimits:
    """Memory bounds of one tap; each is per in-flight response."""

    max_event_bytes: int = 1024 * 1024  # a single SSE event (the final one holds usage)
    max_content_bytes: int = 1024 * 1024  # streamed content collected for JSON validation
    tail_bytes: int = 64 * 1024  # end of a JSON body searched for ``usage``
    max_body_bytes: int = 2 * 1024 * 1024  # whole JSON body kept to validate its content


@dataclass(slots=True)  # not frozen: one per response, never changed (see core/events.py)
class TapResult:
    usage: Usage | None = None
    # None: not asked for JSON output, or the answer could not be judged (over a cap).
    structured_output_valid: bool | None = None
    model: str | None = None  # the model the answer names (gen_ai.response.model)


class ResponseTap(Protocol):
    """Sees every chunk of one response body, then says what it found."""

    def feed(self, chunk: bytes) -> None:
        """Take note of the next chunk (already sent to the client). Never raises."""
        ...

    def finish(self) -> TapResult:
        """The usage and validity of the complete body. Call once, after the last chunk."""
        ...


def asked_for_json(body: bytes | None) -> bool:
    """Whether a request body asks for JSON output (Chat or Responses API spelling).

    The byte search rejects almost every request without parsing it: the two keys
    that can ask for JSON appear verbatim (quoted) in any body that uses them, while a
    quote inside a JSON string value is always escaped.
    """
    # 'format"' ends both keys: one pass over the body rejects nearly every request.
    if not body or b'format"' not in body:
        return False
    if b'"response_format"' not in body and b'"format"' not in body:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    rf = doc.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in _JSON_FORMATS:
        return True
    text = doc.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    return isinstance(fmt, dict) and fmt.get("type") in _JSON_FORMATS


def new_tap(
    status: int,
    content_type: str,
    content_encoding: str | None,
    request_body: bytes | None,
    limits: TapLimits,
) -> ResponseTap | None:
    """A tap for this response, or None when there is nothing to read in it.

    Only successful JSON and event-stream answers carry usage; the request body is
    looked at only for those.
    """
    if not 200 <= status < 300 or content_encoding not in (None, "", "identity"):
        return None  # the proxy never decompresses; compressed bytes say nothing
    if content_type == "text/event-stream":
        return SseTap(json_mode=asked_for_json(request_body), limits=limits)
    if content_type == "application/json":
        return JsonTap(json_mode=asked_for_json(request_body), limits=limits)
    return None


class SseTap:
    """Reads usage from the last data event, and (JSON mode) the content deltas."""

    __slots__ = (
        "_carry",
        "_content",
        "_content_size",
        "_json_mode",
        "_last",
        "_last_block",
        "_limits",
        "_parts",
        "_pending_size",
        "_skipping",
        "_unjudgeable",
    )

    def __init__(self, *, json_mode: bool, limits: TapLimits) -> None:
        self._json_mode = json_mode
        self._limits = limits
        # The unfinished event after the last boundary, in the chunks it came in: they
        # are joined once, when its end arrives, not once per chunk.
        self._parts: list[bytes] = []
        self._pending_size = 0
        # The last chunk with a complete event other than [DONE], and where its complete
        # events end: the payload is cut out of it only at the end, once.
        self._last_block: tuple[bytes, int] | None = None
        self._last: bytes | None = None  # payload of the last complete data event
        self._skipping = False  # inside an event larger than max_event_bytes
        self._carry = b""  # while skipping: the last bytes, for a boundary split in two
        self._content: list[str] = []
        self._content_size = 0
        self._unjudgeable = False  # JSON mode: an event or the content overflowed

    def feed(self, chunk: bytes) -> None:
        if self._skipping:
            probe = self._carry + chunk
            cut = _first_boundary(probe)
            if cut < 0:
                self._carry = probe[-3:]
                return
            self._skipping, self._carry = False, b""
            chunk = probe[cut:]
        parts = self._parts
        if not parts and chunk[-2:] == b"\n\n" and not self._json_mode and b"\r" not in chunk:
            # The common piece of a stream: whole events and nothing after them. Only
            # where they end is noted; no copy, no search.
            end = len(chunk) - 2
            if end > 16 or chunk[:end].strip() not in _DONE_EVENTS:
                self._last_block, self._last = (chunk, end), None
            return
        if parts and not _may_end_event(parts[-1], chunk):
            self._hold_more(chunk)
            return
        data = b"".join((*parts, chunk)) if parts else chunk
        if b"\r" in data:
            # SSE allows CRLF line ends; one form keeps the scan to a single rfind.
            # An unfinished CR at the end of a chunk meets its LF in the next join.
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            parts.clear()
            self._pending_size = 0
            self._hold_more(data)
            return
        if self._json_mode and not self._unjudgeable:
            for payload in _payloads(data, end):
                self._collect(payload)
        if end > 16 or data[:end].strip() not in _DONE_EVENTS:
            self._last_block, self._last = (data, end), None
        parts.clear()
        self._pending_size = 0
        self._hold_more(data[end + 2 :])  # last: an oversized rest voids what came before

    def _hold_more(self, rest: bytes) -> None:
        if not rest:
            return
        self._pending_size += len(rest)
        if self._pending_size > self._limits.max_event_bytes:
            # An event this large is skipped to its end: no usage read from it.
            self._parts.clear()
            self._pending_size = 0
            self._skipping, self._carry = True, rest[-3:]
            self._unjudgeable = True
            self._last_block = self._last = None
        else:
            self._parts.append(rest)

    def _collect(self, payload: bytes) -> None:
        if payload == _DONE:
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        piece = delta_text(event)
        if piece:
            self._content_size += len(piece)
            if self._content_size > self._limits.max_content_bytes:
                self._unjudgeable = True
                self._content.clear()
            else:
                self._content.append(piece)

    def finish(self) -> TapResult:
        if self._last_block is not None:
            self._last = _last_payload(*self._last_block)
        pending = b"".join(self._parts)
        if not self._skipping and pending.strip():
            # A final event without its blank line: the stream still ended with it.
            pending = pending.replace(b"\r\n", b"\n")
            last = _last_payload(pending + b"\n\n", len(pending))
            if last is not None:
                if self._json_mode and not self._unjudgeable:
                    self._collect(last)
                self._last = last
        usage, model = facts_of_event(self._last) if self._last is not None else (None, None)
        valid: bool | None = None
        if self._json_mode and not self._unjudgeable and self._content:
            valid = parses_as_json("".join(self._content))
        return TapResult(usage, valid, model)

    def __repr__(self) -> str:
        return (
            f"SseTap(json_mode={self._json_mode}, pending={self._pending_size}B, "
            f"content={self._content_size}B)"
        )


class JsonTap:
    """Keeps the end of a JSON body (or all of it, in JSON mode) and parses once."""

    __slots__ = ("_chunks", "_json_mode", "_keep", "_kept", "_over", "_size")

    def __init__(self, *, json_mode: bool, limits: TapLimits) -> None:
        self._json_mode = json_mode
        self._keep = limits.max_body_bytes if json_mode else limits.tail_bytes
        self._chunks: deque[bytes] = deque()
        self._kept = 0
        self._size = 0
        self._over = False

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._json_mode:
            if self._over:
                return
            if self._size > self._keep:
                # Too large to hold for validation: no answer for this response.
                self._over = True
                self._chunks.clear()
                return
            self._chunks.append(chunk)
            return
        self._chunks.append(chunk)
        self._kept += len(chunk)
        # Drop whole chunks from the front while the rest still covers the tail.
        while self._kept - len(self._chunks[0]) >= self._keep:
            self._kept -= len(self._chunks.popleft())

    def finish(self) -> TapResult:
        if self._over or not self._chunks:
            return TapResult()
        data = b"".join(self._chunks)
        if not self._json_mode:
            whole = self._kept == self._size
            if whole and self._size <= _PARSE_WHOLE_BYTES:
                # A small answer, kept whole: one orjson parse costs less than the two
                # scans (285 B: ~1.5 µs against ~3.3 µs; even at ~5 KiB). A body that
                # does not parse is read by the scans, as a larger one is.
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError:
                    doc = None
                if isinstance(doc, dict):
                    return TapResult(usage_of(doc), None, model_of(doc))
            # The model is named near the start: only when the start is still kept.
            model = model_in_head(data) if whole else None
            return TapResult(usage_in_tail(data), None, model)
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return TapResult()
        if not isinstance(doc, dict):
            return TapResult()
        text = answer_text(doc)
        return TapResult(
            usage_of(doc), None if text is None else parses_as_json(text), model_of(doc)
        )

    def __repr__(self) -> str:
        return f"JsonTap(json_mode={self._json_mode}, seen={self._size}B, over={self._over})"


# -- SSE framing -------------------------------------------------------------------


def _may_end_event(prev: bytes, chunk: bytes) -> bool:
    """Whether a blank line may end in ``chunk`` after ``prev`` (a false yes costs a join).

    A boundary lies wholly in the chunk, or straddles the seam with a line-end
    character on both sides of it.
    """
    return (
        b"\n\n" in chunk
        or b"\n\r\n" in chunk
        or (prev[-1:] in (b"\n", b"\r") and chunk[:1] in (b"\n", b"\r"))
    )


def _first_boundary(data: bytes) -> int:
    """Index just past the first blank line in ``data`` (either line-end form), or -1."""
    found = [i for i in (data.find(b"\n\n"), data.find(b"\r\n\r\n")) if i >= 0]
    if not found:
        return -1
    i = min(found)
    return i + (2 if data.startswith(b"\n\n", i) else 4)


def _data_of(event: bytes) -> bytes | None:
    """The data payload of one event block, or None when it has no data line."""
    if not event:
        return None
    parts = [
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


def _payloads(data: bytes, end: int) -> Iterator[bytes]:
    """Data payloads of the complete events in ``data[:end]``, in order."""
    for event in data[:end].split(b"\n\n"):
        payload = _data_of(event.strip(b"\n"))
        if payload is not None:
            yield payload


def _last_payload(data: bytes, end: int) -> bytes | None:
    """The last data payload in ``data[:end]`` other than ``[DONE]``, walking backwards."""
    while end > 0:
        start = data.rfind(b"\n\n", 0, end)
        payload = _data_of(data[start + 2 if start >= 0 else 0 : end].strip(b"\n"))
        if payload is not None and payload != _DONE:
            return payload
        if start < 0:
            return None
        end = start
    return None
