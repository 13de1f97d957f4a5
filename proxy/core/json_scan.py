"""Finding session ids in a JSON body that arrives in pieces, without holding all of it.

ijson's C backend (yajl2_c) turns the pieces into parse events; a small trie of the
configured dotted paths follows them. A path is settled early only by its *first* value
that is an id (``Found``) or that can never be one (``Unreadable``); "absent" is never
settled here, because only the whole body can prove it (Python's ``json`` lets a repeated
key win, so a later ``"metadata"`` could still carry the id). A body that yajl refuses
but Python's ``json`` may accept (``NaN``, UTF-16, a lone surrogate escape, which yajl
turns into ``?``) makes the scanner give up (``failed``): the caller then holds the body
to its end and reads it whole with ``json_body``.

Pure: the caller feeds bytes; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import ijson

from proxy.core.json_body import (
    PENDING,
    PathResult,
    Pending,
    as_id,
    describe,
    not_an_id,
    not_an_object,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

try:
    _BACKEND: Any = ijson.get_backend("yajl2_c")
except ImportError:  # pragma: no cover - the wheels ship it; pure Python is slower, not wrong
    _BACKEND = ijson

_BOM: Final = b"\xef\xbb\xbf"
_SCALARS: Final = frozenset({"null", "boolean", "integer", "double", "number", "string"})


@dataclass(slots=True)
class _Node:
    """A step of one or more configured paths; ``terminal`` when a path ends here."""

    depth: int
    terminal: str | None = None
    children: dict[str, _Node] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)  # every path through this node


def _trie(paths: Iterable[str]) -> _Node:
    root = _Node(0)
    for path in paths:
        node = root
        node.paths.append(path)
        for part in path.split("."):
            node = node.children.setdefault(part, _Node(node.depth + 1))
            node.paths.append(path)
        node.terminal = path
    return root


class PathScanner:
    """Values at dotted ``paths`` of a JSON document fed with ``feed`` piece by piece."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._root = _trie(paths)
        self._results: dict[str, PathResult] = {}
        self._events = ijson.sendable_list()
        self._parser: Any = _BACKEND.basic_parse_coro(self._events)
        self._stack: list[_Node | None] = []  # open containers: on-path maps, else None
        self._key: str | None = None
        self._head = b""  # the first bytes, until a BOM can be told apart
        self._started = False
        self.failed = False

    def result(self, path: str) -> PathResult | Pending:
        """``path``'s settled value, or ``PENDING`` (also forever, once ``failed``)."""
        return self._results.get(path, PENDING)

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body; sets ``failed`` when yajl cannot go on."""
        if self.failed or self._parser is None:
            return
        if not self._started:
            self._head += chunk
            if len(self._head) < len(_BOM) and self._head == _BOM[: len(self._head)]:
                return
            chunk = self._head.removeprefix(_BOM)  # Python's json skips it; yajl does not
            self._started, self._head = True, b""
            if not chunk:
                return  # b"" would tell ijson the body ended
        try:
            self._parser.send(chunk)
        except Exception:
            # yajl's errors, UnicodeDecodeError on a lone low surrogate, and a SystemError
            # on integers of thousands of digits: all mean "read the whole body instead".
            # The events of a failed call are never read (one may be half-built).
            self._give_up()
            return
        try:
            self._follow(self._events)
        finally:
            del self._events[:]

    def _give_up(self) -> None:
        self.failed = True
        self._parser = None
        self._events = ijson.sendable_list()

    def _follow(self, events: Iterable[tuple[str, Any]]) -> None:
        stack = self._stack
        for event, value in events:
            if self.failed:
                return
            if event == "map_key":
                self._key = value
            elif event in _SCALARS:
                node = self._node_of_value()
                if node is not None:
                    self._scalar(node, event, value)
            elif event == "start_map":
                node = self._node_of_value()
                if node is not None and node.terminal is not None:
                    self._settle(node.terminal, not_an_id(node.terminal.split("."), "an object"))
                stack.append(node if node is not None and node.children else None)
            elif event == "start_array":
                node = self._node_of_value()
                if node is not None:
                    self._settle_all(node, "an array")
                stack.append(None)
            else:  # end_map, end_array
                stack.pop()

    def _node_of_value(self) -> _Node | None:
        """The trie node of the value that starts now, if it lies on a configured path."""
        if not self._stack:
            return self._root  # the document itself
        top = self._stack[-1]
        if top is None or self._key is None:
            return None
        # Only on-path maps are on the stack, so the current key is that map's.
        node = top.children.get(self._key)
        if node is not None and "?" in self._key:
            self._give_up()  # maybe a lone surrogate that yajl wrote as "?"
            return None
        return node

    def _scalar(self, node: _Node, event: str, value: object) -> None:
        if event == "null":
            return  # absent so far: only the whole body can tell
        if node.terminal is not None and value != "":
            if isinstance(value, str) and "?" in value:
                # yajl writes a lone surrogate escape as "?": this may not be the id a
                # backend reads, so the whole body decides.
                self._give_up()
                return
            self._settle(node.terminal, as_id(value, node.terminal.split(".")))
        what = describe(value)
        for path in node.paths:
            if path != node.terminal:
                self._settle(path, not_an_object(path.split("."), node.depth, what))

    def _settle_all(self, node: _Node, what: str) -> None:
        for path in node.paths:
            parts = path.split(".")
            if path == node.terminal:
                self._settle(path, not_an_id(parts, what))
            else:
                self._settle(path, not_an_object(parts, node.depth, what))

    def _settle(self, path: str, result: PathResult) -> None:
        self._results.setdefault(path, result)  # the first occurrence decides

