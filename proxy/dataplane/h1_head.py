"""The edge's rules for a request head, from httptools' pieces to a checked head.

Theory of operation. The connection (h1_connection.py) feeds bytes to llhttp and
collects a head's pieces in its callbacks; everything the edge decides about those
pieces is here, with no socket and no state, so each rule reads as one check:

- Line and count caps (aiohttp's, kept): a request line or header line over
  ``MAX_LINE_BYTES``, or more than ``MAX_HEADERS`` headers, is ``head_too_large``
  (431); the connection checks them inline as the pieces arrive (once a header:
  a call each would be work added to every request).
- ``checked_head``, once the head is complete: over ``max_request_head_bytes`` in all
  is 431; a declared Content-Length over ``max_request_body_bytes`` is 413 up front;
  an HTTP version other than 1.1 or 1.0 is a malformed request line (400).
- ``parse_error_answer``: what llhttp refused (CL+TE, duplicate or invalid
  Content-Length, obs-fold, NUL and control bytes, bad versions and methods) as the
  OpenAI-shaped answer and the reason it is counted by; llhttp does not know TRACK,
  so that is a method refusal (405), quoted from the head, and not counted.

A refusal is a ``HeadRefused`` carrying the reason the edge report counts and the
answer; the connection answers it in turn and closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from proxy.core.edge_limits import (
    body_too_large_error,
    declared_body_too_large,
    head_too_large_error,
    malformed_error,
    malformed_reason,
    unparsed_method_refusal,
)
from proxy.dataplane.h1_exchange import decode_headers

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from proxy.core.errors import ProxyError
    from proxy.dataplane.edge_options import EdgeOptions

# aiohttp's parser caps, kept: a request line or header line, and the header count.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128


class HeadRefused(Exception):
    """A head the edge refuses: ``reason`` as counted (edge report), ``error`` the answer."""

    def __init__(self, reason: str, error: ProxyError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def checked_head(
    method: str,
    target: str,
    raw: list[tuple[bytes, bytes]],
    version_text: str,
    options: EdgeOptions,
) -> tuple[CIMultiDictProxy[str], tuple[int, int]]:
    """(decoded headers, HTTP version) of a complete head, or ``HeadRefused``."""
    size = len(method) + len(target) + 12 + sum(len(n) + len(v) + 4 for n, v in raw)
    if size > options.max_head_bytes:
        raise HeadRefused("head_too_large", head_too_large_error(options.max_head_bytes))
    headers = decode_headers(raw)
    if declared_body_too_large(headers.get("Content-Length"), options.max_body_bytes):
        raise HeadRefused("body_too_large", body_too_large_error(options.max_body_bytes))
    if version_text not in ("1.1", "1.0"):
        raise HeadRefused("request_line", malformed_error("request_line"))
    return headers, ((1, 1) if version_text == "1.1" else (1, 0))


def parser_error_kinds(exc: httptools.HttpParserError) -> list[str]:
    """httptools' error as the kinds ``malformed_reason`` reads (aiohttp's names)."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return ["BadHttpMethod"]
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return ["InvalidURLError"]
    text = str(exc).lower()
    if "version" in text or "after version" in text or "crlf" in text:
        return ["BadStatusLine"]
    return [kind.__name__ for kind in type(exc).__mro__]


def parse_error_answer(
    exc: httptools.HttpParserError, head_start: bytes
) -> tuple[str | None, ProxyError]:
    """(the reason counted, or None for a method refusal; the answer) for a head
    llhttp refused; ``head_start`` is its first bytes, quoted by a method refusal."""
    kinds = parser_error_kinds(exc)
    error = unparsed_method_refusal(kinds, repr(head_start))
    if error is not None:
        return None, error
    reason = malformed_reason(kinds, str(exc), in_body=False)
    return reason, malformed_error(reason)
