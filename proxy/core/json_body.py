"""A JSON request body read the way a backend reads it, and the value at a dotted path.

The reference reader is Python's ``json`` on the body's bytes, which is what an
OpenAI-compatible server in Python (FastAPI/Starlette's ``request.json()``) applies:
it detects UTF-8/16/32 and a UTF-8 BOM, accepts ``NaN``/``Infinity``, lone surrogate
escapes and integers of any length up to Python's limit. orjson reads nearly every body
first, faster; only what it refuses goes to ``json``. Which bodies count as JSON follows
FastAPI too: a ``Content-Type`` of ``application/json`` or ``application/*+json``, or
none at all.

Pure: no I/O, nothing of pinproxy above the core imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True, slots=True)
class Found:
    """The path holds an id: a non-empty string, or an integer's decimal text."""

    value: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The path cannot be read: the body is not JSON, or the value there is no id."""

    reason: str


class Absent(Enum):
    """The body is readable and has no id at the path (missing, null or "")."""

    ABSENT = "absent"


class Pending(Enum):
    """Not known yet: more of a streamed body must be read."""

    PENDING = "pending"


ABSENT: Final = Absent.ABSENT
PENDING: Final = Pending.PENDING

PathResult = Found | Unreadable | Absent


class BodyKind(Enum):
    NONE = "none"  # no body at all (a GET, Content-Length: 0)
    JSON = "json"
    NOT_JSON = "not_json"  # another content type: a backend would not read it as JSON
    ENCODED = "encoded"  # JSON under a Content-Encoding pinproxy does not undo


def body_kind(
    has_body: bool, content_type: str | None, content_encoding: str | None
) -> BodyKind:
    """How a backend would read this request's body (FastAPI's rule for JSON)."""
    if not has_body:
        return BodyKind.NONE
    if content_type is not None and content_type.strip():
        mime = content_type.split(";", 1)[0].strip().lower()
        main, _, sub = mime.partition("/")
        if main != "application" or not (sub == "json" or sub.endswith("+json")):
            return BodyKind.NOT_JSON
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        return BodyKind.ENCODED
    return BodyKind.JSON


_NOT_JSON: Final = Unreadable("the body is not JSON")


def parse_json(body: bytes) -> object | Unreadable:
    """The document, as Python's ``json`` would read these bytes; ``Unreadable`` if not.

    Integers past 64 bits come back as floats (orjson's reading); ``HeldJson`` rereads
    a body when such a float is where an id should be.
    """
    document: object
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return python_json(body)
    return document


def python_json(body: bytes) -> object | Unreadable:
    """The document exactly as Python's ``json`` reads these bytes; ``Unreadable`` if not."""
    document: object
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, undecodable bytes and integers past
        # Python's digit limit; a nesting deeper than the C stack allows is no JSON
        # a backend would read either.
        return _NOT_JSON
    return document


def describe(value: object) -> str:
    """What kind of JSON value this is, without the value (it may be someone's secret)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | Decimal):
        # Not "an integer": orjson reads an integer past 64 bits as a float.
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def not_an_object(path: Sequence[str], depth: int, what: str) -> Unreadable:
    """The reason when the value on the way to ``path`` (at ``depth``) is no object."""
    where = ".".join(path[:depth]) if depth else "the body"
    return Unreadable(f"{where} is {what}, not an object")


def not_an_id(path: Sequence[str], what: str) -> Unreadable:
    """The reason when the value at ``path`` is no id (``what`` it is instead)."""
    return Unreadable(f"{'.'.join(path)} is {what}, not a string or an integer")


def walk(document: object, path: Sequence[str]) -> PathResult:
    """The id at ``path`` in a parsed document.

    Missing, null and "" are ``ABSENT``; a string or an integer is ``Found``; anything
    else at the path, or a value other than an object or null on the way to it (a
    double-encoded ``"metadata": "{...}"``, say), is ``Unreadable``: the client meant to
    send something there, and routing it unpinned would lose its session.
    """
    node = value_at(document, path)
    return node if isinstance(node, Unreadable) else as_id(node, path)


def value_at(document: object, path: Sequence[str]) -> object:
    """The value at ``path`` (None when absent), or ``Unreadable`` when a step is no object."""
    node = document
    for depth, part in enumerate(path):
        if node is None:
            return None
        if not isinstance(node, dict):
            return not_an_object(path, depth, describe(node))
        node = node.get(part)
    return node


def as_id(node: object, path: Sequence[str]) -> PathResult:
    """A value found at ``path`` as an id (see ``walk``)."""
    if node is None or node == "":
        return ABSENT
    if isinstance(node, str):
        return Found(node)
    if isinstance(node, int) and not isinstance(node, bool):
        try:
            return Found(str(node))
        except ValueError:  # past Python's int-to-str digit limit
            return not_an_id(path, "an integer too long to read")
    return not_an_id(path, what_id_is_not(node))


def what_id_is_not(value: object) -> str:
    """What a value at an id's place is, when it is no id."""
    if isinstance(value, float | Decimal):
        return "a number that is not an integer"
    return describe(value)


class HeldJson:
    """Path lookups in a whole body, parsed once, on the first lookup."""

    __slots__ = ("_body", "_document", "_exact")

    _UNPARSED: Final = object()

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._document: object = self._UNPARSED
        self._exact = False  # parsed by Python's json rather than orjson

    def __call__(self, path: str) -> PathResult:
        if not self._body:
            return ABSENT  # an empty body is no body, not a malformed one
        if self._document is self._UNPARSED:
            try:
                self._document = orjson.loads(self._body)
            except orjson.JSONDecodeError:
                self._document, self._exact = python_json(self._body), True
        if isinstance(self._document, Unreadable):
            return self._document
        parts = path.split(".")
        node = value_at(self._document, parts)
        if isinstance(node, float) and not self._exact:
            # orjson reads an integer past 64 bits as a float; Python's json keeps it
            # exact, and a backend would see that integer.
            self._document, self._exact = python_json(self._body), True
            node = value_at(self._document, parts)
        return node if isinstance(node, Unreadable) else as_id(node, parts)
